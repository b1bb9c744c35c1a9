"""The Ray launcher of phase one (DESIGN section 8).

`run_ray`: `--launcher ray` runs all the workers as Ray tasks on a cluster (or a local instance).
Each task is an ordinary worker: the same `pipeline.run`, the same files, so a task whose process
or node dies is retried by Ray and resumes its own parts. (Which worker a process is under SLURM
or a Kubernetes Indexed Job: workers.py.)
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
import uuid
from collections import Counter

from tqdm.auto import tqdm

from wspo.errors import WspoError
from wspo.shards.storage import AnyPath, read_parquet, read_parquet_schema, shard_path
from wspo.shards.store import reward_statistics

from .pipeline import PrecomputeError, run


class StorageError(WspoError):
    """A worker task cannot see or write the driver's output_dir."""


def _probe_name(launch_id: str) -> str:
    return f".ray-probe-{launch_id}"


def check_storage(out: AnyPath, launch_id: str, worker_index: int) -> None:
    """In a task: the driver's probe file is there with its content, and the folder is writable."""
    host = socket.gethostname()
    probe = out / _probe_name(launch_id)
    try:
        seen = probe.read_text()
    except OSError:
        seen = None
    if seen != launch_id:
        raise StorageError(
            f"worker {worker_index} on host {host} cannot see output_dir {out} as the driver wrote it "
            f"({probe.name} is missing there): output_dir must be storage every node sees (a shared filesystem, "
            "or an object-store URL such as s3://bucket/prefix with the same credentials on every node)"
        )
    mine = out / f"{_probe_name(launch_id)}-{worker_index}"
    try:
        mine.write_text("ok")
        mine.unlink()
    except OSError as e:
        raise StorageError(f"worker {worker_index} on host {host} cannot write output_dir {out}: {e.strerror or e}") from None


def _worker_task(args, launch_id: str) -> dict:
    """One phase-one worker inside a Ray task."""
    check_storage(shard_path(args.output_dir), launch_id, args.worker_index)
    manifest = run(args, lock_owner=launch_id)
    return {"worker_index": args.worker_index, "host": socket.gethostname(), "counts": manifest["counts"],
            "files": manifest["files"], "timing": manifest["timing"]}


def _cause(error: BaseException) -> str:
    cause = getattr(error, "cause", None)  # RayTaskError wraps the task's own exception
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def run_ray(args) -> dict:
    """Run `args.num_workers` workers as Ray tasks; returns the combined summary (manifest-shaped)."""
    try:
        import ray
    except ImportError:
        raise PrecomputeError('--launcher ray needs Ray, which is not installed here: pip install "wspo[ray]"') from None

    started = time.perf_counter()
    out = shard_path(args.output_dir).expanduser().resolve()  # tasks may run in other folders, on other nodes
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrecomputeError(f"output_dir {out} cannot be created: {e.strerror or e}") from None
    launch_id = uuid.uuid4().hex
    probe = out / _probe_name(launch_id)
    try:
        probe.write_text(launch_id)
    except OSError as e:
        raise PrecomputeError(f"output_dir {out} is not writable: {e.strerror or e}") from None

    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    started_here = not ray.is_initialized()
    if started_here:
        # Quiet progress bars in task logs, which Ray forwards to this terminal line by line.
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": {"TQDM_MININTERVAL": "30"}})
    try:
        task = ray.remote(_worker_task).options(
            num_cpus=args.cpus_per_worker, num_gpus=args.gpus_per_worker,
            max_retries=args.max_retries, retry_exceptions=False,  # retried: dead processes and nodes; not bad input
        )
        pending = {}
        for i in range(args.num_workers):
            worker_args = dataclasses.replace(args, output_dir=str(out), launcher="none", worker_index=str(i),
                                              num_workers=str(args.num_workers))
            pending[task.remote(worker_args, launch_id)] = i
        done, failed = [], {}
        with tqdm(total=args.num_workers, desc=f"ray: {args.num_workers} workers", unit="worker", dynamic_ncols=True,
                  disable=args.disable_tqdm) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except Exception as e:  # noqa: BLE001 - every task failure is reported by worker
                    failed[i] = _cause(e)
                    tqdm.write(f"worker {i}: failed: {failed[i]}", file=sys.stderr)
                else:
                    done.append(result)
                    tqdm.write(f"worker {i} ({result['host']}): {result['counts']['rows_written']} rows in "
                               f"{len(result['files'])} file(s), {result['timing']['seconds']:.0f} s", file=sys.stderr)
                bar.update(1)
    finally:
        probe.unlink(missing_ok=True)
        if started_here:
            ray.shutdown()
    if failed:
        names = "; ".join(f"worker {i}: {msg}" for i, msg in sorted(failed.items()))
        raise PrecomputeError(
            f"{len(failed)} of {args.num_workers} worker(s) failed (after up to {args.max_retries} retries for dead "
            f"processes): {names}. Rerun the same command to resume: finished workers are kept."
        )
    return combined_summary(out, sorted(done, key=lambda r: r["worker_index"]), time.perf_counter() - started)


def combined_summary(out: AnyPath, results: list[dict], seconds: float) -> dict:
    """The workers' counts added up, with the set's reward statistics (read one file at a time)."""
    counts = Counter()
    skipped = Counter()
    for r in results:
        for key, value in r["counts"].items():
            if key == "skipped":
                skipped.update(value)
            elif key != "rows_in_split":
                counts[key] += value
    files = [f for r in results for f in r["files"]]
    tokens = sum(r["timing"]["sequence_tokens"] for r in results)
    reward = None
    if files and "reward" in read_parquet_schema(out / files[0]["path"]).names:
        reward = reward_statistics(read_parquet(out / f["path"], columns=["reward", "reward_sum"]) for f in files)
    return {
        "counts": {**counts, "rows_in_split": results[0]["counts"]["rows_in_split"] if results else 0,
                   "skipped": dict(sorted(skipped.items()))},
        "files": files,
        "reward": reward,
        "timing": {"seconds": round(seconds, 3), "sequence_tokens": tokens,
                   # scored tokens (every scorer's) per second of the whole launch
                   "tokens_per_second": round(sum(r["timing"]["tokens_per_second"] * r["timing"]["seconds"]
                                                  for r in results) / max(seconds, 1e-9), 1)},
        "workers": [{"worker_index": r["worker_index"], "host": r["host"], "rows": r["counts"]["rows_written"]} for r in results],
    }
