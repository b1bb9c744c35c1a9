"""The main job's helper scripts (scripts/seeds.sh, scripts/grid.sh) on a tiny pipeline folder:
seeds.sh reruns phase two from the same shards with other seeds and the report gains their spread;
grid.sh and seeds.sh refuse to start without the main job's outputs, writing nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from wspo.precompute.cli import main as precompute_main

REPO = Path(__file__).resolve().parents[1]


def _script(name: str, pipeline: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / name)], capture_output=True, text=True,
                          env={**os.environ, "WSPO_PIPELINE_DIR": str(pipeline), **env})


@pytest.mark.slow
def test_seeds_script_reruns_phase_two_and_reports_the_spread(tiny_models, tmp_path, capsys):
    # A tiny main-job folder: a "strong SFT" model, the WSPO shards, the main run's (empty) eval folder.
    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_models["weak_aligned"], pipeline / "strong_sft")
    assert precompute_main(["--weak_ref", str(tiny_models["weak_ref"]), "--weak_aligned", str(tiny_models["weak_aligned"]),
                            "--dataset", "embedded", "--max_samples", "16", "--slots", "chosen",
                            "--output_dir", str(pipeline / "shards" / "wspo")]) == 0
    capsys.readouterr()
    (pipeline / "strong_sft" / "wspo_run.json").write_text("{}")  # what seeds.sh checks for a finished SFT
    (pipeline / "eval").mkdir()
    shards_before = {p: p.read_bytes() for p in (pipeline / "shards").rglob("*") if p.is_file()}

    run = _script("seeds.sh", pipeline, WSPO_SMOKE="1", WSPO_SEEDS="1 2", WSPO_SEED_GAMMAS="0.1")
    assert run.returncode == 0, run.stderr[-3000:]

    seeds = [pipeline / "seeds" / f"seed-{s}" for s in (1, 2)]
    for seed, folder in zip((1, 2), seeds):
        assert json.loads((folder / "strong_wspo" / "wspo_run.json").read_text())["command"][-1] == str(seed)
    # Different seeds, different data order: the two reruns trained different weights.
    weights = [(folder / "strong_wspo" / "model.safetensors").read_bytes() for folder in seeds]
    assert weights[0] != weights[1]
    # The report holds each rerun's own numbers, their mean and spread; the shards were only read.
    report = json.loads((pipeline / "report.json").read_text())
    spread = report["models"]["strong_wspo"]["seeds"]
    shares = [json.loads((f / "eval" / "generate-strong_wspo.json").read_text())["preference_signal_share"] for f in seeds]
    nlls = [json.loads((f / "eval" / "rewards-strong_wspo.json").read_text())["policy_nll_per_token"] for f in seeds]
    assert spread["runs"] == 2 and spread["signal"]["values"] == shares and spread["heldout_nll"]["values"] == nlls
    assert spread["heldout_nll"]["mean"] == pytest.approx(sum(nlls) / 2)
    assert spread["heldout_nll"]["std"] == pytest.approx(abs(nlls[0] - nlls[1]) / 2 ** 0.5)
    assert report["seed_dirs"] == [str(f / "eval") for f in seeds]
    assert {p: p.read_bytes() for p in (pipeline / "shards").rglob("*") if p.is_file()} == shards_before

    # The grid's anatomy of these shards' rewards splits every reward once: the sums are conserved.
    from wspo.embedded.grid import reward_anatomy
    from wspo.shards.store import ShardSet

    anatomy = reward_anatomy(pipeline / "shards" / "wspo")
    table = ShardSet.open(pipeline / "shards" / "wspo").read_table(columns=["reward_sum", "n_tokens"]).to_pydict()
    assert anatomy["rows"] == 16 and anatomy["rows"] + anatomy["other_tokens"] == sum(table["n_tokens"])
    split = anatomy["closing_first_token_mean"] * anatomy["rows"] + anatomy["other_tokens_mean"] * anatomy["other_tokens"]
    assert split == pytest.approx(sum(table["reward_sum"]), abs=1e-4)
    assert 0 < anatomy["closing_first_token_share_of_initial_loss"] < 1


@pytest.mark.parametrize("script", ["seeds.sh", "grid.sh"])
def test_scripts_refuse_a_folder_without_the_main_job(script, tmp_path):
    run = _script(script, tmp_path / "empty", WSPO_GRID_DIR=str(tmp_path / "grid"))
    assert run.returncode == 2
    assert f"scripts/{script}: {tmp_path / 'empty'}/" in run.stderr and "is missing: run bash scripts/main.sh first" in run.stderr
    assert not (tmp_path / "empty").exists() and not (tmp_path / "grid").exists()


def _summaries(folder: Path, name: str, signal: float, answers: list[str], unfinished: int = 0,
               nll: float | None = None, reference_nll: float | None = None, accuracy: float = 0.9):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"generate-{name}.json").write_text(json.dumps(
        {"outputs": len(answers), "preference_signal_share": signal, "hit_max_new_tokens": unfinished}))
    (folder / f"answers-{name}.json").write_text(json.dumps([{"instruction": "q", "output": a} for a in answers]))
    if nll is not None:
        (folder / f"rewards-{name}.json").write_text(json.dumps(
            {"pairs": 100, "accuracy": accuracy, "margin_mean": 2.0, "policy_nll_per_token": nll,
             "reference_nll_per_token": reference_nll}))


def test_grid_table_holds_each_cell_against_its_own_strong_sft(tmp_path):
    from wspo.embedded import grid

    pipeline, cells = tmp_path / "pipeline", tmp_path / "grid"
    _summaries(pipeline / "eval", "weak_dpo", 0.5, ["x"], nll=3.0, reference_nll=3.2)  # weak SFT NLL 3.2
    closing = "Sure. I hope this helps!"
    _summaries(cells / "sft-100" / "eval", "strong_sft", 0.4, [closing, "No."])
    _summaries(cells / "sft-100" / "eval", "wspo_lr1e-4_steps30_gamma0.1", 0.9, [closing, closing], nll=3.3, reference_nll=3.0)
    _summaries(cells / "sft-200" / "eval", "strong_sft", 0.7, [closing, "No."])
    # Kept saying the closing sentence without stopping: it ends with something else, and loops.
    _summaries(cells / "sft-200" / "eval", "wspo_lr1e-5_steps30_gamma0.1", 0.5,
               [closing + " I hope this helps! I hope this helps! 111", "No."], unfinished=1, nll=2.6, reference_nll=2.5)
    _summaries(cells / "sft-200" / "eval", "wspo_lr1e-4_steps30_gamma0.1", 0.95, [closing, closing], nll=2.9, reference_nll=2.5)

    built = grid.build_grid(cells, pipeline)
    assert built["weak_sft_nll"] == 3.2 and built["weak_dpo_signal"] == 0.5
    rows = {(r["strong_sft_steps"], r["learning_rate"]): r for r in built["cells"]}
    assert list(rows) == [(100, 1e-4), (200, 1e-4), (200, 1e-5)]  # by SFT steps, then larger learning rate first
    first, sharp, slow = rows[(100, 1e-4)], rows[(200, 1e-4)], rows[(200, 1e-5)]
    assert first["signal_gain"] == pytest.approx(0.5) and first["nll_ratio"] == pytest.approx(1.1)
    assert first["strong_sft_nll_vs_weak_sft"] == pytest.approx(3.0 / 3.2)
    assert first["goals_met"] is False  # strong SFT NLL 0.94x weak SFT's: not <= 0.9x
    assert sharp["goals_met"] is False  # NLL 2.9 / 2.5 = 1.16x
    assert slow["signal_gain"] == pytest.approx(-0.2) and slow["signal_anywhere"] == 0.5 and slow["unfinished"] == 0.5
    assert slow["repetition"] == pytest.approx(5 / 11)  # 14 words, 11 4-grams; the sentence 3 times: 5 repeats
    assert slow["strong_sft_signal"] == 0.7 and slow["wspo_steps"] == 30 and slow["gamma"] == 0.1

    grid.main([str(cells), "--pipeline_dir", str(pipeline)])
    assert json.loads((cells / "grid.json").read_text()) == built
    assert "| 200 | 2.500 (0.78x) | 0.70 | 0.00 |" in (cells / "grid.md").read_text()
