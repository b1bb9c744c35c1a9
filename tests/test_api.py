"""The Python API (docs/api.md): the CLIs' twin, with the same keys, checks and messages."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import wspo
from wspo.errors import ConfigError, InputPathError, WspoError
from wspo.shards.store import ShardError

ROOT = Path(__file__).resolve().parents[1]


def precompute_keys(tiny_models, out: Path, **keys) -> dict:
    values = {"dataset": "embedded", "max_samples": 6, "weak_ref": tiny_models["weak_ref"],
              "weak_aligned": tiny_models["weak_aligned"], "output_dir": out, "max_length": 192,
              "dtype": "float32", "disable_tqdm": True}
    values.update(keys)
    return values


def as_argv(keys: dict) -> list[str]:
    return [str(x) for key, value in keys.items() for x in (f"--{key}", value)]


# DeepSpeed logs a line on stdout when first imported (here by the example's own model building,
# before any API call): import it first, then count what comes after the marker.
PREFIX = "import deepspeed\nprint('--- imports done')\n"
REPORT = """
import json, math
assert not shards.verify()
print(json.dumps({"rows": shards.num_rows, "lengths": shards.manifest["lengths"],
                  "results": {name: {"loss": r.metrics["train_loss"], "output_dir": str(r.output_dir),
                                     "summary": r.summary, "run_shards": r.record["shards"]} for name, r in results.items()}}))
