"""`wspo-train`'s closing summary: no `loss at step 0: nan` for short runs; resumed runs say so."""

from __future__ import annotations

from test_train_helpers import train_argv, train_setup  # noqa: F401  (fixture)

from wspo.train.cli import main as train_main


def run(capsys, argv) -> str:
    rc = train_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_short_run_and_resumed_run_summaries(train_setup, tmp_path, capsys):  # noqa: F811
    out_dir = tmp_path / "run"
    # Two steps with logging_steps 10: no training step is ever logged.
    first = run(capsys, train_argv(train_setup, out_dir, max_steps=2, logging_steps=10,
                                   save_strategy="steps", save_steps=1))
    assert "nan" not in first
    assert "no step logged (the run is shorter than logging_steps)" in first
    assert "mean over the run " in first and "resumed from" not in first

    resumed = run(capsys, train_argv(train_setup, out_dir, max_steps=3, logging_steps=10,
                                     save_strategy="steps", save_steps=1, resume_from_checkpoint="true"))
    assert f"resumed from {out_dir / 'checkpoint-2'}" in resumed
    assert "nan" not in resumed
