"""Shard sets on object storage (DESIGN section 8): phase one writes and phase two reads any fsspec
URL, against a real S3 endpoint on localhost (the `s3_bucket` fixture: moto's server).

Each set written to `s3://` must verify and equal a local run of the same command: the same rows
by `id`, and Parquet parts identical byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from s3_endpoint import free_port, moto_endpoint, s3_environment
from test_train_helpers import train_argv, train_setup  # noqa: F401  (fixture)

from wspo.precompute.cli import main as precompute_main
from wspo.precompute.config import PrecomputeArguments
from wspo.precompute.pipeline import run
from wspo.shards.cli import main as shards_main
from wspo.shards.storage import StoreError, shard_path
from wspo.shards.store import ShardError, ShardSet

ENV = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
SCHEDULER_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_STEP",
                  "JOB_COMPLETION_INDEX")
OPTIONS = dict(max_length=384, max_prompt_length=192, max_samples=12, rows_per_file=2, batch_tokens=1024)


def make_args(tiny_models, out, **overrides) -> PrecomputeArguments:
    return PrecomputeArguments(output_dir=str(out), weak_ref=str(tiny_models["weak_ref"]),
                               weak_aligned=str(tiny_models["weak_aligned"]), **{**OPTIONS, **overrides})


def command(tiny_models, out, *extra) -> list[str]:
    argv = [sys.executable, "-m", "wspo.precompute.cli", "--output_dir", str(out),
            "--weak_ref", str(tiny_models["weak_ref"]), "--weak_aligned", str(tiny_models["weak_aligned"])]
    for key, value in OPTIONS.items():
        argv += [f"--{key}", str(value)]
    return argv + list(extra)


def environment(**extra) -> dict:
    """The test's environment (with the S3 endpoint) without scheduler variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in SCHEDULER_VARS} | {"TOKENIZERS_PARALLELISM": "false"}
    return env | {k: str(v) for k, v in extra.items()}


def part_bytes(root) -> dict[str, bytes]:
    shards = ShardSet.open(root).check()
    return {f["path"]: (shards.root / f["path"]).read_bytes() for f in shards.files}


def rows_by_id(root) -> dict[str, dict]:
    return {row["id"]: row for row in ShardSet.open(root).check().read_table().to_pylist()}


