"""Tiny local models for the embedded default and the tests: no model hub needed.

A byte-level BPE tokenizer is trained on the bundled sample with a ChatML chat template (the
Qwen2 family's), and Qwen2-architecture models get random weights from a config. Attention heads
are 64 wide because vLLM's CPU attention kernel rejects narrower ones.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Model sizes: "weak" ~0.6M parameters with tied embeddings (like Qwen2-1.5B), "strong" ~3M
# with an untied head (like Qwen2-7B).
SIZES = {
    "weak": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "strong": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False),
}


def sample_texts() -> list[str]:
    """Every prompt and response of the bundled sample's training split, in file order."""
    from wspo.embedded.sample import SAMPLE_DIR

    texts = []
    with open(SAMPLE_DIR / "train_prefs.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            for conversation in (row["chosen"], row["rejected"]):
                texts += [m["content"] for m in conversation]
    return texts


def build_tokenizer(out_dir: str | Path, vocab_size: int = 2048, texts: list[str] | None = None):
    """Train a byte-level BPE tokenizer (fast, with offsets) and save it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else sample_texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_model(out_dir: str | Path, tokenizer_dir: str | Path, size: str = "weak", seed: int = 0,
                max_position_embeddings: int = 4096):
    """A Qwen2 model with random weights (seeded) and the tokenizer copied beside it."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        head_dim=64,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    # Beside a Qwen2 config, AutoTokenizer builds the Qwen2 tokenizer class (NFC normaliser, Qwen2
    # pre-tokenizer regex) around our vocabulary; save that one, so the files say what users get.
    AutoTokenizer.from_pretrained(str(out_dir)).save_pretrained(str(out_dir))
    return model


def perturb_model(src_dir: str | Path, out_dir: str | Path, scale: float = 0.02, seed: int = 1):
    """A copy of a model with seeded Gaussian noise on every weight: a stand-in 'aligned' model
    whose log-probs differ from its source, for tests that need two related scorers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src_dir), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(src_dir)).save_pretrained(str(out_dir))
    return model


def build_weak_pair(root: str | Path) -> dict[str, Path]:
    """tokenizer/, weak_ref/ and weak_aligned/ under `root` (reused when already built)."""
    root = Path(root)
    paths = {name: root / name for name in ("tokenizer", "weak_ref", "weak_aligned")}
    if not (paths["tokenizer"] / "tokenizer.json").exists():
        build_tokenizer(paths["tokenizer"])
    if not (paths["weak_ref"] / "config.json").exists():
        build_model(paths["weak_ref"], paths["tokenizer"], "weak", seed=0)
    if not (paths["weak_aligned"] / "config.json").exists():
        perturb_model(paths["weak_ref"], paths["weak_aligned"])
    return paths


def build_embedded(root: str | Path) -> dict[str, Path]:
    """The embedded default's models under `root`: the weak pair and a larger strong SFT model
    sharing their tokenizer (reused when already built)."""
    paths = build_weak_pair(root)
    paths["strong_sft"] = Path(root) / "strong_sft"
    if not (paths["strong_sft"] / "config.json").exists():
        build_model(paths["strong_sft"], paths["tokenizer"], "strong", seed=0)
    return paths


def build_bases(root: str | Path) -> dict[str, Path]:
    """Untrained starting points for the whole pipeline (scripts/pipeline.sh): the tokenizer, a
    weak base and a strong base with random weights, which the pipeline itself SFTs."""
    root = Path(root)
    paths = {name: root / name for name in ("tokenizer", "weak_base", "strong_base")}
    if not (paths["tokenizer"] / "tokenizer.json").exists():
        build_tokenizer(paths["tokenizer"])
    for name, size in (("weak_base", "weak"), ("strong_base", "strong")):
        if not (paths[name] / "config.json").exists():
            build_model(paths[name], paths["tokenizer"], size, seed=0)
    return paths


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the tiny local models of the embedded default.")
    parser.add_argument("root", nargs="?", default="outputs/embedded/models")
    parser.add_argument("--bases", action="store_true",
                        help="untrained weak and strong bases for scripts/pipeline.sh, instead of "
                             "weak_ref / weak_aligned / strong_sft stand-ins")
    cli = parser.parse_args()
    for name, path in (build_bases if cli.bases else build_embedded)(cli.root).items():
        print(f"{name}: {path}")
