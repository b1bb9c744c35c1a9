"""Phase two is as safe as phase one: one live writer per output_dir, finished models never replaced
silently, resumes checked against the run's identity, row caches verified, options refused.

Every test feeds the fault and checks the message and that nothing was lost (the files of the
finished run are byte-identical afterwards). Runs use the weak model as the strong one (the
smallest model that fits the shared shard set) for speed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train_helpers import train_argv, train_setup  # noqa: F401 - the fixture

from wspo.train.cli import main as train_main


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (the row cache aside)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".wspo_cache" not in p.parts}


def quick(setup, out, **keys) -> list[str]:
    values = {"model_name_or_path": setup["weak_ref"], "max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    values.update(keys)
    return train_argv(setup, out, **values)


SECOND_WRITER = """
import json, sys, time
from pathlib import Path
import wspo.train.pipeline
from wspo.train.cli import main
lock, deadline = Path(sys.argv[1]), time.monotonic() + 240
while time.monotonic() < deadline:
    try:
        holder = json.loads(lock.read_text())  # as the first writer recorded itself
        print("holder", json.dumps(holder), flush=True)
        break
    except (OSError, ValueError):
        time.sleep(0.01)
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def finished(train_setup, tmp_path_factory):  # noqa: F811
    """A finished run (checkpoint-2, checkpoint-4, final model), trained by a real `wspo-train`
    process while a second one on the same output_dir is refused: (output_dir, second's result)."""
    out = tmp_path_factory.mktemp("safety") / "run"
    argv = quick(train_setup, out)
    first = subprocess.Popen([str(Path(sys.executable).with_name("wspo-train")), *argv],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The second writer is a real process too; it imports while the first starts, then calls
    # wspo-train's main the moment the first holds the lock, so the two overlap for sure.
    second = subprocess.run([sys.executable, "-c", SECOND_WRITER, str(out / ".lock-train"), *argv],
                            capture_output=True, text=True, timeout=300)
    holder = json.loads(next(line for line in second.stdout.splitlines() if line.startswith("holder "))[7:])
    first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    return out, second, holder


def test_a_second_live_train_writer_is_refused_naming_the_holder(finished):
    out, second, holder = finished
    assert second.returncode == 1
    assert f"{out / '.lock-train'} is held by another wspo-train (pid {holder['pid']} on host {holder['host']}" in second.stderr
    assert "full model saved" not in second.stdout
    # the first run finished whole: its model, its two checkpoints, its record; the lock released
    assert (out / "model.safetensors").exists() and json.loads((out / "wspo_run.json").read_text())["identity"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / ".lock-train").exists()


def test_the_identity_is_in_output_dir_and_every_checkpoint(finished, train_setup):  # noqa: F811
    from wspo.models import model_fingerprint

    out = finished[0]
    identity = json.loads((out / "wspo_identity.json").read_text())
    assert identity == json.loads((out / "wspo_run.json").read_text())["identity"]
    assert identity["model"]["fingerprint"] == model_fingerprint(train_setup["weak_ref"])
    assert identity["loss"] == {"name": "wspo", "gamma": 0.1, "reference_logps": "model", "use_lora": False}
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        assert json.loads((out / checkpoint / "wspo_identity.json").read_text()) == identity


def test_a_dead_holders_lock_is_taken_over(train_setup, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    import socket

    (out / ".lock-train").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "since": "earlier"}))
    assert train_main(quick(train_setup, out, max_steps=1, save_strategy="no")) == 0
    assert f"taking over the lock of a run that is gone (pid {pid}" in capsys.readouterr().err
    assert (out / "model.safetensors").exists() and not (out / ".lock-train").exists()