@pytest.fixture(scope="module")
def local_one(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("local_one")
    run(make_args(tiny_models, out))
    return out


def test_one_worker_on_s3_equals_a_local_run(tiny_models, s3_bucket, local_one, tmp_path, capsys):
    url = f"{s3_bucket}/one"
    run(make_args(tiny_models, url))
    assert part_bytes(url) == part_bytes(local_one) and len(part_bytes(url)) == 6
    assert rows_by_id(url) == rows_by_id(local_one)
    store = shard_path(url)
    names = sorted(p.name for p in store.glob("*"))
    assert names == ["README.md", "data", "manifest.json"]  # no lock, no work folder, no temporary file left
    assert shards_main(["verify", url]) == 0
    assert "OK (6 files" in capsys.readouterr().out
    # The other readers of wspo-shards take the URL; the page is written locally.
    assert shards_main(["info", url]) == 0 and json.loads(capsys.readouterr().out)["rows"] == 12
    assert shards_main(["head", url, "-n", "1", "--tokens", "3"]) == 0
    assert shards_main(["show", url, "--html", str(tmp_path / "page.html"), "-n", "2"]) == 0
    assert (tmp_path / "page.html").read_text().count('<div class="row"') == 4
    # A rerun finds the set complete and leaves it as it is.
    before = {p.name: p.read_bytes() for p in store.glob("*.json")}
    run(make_args(tiny_models, url))
    assert {p.name: p.read_bytes() for p in store.glob("*.json")} == before


def test_two_workers_on_s3_equal_local_runs(tiny_models, s3_bucket, local_one, tmp_path):
    """Two Indexed-Job workers (`--worker_index auto`) write one set to S3 at once: it verifies,
    holds the one-worker run's rows by id, and its parts are byte-identical to the same two
    workers run locally."""
    url = f"{s3_bucket}/two"
    workers = [subprocess.Popen(command(tiny_models, url, "--num_workers", "2", "--worker_index", "auto"),
                                env=environment(JOB_COMPLETION_INDEX=i), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True) for i in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err
    local_two = tmp_path / "two"
    for i in range(2):
        run(make_args(tiny_models, local_two, num_workers="2", worker_index=str(i)))
    assert part_bytes(url) == part_bytes(local_two)
    one, two = rows_by_id(local_one), rows_by_id(url)
    assert sorted(one) == sorted(two) and len(one) == 12
    for row_id, row in one.items():
        for key, value in row.items():
            if key.startswith("logp_") or key in ("reward", "reward_sum"):  # batches differ between layouts
                np.testing.assert_allclose(np.asarray(two[row_id][key], np.float64), np.asarray(value, np.float64), atol=2e-5)
            else:
                assert two[row_id][key] == value, (row_id, key)
    card = (shard_path(url) / "README.md").read_text()
    assert "workers: 2 of 2" in card  # the card written last describes both workers


def wait_and_kill(proc, path, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as the object `path` exists."""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the run finished before {path} appeared: the kill point was missed")
            if path.exists():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
            time.sleep(0.01)
        pytest.fail(f"timed out waiting for {path}")
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_sigkill_then_resume_on_s3_gives_identical_bytes(tiny_models, s3_bucket, local_one, capsys):
    """Killed while the second scorer runs, then between a part and the manifest: no reader takes
    the set for complete, and the rerun ends with the local run's bytes. Small parts (2 rows) leave
    several parts to assemble after the kill point, so it is not missed."""
    local = local_one
    url = f"{s3_bucket}/killed"
    store = shard_path(url)
    cmd = command(tiny_models, url)
    wait_and_kill(subprocess.Popen(cmd, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                  store / "_work-00000" / "weak_aligned-00001.parquet")
    assert not (store / "manifest.json").exists() and not (store / "data").glob("*.parquet")
    wait_and_kill(subprocess.Popen(cmd, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                  store / "data" / "part-00000-00001.parquet")
    assert (store / ".lock-00000").exists()  # left by the killed run: its pid is gone, so it is taken over
    with pytest.raises(ShardError, match="no manifest"):
        ShardSet.open(url)  # an interrupted set never looks complete
    assert shards_main(["verify", url]) == 1
    assert "phase one has not finished" in capsys.readouterr().err
    run(make_args(tiny_models, url))
    assert part_bytes(url) == part_bytes(local) and len(part_bytes(url)) == 6
    a, b = (json.loads((shard_path(root) / "manifest.json").read_text()) for root in (local, url))
    for volatile in ("created", "timing", "command", "checksum"):
        a.pop(volatile), b.pop(volatile)
    assert a == b
    assert sorted(p.name for p in store.glob("*")) == ["README.md", "data", "manifest.json"]


def test_train_from_s3_equals_train_from_the_local_copy(train_setup, s3_bucket, tmp_path, capsys):  # noqa: F811
    """The shared set copied to S3: `wspo-train --shards s3://...` copies its rows once into the
    local row cache and trains exactly as from the local folder (equal losses, step by step)."""
    from wspo.train.cli import main as train_main

    url = f"{s3_bucket}/train-set"
    store = shard_path(url)
    store.fs.put(str(train_setup["shards"]) + "/", store.path, recursive=True)
    records = {}
    for name, shards in (("local", train_setup["shards"]), ("s3", url)):
        out = tmp_path / name
        assert train_main(train_argv(train_setup, out, shards=shards, max_steps=3)) == 0, capsys.readouterr().err
        records[name] = json.loads((out / "wspo_run.json").read_text())
        assert list((out / ".wspo_cache").glob("rows-*.arrow"))  # the rows live in the local cache
    losses = {name: [h["loss"] for h in r["log_history"] if "loss" in h] for name, r in records.items()}
    assert len(losses["local"]) == 3 and losses["s3"] == losses["local"]
    assert records["s3"]["shards"][0]["fingerprint"] == records["local"]["shards"][0]["fingerprint"]
    assert records["s3"]["shards"][0]["path"] == url


# -- errors -------------------------------------------------------------------------------------


def error_line(err: str, command: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_store_errors_name_the_url_and_the_fix(tiny_models, s3_bucket, capsys):
    argv = ["--weak_ref", str(tiny_models["weak_ref"]), "--weak_aligned", str(tiny_models["weak_aligned"]),
            "--max_samples", "4"]
    assert precompute_main(["--output_dir", "s3://no-such-bucket-wspo/set", *argv]) == 1
    assert "s3://no-such-bucket-wspo/set: no such bucket 'no-such-bucket-wspo'" in error_line(capsys.readouterr().err, "wspo-precompute")
    cases = {
        "s3://no-such-bucket-wspo/set": "no such bucket 'no-such-bucket-wspo'",
        f"{s3_bucket}/nothing-here": f"{s3_bucket}/nothing-here: no such shard directory",
        "gs://bucket/set": "gs:// URLs need a filesystem package that is not installed: pip install gcsfs",
        "nosuchscheme://bucket/set": "not a URL fsspec can open",
    }
    for url, message in cases.items():
        assert shards_main(["verify", url]) == 1
        assert message in error_line(capsys.readouterr().err, "wspo-shards"), url


def test_an_unreachable_endpoint_is_named(s3_bucket, monkeypatch, capsys):
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert shards_main(["info", f"{s3_bucket}/set"]) == 1
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    line = error_line(capsys.readouterr().err, "wspo-shards")
    assert f"{s3_bucket}/set: cannot" in line and "check the endpoint (AWS_ENDPOINT_URL) and the network" in line


def test_access_denied_is_named(capsys):
    """A second endpoint that checks credentials (moto with IAM enforced): the test keys are unknown there."""
    import s3fs

    with moto_endpoint(env=environment(INITIAL_NO_AUTH_ACTION_COUNT=0)) as endpoint, pytest.MonkeyPatch.context() as patch:
        for key, value in s3_environment(endpoint).items():
            patch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            assert shards_main(["verify", "s3://wspo-test/set"]) == 1
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
    line = error_line(capsys.readouterr().err, "wspo-shards")
    assert "s3://wspo-test/set: access denied" in line and "check the credentials" in line


def test_lock_and_storage_probe_on_s3(s3_bucket):
    from wspo.precompute.launch import StorageError, check_storage
    from wspo.shards.lock import LockError, OutputLock
    from wspo.shards.storage import create_exclusive

    root = shard_path(f"{s3_bucket}/lock")
    assert create_exclusive(root / "x", b"first") and not create_exclusive(root / "x", b"second")
    assert (root / "x").read_bytes() == b"first"  # the conditional write kept the first holder
    (root / ".lock-00001").write_text(json.dumps({"host": "another-node", "pid": 1, "owner": None, "since": "then"}))
    with pytest.raises(LockError, match=r"s3://wspo-test/lock/.lock-00001 is held by another wspo-precompute \(pid 1 on host another-node"):
        OutputLock(root, 1).__enter__()
    with OutputLock(root, 2) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (root / ".lock-00002").exists()  # released
    # The Ray launcher's probe: a task sees the driver's probe object and can write next to it.
    (root / ".ray-probe-abc").write_text("abc")
    check_storage(root, "abc", 0)
    with pytest.raises(StorageError, match="cannot see output_dir s3://wspo-test/lock"):
        check_storage(root, "other", 0)
