"""Model limits and damaged model folders fail early with the toolkit's own message."""

from __future__ import annotations

import json
import shutil

import pytest

from wspo.precompute.cli import main as precompute_main


def argv(tiny_models, out, ref=None, *extra) -> list[str]:
    return ["--output_dir", str(out), "--weak_ref", str(ref or tiny_models["weak_ref"]),
            "--weak_aligned", str(tiny_models["weak_aligned"]), "--max_samples", "4", *extra]


def test_max_length_beyond_the_models_positions(tiny_models, tmp_path, capsys):
    positions = json.loads((tiny_models["weak_ref"] / "config.json").read_text())["max_position_embeddings"]
    for backend in ("hf", "vllm"):  # the check runs before either backend starts
        status = precompute_main(argv(tiny_models, tmp_path / backend, None, "--max_length", str(positions + 1),
                                      "--max_prompt_length", "64", "--backend", backend))
        err = capsys.readouterr().err
        assert status == 1
        assert f"max_length {positions + 1} exceeds the {positions} positions of model" in err and "Traceback" not in err
        assert not (tmp_path / backend / "manifest.json").exists()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "is truncated"), ("remove", "holds no weights"), ("tokenizer", "tokenizer.json does not parse"),
])
def test_damaged_model_folders_are_named(damage, message, tiny_models, tmp_path, capsys):
    ref = tmp_path / "ref"
    shutil.copytree(tiny_models["weak_ref"], ref)
    weights = ref / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "remove":
        weights.unlink()
    else:
        (ref / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    status = precompute_main(argv(tiny_models, tmp_path / "out", ref, "--max_length", "256", "--max_prompt_length", "128"))
    err = capsys.readouterr().err
    assert status == 1 and message in err and "Traceback" not in err, err


def test_engine_settings_checked_up_front(tiny_models, tmp_path, capsys):
    status = precompute_main(argv(tiny_models, tmp_path / "out", None, "--backend", "vllm", "--gpu_memory_utilization", "1.5"))
    err = capsys.readouterr().err
    assert status == 1 and "gpu_memory_utilization must be in (0, 1]" in err
    status = precompute_main(argv(tiny_models, tmp_path / "out", None, "--backend", "vllm", "--kv_cache_memory_bytes", "0"))
    err = capsys.readouterr().err
    assert status == 1 and "kv_cache_memory_bytes must be positive (got 0)" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_eval_engine_settings_checked_up_front(tiny_models, tmp_path, capsys):
    from wspo.evaluation.cli import main as eval_main

    status = eval_main(["generate", "--model", str(tiny_models["weak_ref"]), "--dataset", "embedded", "--backend", "vllm",
                        "--kv_cache_memory_bytes", "-1", "--output_file", str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert status == 1 and "kv_cache_memory_bytes must be positive (got -1)" in err and "Traceback" not in err
    assert not (tmp_path / "out.json").exists()
