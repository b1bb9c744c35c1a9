"""Command-line and YAML-recipe key parsing shared by every wspo-* command (common/args.py)."""

from __future__ import annotations

import pytest

from wspo.args import parse_config
from wspo.evaluation.cli import main as eval_main
from wspo.extrapolate.cli import main as extrapolate_main
from wspo.precompute.cli import main as precompute_main
from wspo.shards.cli import main as shards_main
from wspo.train.cli import main as train_main
from wspo.train.config import WSPOArguments
from wspo.train.export import main as export_main
from transformers import TrainingArguments

EVERY_COMMAND = {
    "wspo-precompute": (precompute_main, ["--output_dir", "o"]),
    "wspo-train": (train_main, ["--model_name_or_path", "m", "--shards", "s"]),
    "wspo-eval rewards": (eval_main, ["rewards", "--policy", "p"]),
    "wspo-eval generate": (eval_main, ["generate", "--model", "m", "--output_file", "o"]),
    "wspo-extrapolate": (extrapolate_main, ["--sft", "a", "--aligned", "b", "--alpha", "0.3", "--output_dir", "o"]),
    "wspo-export": (export_main, ["--adapter", "a", "--output_dir", "o"]),
    "wspo-shards info": (shards_main, ["info", "x"]),
}


def _train(argv):
    return parse_config([WSPOArguments, TrainingArguments], argv)


def usage_error(main, argv, capsys) -> str:
    """The stderr of `main(argv)`, which must stop with argparse's usage error (exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(EVERY_COMMAND))
def test_unknown_key_is_a_usage_error_in_every_command(command, capsys):
    main, argv = EVERY_COMMAND[command]
    assert "--no_such_key" in usage_error(main, argv + ["--no_such_key", "1"], capsys)


@pytest.mark.parametrize("command", ["wspo-train", "wspo-extrapolate", "wspo-export"])
def test_prefix_of_a_key_is_not_accepted(command, capsys):
    main, argv = EVERY_COMMAND[command]
    abbreviated = {"wspo-train": ["--gamm", "0.5"], "wspo-extrapolate": ["--overwr"], "wspo-export": ["--dtyp", "auto"]}
    assert abbreviated[command][0] in usage_error(main, argv + abbreviated[command], capsys)


def test_gamm_is_not_gamma(capsys):
    err = usage_error(_train, ["--model_name_or_path", "m", "--shards", "s", "--gamm", "0.5"], capsys)
    assert "unrecognized arguments: --gamm 0.5" in err


def test_recipe_values_are_typed_and_command_line_wins(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\nshards: s\ngamma: 1\nmax_steps: 7\nbf16: false\n")
    args, training_args = _train([str(recipe), "--max_steps", "9"])
    assert args.gamma == 1.0 and isinstance(args.gamma, float)
    assert training_args.max_steps == 9


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model_name_or_path: m\nshards: s\ngamma: [0.5\nmax_steps: 3\n")
    err = usage_error(_train, [str(recipe)], capsys)
    assert f"config file {recipe} line " in err
    assert "Traceback" not in err and len(err.strip().splitlines()[-1]) < 300


@pytest.mark.parametrize("line, key", [("gamma: [0.5]", "gamma"), ('max_steps: "ten"', "max_steps"),
                                       ("max_steps: 0.5", "max_steps"), ("loss: [sft]", "loss"),
                                       ("gamma: {a: 1}", "gamma")])
def test_wrong_type_in_recipe_names_file_and_key(tmp_path, capsys, line, key):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name_or_path: m\nshards: s\n{line}\n")
    last = usage_error(_train, [str(recipe)], capsys).strip().splitlines()[-1]
    assert f"config file {recipe}: key {key}:" in last
