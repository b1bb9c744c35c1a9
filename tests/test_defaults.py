"""Defaults that fit the model, and mistakes that are caught (docs/precompute.md "Lengths")."""

from __future__ import annotations

import json
import shutil

import pytest
from test_cli_args import usage_error

from wspo.precompute.cli import main as precompute_main


def argv(tiny_models, out, *extra, ref=None, aligned=None) -> list[str]:
    return ["--output_dir", str(out), "--weak_ref", str(ref or tiny_models["weak_ref"]),
            "--weak_aligned", str(aligned or tiny_models["weak_aligned"]), "--max_samples", "3",
            "--dtype", "float32", "--disable_tqdm", "true", *extra]


@pytest.fixture(scope="module")
def short_model(tiny_models, tmp_path_factory):
    """The weak reference model with a config of 300 positions (same weights otherwise)."""
    from wspo.embedded.models import build_model

    out = tmp_path_factory.mktemp("short") / "weak_ref_300"
    build_model(out, tiny_models["tokenizer"], "weak", seed=0, max_position_embeddings=300)
    return out


def test_unset_max_length_follows_the_smallest_scorer(tiny_models, short_model, tmp_path, capsys):
    assert precompute_main(argv(tiny_models, tmp_path / "s", ref=short_model)) == 0
    out = capsys.readouterr().out
    assert ("max_length 300 (default: the 300 positions of weak_ref (min(4096, the smallest scorer's "
            "max_position_embeddings))); max_prompt_length 150 (default: half of max_length)") in out
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["lengths"]["max_length"] == manifest["tokenizer"]["max_length"] == 300
    assert manifest["tokenizer"]["max_prompt_length"] == 150


def test_explicit_lengths(tiny_models, short_model, tmp_path, capsys):
    # max_length alone: max_prompt_length follows it (half), no contradiction with a default.
    assert precompute_main(argv(tiny_models, tmp_path / "a", "--max_length", "256")) == 0
    assert "max_length 256 (set); max_prompt_length 128 (default: half of max_length)" in capsys.readouterr().out
    # Both explicit and contradictory: an error naming both, nothing written.
    assert precompute_main(argv(tiny_models, tmp_path / "b", "--max_length", "256", "--max_prompt_length", "256")) == 1
    assert "max_prompt_length (256) must be below max_length (256)" in capsys.readouterr().err
    # An explicit max_length over the model's positions stays an error.
    assert precompute_main(argv(tiny_models, tmp_path / "c", "--max_length", "301", ref=short_model)) == 1
    assert "max_length 301 exceeds the 300 positions of model" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c" / "manifest.json").exists()


def test_same_weak_model_twice_warns_and_strict_refuses(tiny_models, tmp_path, capsys):
    copy = tmp_path / "copy_of_weak_ref"
    shutil.copytree(tiny_models["weak_ref"], copy)  # another folder, identical files
    assert precompute_main(argv(tiny_models, tmp_path / "w", "--max_length", "256", aligned=copy)) == 0
    captured = capsys.readouterr()
    assert "wspo-precompute: warning: weak_ref" in captured.err and "have identical config and weight files" in captured.err
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert manifest["reward"]["token_std"] == 0.0 and manifest["reward"]["token_mean"] == 0.0

    status = precompute_main(argv(tiny_models, tmp_path / "strict", "--max_length", "256", "--strict", "true",
                                  aligned=tiny_models["weak_ref"]))
    err = capsys.readouterr().err
    assert status == 1 and "name the same model: every reward would be exactly 0" in err and "(refused in strict mode)" in err
    assert not (tmp_path / "strict" / "manifest.json").exists() and not list((tmp_path / "strict").glob("data/*"))

    # Two different models: no warning.
    assert precompute_main(argv(tiny_models, tmp_path / "ok", "--max_length", "256")) == 0
    assert "warning" not in capsys.readouterr().err


COMMANDS = [
    ("wspo.precompute.cli", ["--output_dir", "o", "--gama", "0.1"], "--gama: did you mean --gamma?", False),
    ("wspo.precompute.cli", ["--output_dir", "o", "--max_lenght", "8"], "--max_lenght: did you mean --max_length?", True),
    ("wspo.train.cli", ["--model_name_or_path", "m", "--shards", "s", "--output_dir", "o", "--gama", "0.1"],
     "--gama: did you mean --gamma?", True),
    ("wspo.extrapolate.cli", ["--sft", "a", "--aligned", "b", "--alpha", "0.3", "--output_dir", "o", "--alpah", "1"],
     "--alpah: did you mean --alpha?", True),
    ("wspo.evaluation.cli", ["rewards", "--policy", "p", "--bta", "1"], "--bta: did you mean --beta?", True),
    ("wspo.shards.cli", ["verify", "x", "--quik"], "--quik: did you mean --quick?", True),
    ("wspo.train.export", ["--adapter", "a", "--output_dir", "o", "--dtyp", "float32"], "--dtyp: did you mean --dtype?", True),
]


@pytest.mark.parametrize("module, args, hint, expected", COMMANDS)
def test_unknown_key_suggests_the_nearest(module, args, hint, expected, capsys):
    import importlib

    err = usage_error(importlib.import_module(module).main, args, capsys)
    assert "unrecognized arguments: " in err
    assert (hint in err) == expected, err  # precompute has no gamma: no suggestion then


def test_unknown_recipe_key_suggests_the_nearest(tmp_path, capsys):
    from wspo.train.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\nshards: [s]\noutput_dir: o\ngama: 0.1\n")
    err = usage_error(main, [str(recipe)], capsys)
    assert f"config file {recipe}: unknown key(s) gama (gama: did you mean gamma?)" in err
