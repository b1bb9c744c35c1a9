"""Shared set-up for the phase-two tests (no tests here).

`train_setup` builds, once per session, a tiny strong SFT model (the embedded "strong" size, same
tokenizer as the weak pair) and a small WSPO shard set scored by the conftest's weak models.
Several test modules import the fixture; the files are built under one fixed folder of the
session's temporary directory and reused, so the work happens once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SAMPLES = 48  # dataset rows scored into the shared shard set
SHARD_MAX_LENGTH = 256
SHARD_MAX_PROMPT_LENGTH = 192
TRAIN_MAX_LENGTH = 128  # shorter than the shards': responses (and rewards) are cut, which CPU tests need


def precompute(out: Path, weak_ref: Path | None, weak_aligned: Path | None, samples: int = SAMPLES,
               tokenizer: Path | None = None, slots: str = "chosen", strong_ref: Path | None = None) -> Path:
    from wspo.precompute.cli import main

    argv = ["--dataset", "embedded", "--output_dir", str(out), "--max_samples", str(samples), "--slots", slots,
            "--max_length", str(SHARD_MAX_LENGTH), "--max_prompt_length", str(SHARD_MAX_PROMPT_LENGTH),
            "--backend", "hf", "--dtype", "float32", "--batch_tokens", "4096"]
    if weak_ref:
        argv += ["--weak_ref", str(weak_ref)]
    if weak_aligned:
        argv += ["--weak_aligned", str(weak_aligned)]
    if strong_ref:
        argv += ["--strong_ref", str(strong_ref)]
    if tokenizer:
        argv += ["--tokenizer", str(tokenizer)]
    assert main(argv) == 0
    return out


def build_setup(tiny_models: dict, root: Path) -> dict:
    from wspo.embedded.models import build_model

    root.mkdir(parents=True, exist_ok=True)
    paths = dict(tiny_models)
    paths["strong_sft"] = root / "strong_sft"
    if not (paths["strong_sft"] / "config.json").exists():
        build_model(paths["strong_sft"], tiny_models["tokenizer"], size="strong", seed=0)
    paths["shards"] = root / "shards"
    if not (paths["shards"] / "manifest.json").exists():
        precompute(paths["shards"], tiny_models["weak_ref"], tiny_models["weak_aligned"])
    return paths


@pytest.fixture(scope="session")
def train_setup(tiny_models, tmp_path_factory):
    """{'tokenizer', 'weak_ref', 'weak_aligned', 'strong_sft', 'shards'} -> directories."""
    return build_setup(tiny_models, tmp_path_factory.getbasetemp() / "train_setup")


def train_argv(setup: dict, output_dir: Path, **keys) -> list[str]:
    """wspo-train arguments for a quick CPU run on the shared set-up; keys override."""
    values = {
        "model_name_or_path": setup["strong_sft"],
        "output_dir": output_dir,
        "max_length": TRAIN_MAX_LENGTH,
        "eval_fraction": 0.0,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "max_steps": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": "true",
        "dataloader_pin_memory": "false",
        "disable_tqdm": "true",
        "seed": 0,
    }
    values.update(keys)
    argv = ["--shards", str(values.pop("shards", setup["shards"]))]
    for key, value in values.items():
        argv += [f"--{key}", str(value)]
    return argv
