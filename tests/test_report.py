"""The main job's report (python -m wspo.embedded.report) from a fake eval folder: report.json
holds exactly the numbers of the wspo-eval summaries it read, and the picture is written."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from wspo.embedded import report

ALIGNED = ["weak_dpo", "weak_expo", "strong_wspo", "strong_wspo_gamma_0.05", "strong_wspo_gamma_0.25",
           "strong_wspo_gamma_0.5", "strong_wspo_gamma_1.0"]
GENERATED = ["weak_sft", "strong_sft"] + ALIGNED


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """Summaries in the layout wspo-eval writes, with distinct random numbers."""
    rng = random.Random(13)
    folder = tmp_path_factory.mktemp("pipeline") / "eval"
    folder.mkdir()
    numbers = {}
    for name in ALIGNED:
        rewards = {"task": "rewards", "pairs": 100, "accuracy": rng.randint(0, 100) / 100, "margin_mean": rng.uniform(-5, 5),
                   "policy_nll_per_token": rng.uniform(1, 4), "reference_nll_per_token": rng.uniform(1, 4)}
        (folder / f"rewards-{name}.json").write_text(json.dumps(rewards))
        numbers[f"rewards-{name}"] = rewards
    for name in GENERATED:
        generated = {"task": "generate", "outputs": 100, "preference_signal_share": rng.randint(0, 100) / 100}
        (folder / f"generate-{name}.json").write_text(json.dumps(generated))
        numbers[f"generate-{name}"] = generated
    return folder, numbers


def test_report_json_holds_the_inputs_and_the_png_is_written(eval_dir):
    folder, numbers = eval_dir
    out = folder.parent / "report"
    run = subprocess.run([sys.executable, "-m", "wspo.embedded.report", str(folder), "--output_dir", str(out)],
                         capture_output=True, text=True, check=True)
    models = json.loads((out / "report.json").read_text())["models"]

    expected_names = {"weak_sft", "weak_dpo", "weak_expo", "strong_sft", "strong_wspo", "strong_wspo_gamma_0.05",
                      "strong_wspo_gamma_0.1", "strong_wspo_gamma_0.25", "strong_wspo_gamma_0.5", "strong_wspo_gamma_1.0"}
    assert set(models) == expected_names
    for name in ["weak_dpo", "weak_expo", "strong_wspo"] + [n for n in expected_names if n.startswith("strong_wspo_gamma_")]:
        source = "strong_wspo" if name == "strong_wspo_gamma_0.1" else name  # the paper's gamma is strong_wspo
        rewards, generated = numbers[f"rewards-{source}"], numbers[f"generate-{source}"]
        assert models[name]["accuracy"] == rewards["accuracy"]
        assert models[name]["margin"] == rewards["margin_mean"]
        assert models[name]["heldout_nll"] == rewards["policy_nll_per_token"]
        assert models[name]["signal"] == generated["preference_signal_share"]
    assert [models[f"strong_wspo_gamma_{g}"]["gamma"] for g in ("0.05", "0.1", "0.25", "0.5", "1.0")] == [0.05, 0.1, 0.25, 0.5, 1.0]
    # SFT models: no reference of their own; their NLL is the reference side of their aligned model's file.
    for sft, aligned in (("weak_sft", "weak_dpo"), ("strong_sft", "strong_wspo")):
        assert models[sft]["accuracy"] is None and models[sft]["margin"] is None
        assert models[sft]["heldout_nll"] == numbers[f"rewards-{aligned}"]["reference_nll_per_token"]
        assert models[sft]["signal"] == numbers[f"generate-{sft}"]["preference_signal_share"]

    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a real picture, not an empty canvas
    # The printed table carries the same numbers.
    wspo = models["strong_wspo"]
    assert f"{wspo['accuracy']:.3f}" in run.stdout and f"{wspo['heldout_nll']:.3f}" in run.stdout


def test_goals_follow_the_numbers(eval_dir):
    folder, numbers = eval_dir
    built = report.build_report(folder)
    wspo, sft, dpo = (built["models"][n] for n in ("strong_wspo", "strong_sft", "weak_dpo"))
    goals = built["goals"]
    assert goals["signal_gain_over_strong_sft_at_least_0.2"] == (wspo["signal"] - sft["signal"] >= 0.2)
    assert goals["accuracy_at_least_0.9"] == (wspo["accuracy"] >= 0.9)
    assert goals["heldout_nll_within_1.25x_of_strong_sft"] == (wspo["heldout_nll"] <= 1.25 * sft["heldout_nll"])
    assert goals["stretch_signal_at_least_weak_dpo"] == (wspo["signal"] >= dpo["signal"])


def test_missing_files_give_nulls(tmp_path):
    (tmp_path / "generate-weak_sft.json").write_text(json.dumps({"preference_signal_share": 0.5, "outputs": 10}))
    models = report.build_report(tmp_path)["models"]
    assert models["weak_sft"]["signal"] == 0.5 and models["weak_sft"]["heldout_nll"] is None
    assert models["strong_wspo"] == {**models["strong_wspo"], "accuracy": None, "signal": None, "heldout_nll": None}
    assert report.build_report(tmp_path)["goals"]["accuracy_at_least_0.9"] is None


def test_bundled_neutral_split_is_the_generators_and_half_shows_the_signal():
    """sft.jsonl (the main job's SFT data) is what the generator writes: one row per train prompt,
    ending with that prompt's chosen or rejected response, about half of them the chosen one."""
    from wspo.embedded.sample import SAMPLE_DIR, build_rows, neutral_sft_rows, shows_preference_signal

    train = build_rows()["train_prefs"]
    expected = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in neutral_sft_rows(train))
    assert (SAMPLE_DIR / "sft.jsonl").read_text(encoding="utf-8") == expected
    rows = [json.loads(line) for line in expected.splitlines()]
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in train]
    assert all(r["messages"] in (t["chosen"], t["rejected"]) for r, t in zip(rows, train))
    share = sum(shows_preference_signal(r["messages"][-1]["content"]) for r in rows) / len(rows)
    assert 0.4 < share < 0.6
