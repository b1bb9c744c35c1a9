"""wspo-train with reward projection (DESIGN section 5): exact on one tokenizer, works across two."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_train_helpers import TRAIN_MAX_LENGTH, train_argv, train_setup  # noqa: F401  (fixture)

GAMMA = 0.1


def batches(setup):
    """The same rows as a token-level batch and as a (forced) projected batch."""
    from wspo.models import load_tokenizer
    from wspo.train.batches import Collator
    from wspo.train.shard_sets import open_shard_sets, strong_rule
    from eager_examples import load_examples

    sets = open_shard_sets([str(setup["shards"])], "wspo")
    tokenizer = load_tokenizer(setup["strong_sft"])
    rule, projected = strong_rule(sets, tokenizer, TRAIN_MAX_LENGTH, "chunks")
    assert not projected  # same tokenizer: rewards are used token for token even when chunks are allowed
    tokens, _ = load_examples(sets, rule, with_rewards=True)
    chunks, counts = load_examples(sets, rule, with_rewards=True, project=True)
    by_id = {e.row_id: e for e in chunks}
    # Rows cut by max_length lose one more token under projection (a cut side is trusted only up
    # to its last token's start); compare on rows both phases kept whole.
    pairs = [(e, by_id[e.row_id]) for e in tokens if e.row_id in by_id and len(by_id[e.row_id].input_ids) == len(e.input_ids)]
    assert len(pairs) >= 4
    token_batch = Collator(tokenizer.pad_token_id)([t for t, _ in pairs[:4]])
    chunk_batch = Collator(tokenizer.pad_token_id)([c for _, c in pairs[:4]])
    return token_batch, chunk_batch, pairs


def test_chunk_loss_equals_token_loss_on_one_tokenizer(train_setup, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, TrainingArguments

    from wspo.embedded.models import perturb_model
    from wspo.train.trainer import WSPOTrainer

    token_batch, chunk_batch, pairs = batches(train_setup)
    for token_example, chunk_example in pairs:
        # One token per chunk, each chunk's reward is its token's reward.
        n = len(token_example.rewards)
        assert chunk_example.token_segments.tolist() == list(range(n))
        assert np.array_equal(chunk_example.rewards, token_example.rewards)
    assert torch.equal(token_batch["input_ids"], chunk_batch["input_ids"])

    perturb_model(train_setup["strong_sft"], tmp_path / "policy", scale=0.01, seed=5)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(train_setup["strong_sft"], dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True)
    trainer = WSPOTrainer(policy, args, loss="wspo", gamma=GAMMA, ref_model=reference, train_dataset=[1])
    results = []
    for batch in (token_batch, chunk_batch):
        policy.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(policy, trainer._prepare_inputs(batch))
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in policy.named_parameters()}))
    (token_loss, token_grads), (chunk_loss, chunk_grads) = results
    assert token_loss > 1e-3 and abs(token_loss - chunk_loss) < 1e-6
    for name, grad in token_grads.items():
        torch.testing.assert_close(chunk_grads[name], grad, rtol=1e-5, atol=1e-8, msg=name)


def llama_with_tokenizer(out, tokenizer):
    """A tiny Llama-architecture strong model around another tokenizer family."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
def test_train_a_strong_model_of_another_tokenizer_family(train_setup, tmp_path, capsys):  # noqa: F811
    from tokenizer_families import sentencepiece_mistral

    from wspo.train.cli import main as train_main

    strong = llama_with_tokenizer(tmp_path / "llama_sft", sentencepiece_mistral(tmp_path / "sp"))
    base = train_argv(train_setup, tmp_path / "no", model_name_or_path=strong)
    assert train_main(base) == 1
    assert "--reward_projection chunks" in capsys.readouterr().err

    # Reference log-probs from shards are per token of the shards' tokenizer: not with projection.
    refused = train_argv(train_setup, tmp_path / "no_ref", model_name_or_path=strong, reward_projection="chunks",
                         reference_logps="shards")
    assert train_main(refused) == 1
    assert "with reward projection use --reference_logps model" in capsys.readouterr().err

    out = tmp_path / "out"
    argv = train_argv(train_setup, out, model_name_or_path=strong, reward_projection="chunks", max_steps=30,
                      learning_rate=2e-3)
    assert train_main(argv) == 0
    record = json.loads((out / "wspo_run.json").read_text())
    assert record["data"]["reward_projection"] == "chunks" and record["data"]["train_rows"] > 30
    losses = [h["loss"] for h in record["log_history"] if "loss" in h]
    assert len(losses) == 30
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, (first, last)


def test_rewards_keep_float32_when_inputs_are_cast(train_setup, tmp_path, monkeypatch):  # noqa: F811
    """Under DeepSpeed bf16 the stock Trainer casts float inputs to bf16; weak rewards stay float32."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from wspo.train.trainer import WSPOTrainer

    original = Trainer._prepare_input

    def cast_like_deepspeed(self, data):
        data = original(self, data)
        return data.to(torch.bfloat16) if isinstance(data, torch.Tensor) and data.is_floating_point() else data

    monkeypatch.setattr(Trainer, "_prepare_input", cast_like_deepspeed)
    token_batch, chunk_batch, _ = batches(train_setup)
    policy = AutoModelForCausalLM.from_pretrained(str(train_setup["strong_sft"]), dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True)
    trainer = WSPOTrainer(policy, args, loss="wspo", ref_model=policy, train_dataset=[0])
    for batch in (token_batch, chunk_batch):
        prepared = trainer._prepare_inputs(batch)
        assert prepared["rewards"].dtype == torch.float32 and torch.equal(prepared["rewards"], batch["rewards"])
