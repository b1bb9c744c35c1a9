"""`--report_to tensorboard`: the WSPO metrics reach the event files; a missing package is one line."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from test_train_helpers import train_argv, train_setup  # noqa: F401  (fixture)

from wspo.train.cli import main as train_main

METRICS = ("loss", "reward_mean", "scaled_logratio_mean", "reward_logratio_pearson")


def test_metrics_reach_tensorboard_event_files(train_setup, tmp_path, capsys):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = train_argv(train_setup, out, report_to="tensorboard", max_steps=3)
    assert train_main([str(a) for a in argv]) == 0, capsys.readouterr().err
    events = sorted(tmp_path.rglob("events.out.tfevents.*"))  # under output_dir (transformers' default)
    assert events
    scalars = {}
    for path in events:
        accumulator = EventAccumulator(str(path.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    import json

    history = [h for h in json.loads((out / "wspo_run.json").read_text())["log_history"] if "loss" in h]
    assert len(history) == 3
    for name in METRICS:
        logged = scalars[f"train/{name}"]
        assert [step for step, _ in logged] == [h["step"] for h in history], name
        # TensorBoard stores float32: the same numbers as the run record, to float32 precision.
        # wspo_run.json writes a non-finite value as null; TensorBoard keeps it as nan.
        got = [None if math.isnan(value) else value for _, value in logged]
        expected = [h.get(name) for h in history]
        assert sum(v is not None for v in expected) >= 2, name  # the comparison must hold numbers
        assert [v is None for v in got] == [v is None for v in expected], name
        assert [v for v in got if v is not None] == pytest.approx([v for v in expected if v is not None],
                                                                  rel=1e-6, abs=1e-7), name


def test_missing_tensorboard_is_one_line(train_setup, tmp_path):  # noqa: F811
    argv = [str(a) for a in train_argv(train_setup, tmp_path / "run", report_to="tensorboard")]
    hide = ("import sys; sys.modules['tensorboard'] = None; sys.modules['tensorboardX'] = None; "
            "from wspo.train.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", hide, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "wspo-train: error: --report_to tensorboard needs the tensorboard package: pip install tensorboard "
        "(or pip install 'wspo[test]'), or pass --report_to none"]
    assert not (tmp_path / "run").exists()
