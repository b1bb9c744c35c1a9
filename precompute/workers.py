"""Which phase-one worker this process is (DESIGN section 8).

`resolve_workers`: `--num_workers` / `--worker_index`, or `auto` to read them from the scheduler the
process runs under: a SLURM job array (`SLURM_ARRAY_TASK_ID`, `_MIN`, `_STEP`, `_COUNT`) or a
Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`; the Job's `completions` is `--num_workers`). The
config checks its keys with it, so it imports nothing of the pipeline (launch.py starts Ray tasks).
"""

from __future__ import annotations

import os

from wspo.errors import ConfigError

SLURM_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")
K8S_VAR = "JOB_COMPLETION_INDEX"


def _int(value, option: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{option}: {value!r} is neither an integer nor 'auto'") from None


def resolve_workers(num_workers, worker_index, launcher: str = "none", env=None) -> tuple[int, int]:
    """(num_workers, worker_index) as integers, reading the scheduler's variables for `auto`."""
    env = os.environ if env is None else env
    if launcher == "ray":
        if num_workers == "auto":
            raise ConfigError("num_workers: give a number with --launcher ray (the Ray launcher starts that many tasks)")
        n = _int(num_workers, "num_workers")
        if n < 1:
            raise ConfigError(f"num_workers must be at least 1 (got {n})")
        return n, 0
    n = None if num_workers == "auto" else _int(num_workers, "num_workers")
    slurm_count = env.get("SLURM_ARRAY_TASK_COUNT")
    if num_workers == "auto":
        if slurm_count is None:
            raise ConfigError(
                "num_workers auto reads SLURM_ARRAY_TASK_COUNT (a SLURM job array), which is not set; "
                "give --num_workers N (for a Kubernetes Indexed Job: its completions)"
            )
        n = _int(slurm_count, "SLURM_ARRAY_TASK_COUNT")
    if worker_index == "auto":
        if "SLURM_ARRAY_TASK_ID" in env:
            task_id = _int(env["SLURM_ARRAY_TASK_ID"], "SLURM_ARRAY_TASK_ID")
            task_min = _int(env.get("SLURM_ARRAY_TASK_MIN", "0"), "SLURM_ARRAY_TASK_MIN")
            step = _int(env.get("SLURM_ARRAY_TASK_STEP", "1"), "SLURM_ARRAY_TASK_STEP")  # --array=0-14:2
            i = (task_id - task_min) // max(step, 1)
            if slurm_count is not None and _int(slurm_count, "SLURM_ARRAY_TASK_COUNT") != n:
                raise ConfigError(
                    f"the SLURM job array has {slurm_count} tasks (SLURM_ARRAY_TASK_COUNT) but --num_workers is {n}: "
                    "make them equal, or use --num_workers auto"
                )
        elif K8S_VAR in env:
            i = _int(env[K8S_VAR], K8S_VAR)
        else:
            raise ConfigError(
                "worker_index auto: no scheduler variable is set (looked for "
                f"{', '.join(SLURM_VARS)} of a SLURM job array and {K8S_VAR} of a Kubernetes Indexed Job); "
                "run under one of them, or give --worker_index I"
            )
    else:
        i = _int(worker_index, "worker_index")
    if n < 1:
        raise ConfigError(f"num_workers must be at least 1 (got {n})")
    if not 0 <= i < n:
        raise ConfigError(f"worker_index {i} is not in [0, num_workers={n})")
    return n, i