def test_a_finished_model_is_never_replaced_without_overwrite(finished, train_setup, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "copy"
    shutil.copytree(finished[0], out)
    before = snapshot(out)
    assert train_main(quick(train_setup, out, gamma=0.5)) == 1
    err = capsys.readouterr().err
    assert f"output_dir {out} already holds a finished model (wspo_run.json): it is never replaced silently" in err
    assert "--overwrite true" in err
    assert snapshot(out) == before
    # with --overwrite true: the old run's checkpoints go, the new run's model and record replace the old
    assert train_main(quick(train_setup, out, gamma=0.5, max_steps=1, save_strategy="no", overwrite="true")) == 0
    assert not list(out.glob("checkpoint-*"))
    assert json.loads((out / "wspo_run.json").read_text())["identity"]["loss"]["gamma"] == 0.5
    assert snapshot(out)["model.safetensors"] != before["model.safetensors"]


def test_checkpoints_of_an_earlier_run_need_resume_or_overwrite(finished, train_setup, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "interrupted"
    out.mkdir()
    shutil.copytree(finished[0] / "checkpoint-2", out / "checkpoint-2")
    before = snapshot(out)
    assert train_main(quick(train_setup, out)) == 1
    err = capsys.readouterr().err
    assert "holds 1 checkpoint(s) of an earlier run (checkpoint-2)" in err and "--resume_from_checkpoint true" in err
    assert snapshot(out) == before
    assert train_main(quick(train_setup, out, resume_from_checkpoint="true", overwrite="true")) == 1
    assert "--overwrite true removes the checkpoints that --resume_from_checkpoint true would go on from" \
        in capsys.readouterr().err
    assert snapshot(out) == before


@pytest.mark.parametrize("change, differs", [
    ({"gamma": 0.2}, "loss.gamma: 0.1 -> 0.2"),
    ({"model_name_or_path": "weak_aligned"}, "model.fingerprint: "),  # same shapes, other weights
])
def test_a_resume_from_another_runs_checkpoint_is_refused_naming_what_differs(change, differs, finished, train_setup,
                                                                             tmp_path, capsys):  # noqa: F811
    checkpoint = finished[0] / "checkpoint-2"
    before = snapshot(finished[0])
    keys = {k: train_setup[v] if k == "model_name_or_path" else v for k, v in change.items()}
    out = tmp_path / "resumed"
    assert train_main(quick(train_setup, out, resume_from_checkpoint=checkpoint, **keys)) == 1
    err = capsys.readouterr().err
    assert f"resume_from_checkpoint: {checkpoint} was written by another run (" in err and differs in err
    assert "--allow_resume_mismatch true" in err
    assert not (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))
    assert snapshot(finished[0]) == before
    if "gamma" in change:  # the deliberate case: allowed, said, trained on
        assert train_main(quick(train_setup, out, resume_from_checkpoint=checkpoint, allow_resume_mismatch="true", **keys)) == 0
        err = capsys.readouterr().err
        assert "although its run differs (loss.gamma: 0.1 -> 0.2)" in err
        assert json.loads((out / "wspo_run.json").read_text())["resumed_from"] == str(checkpoint)


@pytest.mark.parametrize("steps", ["0", "-2"])
def test_max_steps_that_make_no_sense_are_refused(steps, train_setup, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert train_main(quick(train_setup, out, max_steps=steps)) == 1
    assert f"max_steps must be a positive number of optimizer steps, or -1 to train for num_train_epochs, got {steps}" \
        in capsys.readouterr().err
    assert not out.exists()


def test_a_damaged_row_cache_is_named_and_rebuilt(finished, capsys):
    from wspo.shards.store import ShardSet
    from wspo.train.row_cache import row_cache

    out = finished[0]
    caches = sorted((out / ".wspo_cache").glob("rows-*.arrow"))
    assert caches and all(Path(f"{p}.xxh3").exists() for p in caches)
    path = caches[0]
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 2: len(good) // 2 + 64] = bytes(64)  # bytes overwritten in the middle, size unchanged
    path.write_bytes(bytes(damaged))
    shard_set = ShardSet.open(json.loads((out / "wspo_run.json").read_text())["shards"][0]["path"])
    import pyarrow as pa

    columns = [c for c in pa.ipc.open_file(pa.BufferReader(good)).schema.names if c != "eval_bucket"]
    slots = ["chosen"]
    capsys.readouterr()
    assert row_cache(shard_set, columns, slots, out / ".wspo_cache") == path
    err = capsys.readouterr().err
    assert f"row cache {path} is damaged (checksum " in err and "rebuilding it from" in err
    assert path.read_bytes() == good  # rebuilt, byte for byte the cache of a clean run
    Path(f"{path}.xxh3").unlink()  # a crash between the two renames: rebuilt too
    assert row_cache(shard_set, columns, slots, out / ".wspo_cache") == path
    assert "no checksum file" in capsys.readouterr().err and path.read_bytes() == good
