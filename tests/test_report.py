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
    assert goals["heldout_nll_within_1.10x_of_strong_sft"] == (wspo["heldout_nll"] <= 1.10 * sft["heldout_nll"])
    weak_sft = built["models"]["weak_sft"]
    assert goals["strong_sft_nll_at_most_0.9x_weak_sft"] == (sft["heldout_nll"] <= 0.9 * weak_sft["heldout_nll"])
    assert goals["weak_dpo_signal_above_weak_sft"] == (dpo["signal"] > weak_sft["signal"])
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


def test_repeated_4gram_share_counts_repeats_within_each_answer():
    answers = ["a b c d a b c d",  # 5 4-grams, the last repeats the first
               "I hope this helps! I hope this helps! I hope this helps!",  # 9 4-grams, period 4: 5 repeats
               "too short",  # no 4-gram
               "one two three four five"]  # 2 4-grams, none repeated
    assert report.repeated_ngram_share(answers) == pytest.approx(6 / 16)
    # Repeats across answers are not repeats: the same sentence in two answers is fluent.
    assert report.repeated_ngram_share(["w x y z", "w x y z"]) == 0.0
    assert report.repeated_ngram_share(["a b c"]) is None


def _write_run(folder, signal: float, accuracy: float, nll: float, answers: list[str], names=("strong_wspo",)):
    folder.mkdir(parents=True)
    for name in names:
        (folder / f"rewards-{name}.json").write_text(json.dumps(
            {"pairs": 100, "accuracy": accuracy, "margin_mean": 1.0, "policy_nll_per_token": nll, "reference_nll_per_token": 3.0}))
        (folder / f"generate-{name}.json").write_text(json.dumps({"outputs": len(answers), "preference_signal_share": signal}))
        (folder / f"answers-{name}.json").write_text(json.dumps([{"instruction": "q", "output": a} for a in answers]))


def test_report_reads_repetition_from_the_answers_and_seeds_give_mean_and_spread(tmp_path):
    loop = "I hope this helps! I hope this helps!"  # 5 4-grams, 1 repeat
    _write_run(tmp_path / "eval", 0.9, 0.95, 3.1, [loop, "one two three four"])
    (tmp_path / "eval" / "generate-weak_sft.json").write_text(json.dumps({"outputs": 2, "preference_signal_share": 0.25}))
    _write_run(tmp_path / "seed-1" / "eval", 0.7, 0.90, 3.3, [loop, loop])
    _write_run(tmp_path / "seed-2" / "eval", 0.8, 1.00, 3.2, ["a b c d e"])

    seeds = [tmp_path / "seed-1" / "eval", tmp_path / "seed-2" / "eval"]
    built = report.build_report(tmp_path / "eval", seeds)
    wspo = built["models"]["strong_wspo"]
    assert wspo["repetition"] == pytest.approx(1 / 6)  # the main run's answers
    spread = wspo["seeds"]
    assert spread["runs"] == 3
    assert spread["signal"]["values"] == [0.9, 0.7, 0.8]
    assert spread["signal"]["mean"] == pytest.approx(0.8) and spread["signal"]["std"] == pytest.approx(0.1)
    assert spread["accuracy"]["mean"] == pytest.approx(0.95) and spread["accuracy"]["std"] == pytest.approx(0.05)
    assert spread["heldout_nll"]["mean"] == pytest.approx(3.2) and spread["heldout_nll"]["std"] == pytest.approx(0.1)
    assert spread["repetition"]["values"] == pytest.approx([1 / 6, 2 / 10, 0.0])
    # A model the seed reruns do not retrain has one run and no spread (not a spread of zero).
    assert built["models"]["weak_sft"]["seeds"]["runs"] == 1
    assert built["models"]["weak_sft"]["seeds"]["signal"] == {"values": [0.25], "mean": 0.25, "std": None}
    assert built["models"]["weak_dpo"]["seeds"]["runs"] == 0
    assert built["models"]["strong_sft"]["seeds"]["runs"] == 1  # its NLL in a rerun's folder is not a rerun

    run = subprocess.run([sys.executable, "-m", "wspo.embedded.report", str(tmp_path / "eval"), "--seeds", *map(str, seeds)],
                         capture_output=True, text=True, check=True)
    assert "0.80 ± 0.10" in run.stdout and "0.950 ± 0.050" in run.stdout
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["models"]["strong_wspo"]["seeds"]["signal"]["std"] == pytest.approx(0.1)


def test_a_missing_seed_folder_is_refused(tmp_path):
    (tmp_path / "eval").mkdir()
    run = subprocess.run([sys.executable, "-m", "wspo.embedded.report", str(tmp_path / "eval"), "--seeds", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert f"--seeds {tmp_path / 'nope'} is not a folder" in run.stderr
    assert not (tmp_path / "report.json").exists()
