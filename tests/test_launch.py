"""Workers from the scheduler (SLURM job arrays, Kubernetes Indexed Jobs) and from Ray (DESIGN section 8).

Each multi-worker set must verify and hold exactly the rows of a one-worker run of the same
command, row for row by `id`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from wspo.precompute.launch import check_storage, StorageError
from wspo.precompute.workers import resolve_workers
from wspo.shards.store import ShardSet

ENV = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
SCHEDULER_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_STEP",
                  "JOB_COMPLETION_INDEX")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in ENV.items() if k not in SCHEDULER_VARS and k != "RAY_ADDRESS"}
    return env | {k: str(v) for k, v in extra.items()}


def command(tiny_models, out, *extra) -> list[str]:
    return [
        sys.executable, "-m", "wspo.precompute.cli", "--output_dir", str(out),
        "--weak_ref", str(tiny_models["weak_ref"]), "--weak_aligned", str(tiny_models["weak_aligned"]),
        "--max_length", "384", "--max_prompt_length", "192", "--max_samples", "30", "--rows_per_file", "4",
        "--batch_tokens", "1024", *extra,
    ]


def rows_by_id(path) -> dict[str, dict]:
    table = ShardSet.open(path).check().read_table()
    return {row["id"]: row for row in table.to_pylist()}


def assert_same_rows(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and len(a) > 0
    for rid, row in a.items():
        other = b[rid]
        for key, value in row.items():
            if key.startswith("logp_") or key in ("reward", "reward_sum"):
                # Batches differ between layouts (length-sorted within each worker's parts).
                np.testing.assert_allclose(np.asarray(other[key], np.float64), np.asarray(value, np.float64), atol=2e-5)
            else:
                assert other[key] == value, (rid, key)


@pytest.fixture(scope="module")
def one_worker(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_worker")
    subprocess.run(command(tiny_models, out), check=True, capture_output=True, env=clean_env())
    return rows_by_id(out)


# -- resolving the worker layout ----------------------------------------------------------------


def test_resolve_workers_from_slurm_and_kubernetes():
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_workers("auto", "auto", env=slurm) == (4, 2)
    assert resolve_workers("4", "auto", env=slurm) == (4, 2)
    # --array=0-6:2 runs tasks 0, 2, 4, 6: task 4 is the third worker.
    stepped = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_STEP": "2"}
    assert resolve_workers("auto", "auto", env=stepped) == (4, 2)
    assert resolve_workers("3", "auto", env={"JOB_COMPLETION_INDEX": "2"}) == (3, 2)
    assert resolve_workers("2", "1", env={}) == (2, 1)
    assert resolve_workers("5", "auto", launcher="ray", env={}) == (5, 0)


@pytest.mark.parametrize("num_workers, worker_index, env, message", [
    ("1", "auto", {}, "no scheduler variable is set (looked for SLURM_ARRAY_TASK_ID"),
    ("3", "auto", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4"},
     "the SLURM job array has 4 tasks (SLURM_ARRAY_TASK_COUNT) but --num_workers is 3"),
    ("auto", "0", {}, "num_workers auto reads SLURM_ARRAY_TASK_COUNT"),
    ("auto", "auto", {"JOB_COMPLETION_INDEX": "1"}, "give --num_workers N (for a Kubernetes Indexed Job: its completions)"),
    ("2", "auto", {"JOB_COMPLETION_INDEX": "2"}, "worker_index 2 is not in [0, num_workers=2)"),
    ("two", "0", {}, "num_workers: 'two' is neither an integer nor 'auto'"),
    ("auto", "0", {}, "num_workers auto"),
])
def test_resolve_workers_errors(num_workers, worker_index, env, message):
    with pytest.raises(ValueError) as e:
        resolve_workers(num_workers, worker_index, env=env)
    assert message in str(e.value)


def test_worker_index_auto_without_a_scheduler_is_named_by_the_cli(tiny_models, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(command(tiny_models, out, "--worker_index", "auto"), capture_output=True, text=True, env=clean_env())
    assert result.returncode == 1
    assert "wspo-precompute: error: worker_index auto: no scheduler variable is set" in result.stderr
    assert "JOB_COMPLETION_INDEX" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


# -- two workers under simulated schedulers ---------------------------------------------------


def run_workers(cmd, envs) -> None:
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for env in envs]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]


@pytest.mark.slow
def test_slurm_array_and_indexed_job_workers_equal_one_worker(tiny_models, tmp_path, one_worker):
    slurm_out, k8s_out = tmp_path / "slurm", tmp_path / "k8s"
    run_workers(command(tiny_models, slurm_out, "--num_workers", "auto", "--worker_index", "auto"),
                [clean_env(SLURM_ARRAY_TASK_ID=10 + i, SLURM_ARRAY_TASK_MIN=10, SLURM_ARRAY_TASK_COUNT=2) for i in (0, 1)])
    run_workers(command(tiny_models, k8s_out, "--num_workers", "2", "--worker_index", "auto"),
                [clean_env(JOB_COMPLETION_INDEX=i) for i in (0, 1)])
    for out in (slurm_out, k8s_out):
        assert sorted(p.name for p in out.glob("manifest*.json")) == ["manifest-00000-of-00002.json", "manifest-00001-of-00002.json"]
        assert_same_rows(one_worker, rows_by_id(out))


# -- Ray ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_launcher_three_workers_equal_one_worker(tiny_models, tmp_path, one_worker):
    out = tmp_path / "ray"
    result = subprocess.run(command(tiny_models, out, "--num_workers", "3", "--launcher", "ray", "--cpus_per_worker", "1"),
                            capture_output=True, text=True, env=clean_env(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(out.glob("manifest-*-of-00003.json"))) == 3
    assert_same_rows(one_worker, rows_by_id(out))
    assert "wrote 30 rows" in result.stdout
    assert not list(out.glob(".ray-probe-*")) and not list(out.glob(".lock-*"))


@pytest.mark.slow
def test_ray_worker_killed_midway_is_retried_and_resumes(tiny_models, tmp_path, one_worker):
    out = tmp_path / "ray_killed"
    proc = subprocess.Popen(command(tiny_models, out, "--num_workers", "3", "--launcher", "ray", "--max_retries", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    killed = None
    deadline = time.time() + 600
    try:
        # Worker 1 has scored a part with its first scorer: kill its process (named in its lock file).
        while killed is None and time.time() < deadline:
            assert proc.poll() is None, "the run finished before the kill point"
            lock, scored = out / ".lock-00001", out / "_work-00001" / "weak_ref-00000.parquet"
            if scored.exists() and lock.exists():
                killed = json.loads(lock.read_text())["pid"]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.02)
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None
    assert proc.returncode == 0, stderr[-3000:]
    assert f"taking over the lock of a run that is gone (pid {killed}" in stderr  # the retry resumed worker 1's parts
    assert_same_rows(one_worker, rows_by_id(out))


def test_ray_missing_is_named_with_the_install_command(tiny_models, tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"  # `import ray` now raises ImportError
            "from wspo.precompute.cli import main; sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code] + command(tiny_models, tmp_path / "out", "--num_workers", "2", "--launcher", "ray")[3:]
    result = subprocess.run(cmd, capture_output=True, text=True, env=clean_env())
    assert result.returncode == 1
    assert 'wspo-precompute: error: --launcher ray needs Ray, which is not installed here: pip install "wspo[ray]"' in result.stderr


@pytest.mark.slow
def test_ray_task_that_cannot_see_or_write_output_dir(tmp_path):
    ray = pytest.importorskip("ray")
    out = tmp_path / "shared"
    out.mkdir()
    (out / ".ray-probe-abc").write_text("abc")
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        check = ray.remote(check_storage)
        ray.get(check.remote(out, "abc", 0))  # sees the driver's probe and can write: fine
        elsewhere = tmp_path / "node-local"  # what another node sees at the same path: no probe
        elsewhere.mkdir()
        with pytest.raises(ray.exceptions.RayTaskError) as e:
            ray.get(check.remote(elsewhere, "abc", 1))
        assert isinstance(e.value.cause, StorageError)
        assert "worker 1 on host" in str(e.value.cause) and "cannot see output_dir" in str(e.value.cause)
        if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here to make a folder unwritable for root")
        try:
            with pytest.raises(ray.exceptions.RayTaskError) as e:
                ray.get(check.remote(out, "abc", 2))
            assert "worker 2 on host" in str(e.value.cause) and "cannot write output_dir" in str(e.value.cause)
        finally:
            subprocess.run(["chattr", "-i", str(out)], check=True)
    finally:
        ray.shutdown()
