"""What the row cache's checksum costs: prints one JSON object.

    python benchmarks/row_cache_checksum.py                    # 20,000 and 80,000 rows
    python benchmarks/row_cache_checksum.py --rows 50000 200000

Synthetic shard parts of a realistic row shape (300 response tokens: token ids, offsets, two
log-prob columns, the reward; a 1 kB prompt and response text) are written with the shard
format's Parquet writer. For each size, measured in one run: writing the row cache
(`row_cache.write_cache`: decompress, bucket, write the IPC file, checksum it), checking it when a
run opens it (`row_cache.cache_problem`: XXH3-128 of the whole file), the same file's sha256 for
comparison, and mapping it (`pyarrow.memory_map` + reading the footer). Reported: the check's time
as a fraction of writing the cache, and its throughput next to sha256's. The check reads every byte once per run, so it grows with the
cache's size; the ratio says how much a run's start-up gains from it against the one-time write,
and the throughput what a run pays per GB of cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from wspo.shards.store import sha256_file, write_parquet
from wspo.train.row_cache import cache_problem, write_cache

TOKENS = 300
ROWS_PER_PART = 4096


def synthetic_part(path: Path, start: int, rows: int, rng: np.random.Generator) -> None:
    floats = pa.list_(pa.float32())
    ints = pa.list_(pa.int32())
    lp = lambda: pa.array([rng.standard_normal(TOKENS).astype(np.float32) for _ in range(rows)], floats)  # noqa: E731
    table = pa.table({
        "id": [f"{i:064x}" for i in range(start, start + rows)],
        "example_id": [f"ex{i}" for i in range(start, start + rows)],
        "slot": ["chosen"] * rows,
        "messages": ["[" + "x" * 500 + "]"] * rows,
        "response": ["y" * 500] * rows,
        "token_ids": pa.array([rng.integers(0, 150000, TOKENS, dtype=np.int32) for _ in range(rows)], ints),
        "token_start": pa.array([np.arange(TOKENS, dtype=np.int32)] * rows, ints),
        "token_end": pa.array([np.arange(1, TOKENS + 1, dtype=np.int32)] * rows, ints),
        "logp_weak_ref": lp(), "logp_weak_aligned": lp(), "reward": lp(),
    })
    write_parquet(table, path)


def measure(rows: int, root: Path) -> dict:
    rng = np.random.default_rng(0)
    parts = []
    for k, start in enumerate(range(0, rows, ROWS_PER_PART)):
        parts.append(root / f"part-{rows}-{k:05d}.parquet")
        synthetic_part(parts[-1], start, min(ROWS_PER_PART, rows - start), rng)
    columns = ["id", "example_id", "messages", "response", "token_ids", "token_start", "token_end", "reward"]
    cache = root / f"rows-{rows}.arrow"
    t0 = time.perf_counter()
    write_cache([str(p) for p in parts], columns, ["chosen"], str(cache))
    t1 = time.perf_counter()
    assert cache_problem(cache) is None
    t2 = time.perf_counter()
    with pa.memory_map(str(cache)) as source:
        pa.ipc.open_file(source).schema  # noqa: B018 - the footer, as rows.py opens it
    t3 = time.perf_counter()
    sha256_file(cache)
    t_sha = time.perf_counter() - t3
    size = os.path.getsize(cache)
    for p in parts:
        p.unlink()
    return {"rows": rows, "cache_bytes": size, "write_cache_s": round(t1 - t0, 3), "check_s": round(t2 - t1, 3),
            "map_s": round(t3 - t2, 4), "check_over_write": round((t2 - t1) / (t1 - t0), 4),
            "check_gb_per_s": round(size / 1e9 / (t2 - t1), 3), "sha256_gb_per_s": round(size / 1e9 / t_sha, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20000, 80000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(n, Path(tmp)) for n in args.rows]
    print(json.dumps({"benchmark": "row_cache_checksum", "load": os.getloadavg()[0], "sizes": results}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