"""


@pytest.mark.slow
def test_worked_example(tmp_path):
    """docs/api.md's example, run as written in a script of its own: one precompute, two strong
    models from it; its stdout holds the example's own lines and nothing else."""
    code = re.search(r"## Worked example.*?```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S).group(1)
    result = subprocess.run([sys.executable, "-c", PREFIX + code + REPORT], cwd=tmp_path, capture_output=True, text=True,
                            timeout=900, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("--- imports done\n", 1)[1].splitlines()
    report = json.loads(lines[-1])
    assert len(lines) == 4, result.stdout  # the example's three prints and the report: the API printed nothing
    assert lines[0].startswith(f"{report['rows']} rows; reward per token") and report["rows"] == 32
    assert report["lengths"]["max_prompt_length"] == 128  # follows max_length 256
    results = report["results"]
    assert set(results) == {"strong_a", "strong_b"}
    losses = [r["loss"] for r in results.values()]
    assert all(math.isfinite(x) for x in losses) and losses[0] != losses[1]  # two models really trained
    for name, r in results.items():
        out = Path(r["output_dir"])
        assert out == (tmp_path / "outputs" / "api" / name).resolve() and (out / "model.safetensors").exists()
        assert json.loads((out / "wspo_run.json").read_text())["shards"] == r["run_shards"]
        assert "saved to" in r["summary"]
        assert lines[1 + list(results).index(name)].startswith(f"{name} {r['loss']}")


def test_api_equals_cli_with_a_recipe(tiny_models, tmp_path, capsys):
    """A recipe as the first argument plus keys that override it: the API writes the same bytes
    as the command line given the same recipe and keys."""
    from wspo.precompute.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"dataset: embedded\nweak_ref: {tiny_models['weak_ref']}\nweak_aligned: {tiny_models['weak_aligned']}\n"
                      "max_samples: 99\nmax_length: 160\ndtype: float32\noutput_dir: /nonexistent/overridden\n")
    keys = {"max_samples": 5, "rows_per_file": 2, "disable_tqdm": True}
    assert main([str(recipe), *as_argv({**keys, "output_dir": tmp_path / "cli"})]) == 0
    cli_out = capsys.readouterr().out
    assert "max_prompt_length 80 (default: half of max_length)" in cli_out

    shards = wspo.precompute(recipe, output_dir=tmp_path / "api", **keys)
    assert capsys.readouterr().out == ""  # nothing on stdout from the API
    cli = wspo.load_shards(tmp_path / "cli")
    assert shards.num_rows == cli.num_rows >= 4 and len(shards.files) == len(cli.files) >= 2
    assert [f["sha256"] for f in shards.files] == [f["sha256"] for f in cli.files]
    assert shards.manifest["tokenizer"] == cli.manifest["tokenizer"]


def test_shard_set_rows_dataset_and_verification(tiny_models, tmp_path):
    shards = wspo.precompute(**precompute_keys(tiny_models, tmp_path / "s", rows_per_file=4))
    table = shards.read_table()
    rows = list(shards.rows(batch_size=3))
    assert [r["id"] for r in rows] == table["id"].to_pylist()
    assert [r["reward_sum"] for r in rows] == table["reward_sum"].to_pylist()
    assert list(shards.rows(columns=["id"])) == [{"id": i} for i in table["id"].to_pylist()]
    assert list(shards.rows(slots=["rejected"])) == []

    dataset = shards.to_dataset(cache_dir=tmp_path / "cache")
    assert dataset.num_rows == table.num_rows and dataset.cache_files  # Arrow files, memory-mapped
    assert dataset["reward_sum"] == table["reward_sum"].to_pylist()
    assert dataset[0]["token_ids"] == table["token_ids"][0].as_py()

    part = tmp_path / "s" / shards.files[0]["path"]
    part.write_bytes(part.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ShardError, match=re.escape(f"{part}: sha256 does not match")):
        wspo.load_shards(tmp_path / "s")
    with pytest.raises(ShardError, match="no such shard directory"):
        wspo.load_shards(tmp_path / "missing")


def test_errors_carry_the_cli_messages(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match=re.escape("unknown key(s) gama (gama: did you mean gamma?)")):
        wspo.train(model_name_or_path="m", shards=["s"], output_dir=tmp_path / "t", gama=0.1)
    with pytest.raises(ConfigError, match=re.escape("key max_steps: invalid int value 'ten'")):
        wspo.train(model_name_or_path="m", shards=["s"], output_dir=tmp_path / "t", max_steps="ten")
    with pytest.raises(ConfigError, match=re.escape("gamma must be finite and positive, got -1.0")):
        wspo.train(model_name_or_path="m", shards=["s"], output_dir=tmp_path / "t", gamma=-1)
    with pytest.raises(ConfigError, match=re.escape("max_prompt_length (300) must be below max_length (256)")):
        wspo.precompute(**precompute_keys(tiny_models, tmp_path / "p", max_length=256, max_prompt_length=300))
    with pytest.raises(ConfigError, match="the following arguments are required: --output_dir"):
        wspo.precompute(weak_ref=tiny_models["weak_ref"])
    with pytest.raises(InputPathError, match="weak_ref: .*is not a model directory") as e:
        wspo.precompute(**precompute_keys(tiny_models, tmp_path / "p", weak_ref=tmp_path / "nope"))
    assert isinstance(e.value, WspoError) and isinstance(e.value, FileNotFoundError)
    with pytest.raises(WspoError, match="give at least one --alpha|alpha"):
        wspo.extrapolate(sft=tiny_models["weak_ref"], aligned=tiny_models["weak_aligned"], output_dir=tmp_path / "x")
    with pytest.raises(WspoError, match="give exactly one of dataset"):
        wspo.evaluate_rewards(policy=tiny_models["weak_aligned"], reference=tiny_models["weak_ref"])
    assert not (tmp_path / "p").exists() and not (tmp_path / "t").exists()


def test_extrapolate_and_evaluate_rewards(tiny_models, tmp_path, capsys):
    summary = wspo.extrapolate(sft=tiny_models["weak_ref"], aligned=tiny_models["weak_aligned"], alpha=[0.3],
                               output_dir=tmp_path / "expo", out_dtype="float32", disable_tqdm=True)
    assert [Path(d) for d in summary.output_dirs] == [tmp_path / "expo" / "alpha-0.3"]
    assert (tmp_path / "expo" / "alpha-0.3" / "config.json").exists()
    result = wspo.evaluate_rewards(policy=summary.output_dirs[0], reference=tiny_models["weak_ref"], dataset="embedded",
                                   dataset_split="test_prefs", max_samples=4, max_length=192, max_prompt_length=96,
                                   dtype="float32", output_file=tmp_path / "eval.json", disable_tqdm=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "scoring" not in captured.err  # no stdout; bars off
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(json.dumps(result))
    assert result["pairs"] == 4


CHECKS = """
import importlib, sys
order = sys.argv[1]
if order == "module-first":
    import wspo.precompute.cli, wspo.train.cli, wspo.extrapolate.cli
    import wspo
else:
    import wspo
    assert callable(wspo.precompute) and callable(wspo.train) and callable(wspo.extrapolate)
    import wspo.precompute.cli, wspo.train.cli, wspo.extrapolate.cli
from wspo.precompute.config import PrecomputeArguments
from wspo import precompute, train
assert precompute is sys.modules["wspo.precompute"] and callable(precompute) and callable(train)
assert wspo.precompute.cli.main and wspo.extrapolate.extrapolate  # the subpackages are still packages
try:
    wspo.precompute(output_dir="x", gama=1)
except wspo.WspoError as e:
    print(type(e).__name__, e)
"""


@pytest.mark.parametrize("order", ["module-first", "api-first"])
def test_callable_subpackages(order):
    """`wspo.precompute(...)` is the API and `import wspo.precompute.cli` the subpackage, in either order."""
    result = subprocess.run([sys.executable, "-c", CHECKS, order], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ConfigError unknown key(s) gama"


def test_import_wspo_stays_light():
    result = subprocess.run([sys.executable, "-c", "import sys, wspo; wspo.WspoError; print('torch' in sys.modules)"],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-2000:]


def test_phase_imports_leave_optional_backends_out():
    """A wspo-train or wspo-precompute process starts with what the Trainer and the scorers need
    (a ~515 MB floor that `transformers.trainer`'s own imports set, TRL's the same) and no optional
    backend: vLLM, Ray, s3fs, matplotlib, DeepSpeed, TRL each cost start-up time and memory and
    are imported only by the run that uses them (docs/benchmarks.md, issue 18's memory breakdown)."""
    code = ("import sys, wspo.train.cli, wspo.train.pipeline, wspo.precompute.cli, wspo.precompute.pipeline\n"
            "print(sorted(m for m in ('vllm', 'ray', 's3fs', 'matplotlib', 'deepspeed', 'trl') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
