"""The training rows of one shard set as an uncompressed Arrow IPC file (DESIGN section 8).

Parquet parts are compressed, so they cannot be memory-mapped as arrays. Once per shard set (and
set of columns) its rows of the wanted slots are decompressed into `<cache_dir>/rows-<fp>-<key>.arrow`,
named by the set's fingerprint (the sha256 of its files), with one more column: the held-out
bucket of each row's `example_id` (`examples.is_eval_example`). Training maps that file (rows.py).

The file is written by a short-lived helper process (`python -m wspo.train.row_cache`; it imports
pyarrow and the shard store only): the allocators keep decompression buffers for reuse, and in the training process
that would make its memory grow with the number of rows read. Written under a temporary name and
renamed, so a crash never leaves a file that looks complete and two ranks writing at once both
produce the same file.

Its checksum is written last, beside it (`<file>.xxh3`), and checked each time the file is opened:
a cache whose bytes changed (a bad disk, a stray write), or one without its checksum (a crash
between the two renames), is named, removed and rebuilt from the verified shard set, never
trained on. The checksum is XXH3-128 (xxhash, a dependency of `datasets`): it guards against
damage, not tampering, and reads several GB/s where sha256 reads about 0.5 here, so the check on
every start-up stays a small fraction of writing the cache (benchmarks/row_cache_checksum.py).

A set on an object store (`--shards s3://...`) is read here and only here: each part is
downloaded once, in one streaming read, its sha256 checked against the manifest as it arrives
(open_shard_sets checks only sizes and row counts of such a set), decompressed into the cache
and deleted (the rows per slot come first from the small `slot` column chunks, ranged reads).
So each node reads each file once, on its local main process, whatever its number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import xxhash
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wspo.disk import disk_errno, disk_message
from wspo.errors import WspoError
from wspo.shards.storage import local_copy, publish, read_parquet, read_parquet_schema, shard_path
from wspo.shards.store import ShardError, ShardSet, write_text

CACHE_VERSION = 1  # bump when the cached layout changes
BUCKET_COLUMN = "eval_bucket"  # uint32: the first 4 bytes of sha256(example_id), see examples.is_eval_example
READ_BATCH_ROWS = 1024  # rows decompressed at a time while the cache is written


def example_buckets(example_ids: list[str]) -> np.ndarray:
    return np.array([int(hashlib.sha256(e.encode()).hexdigest()[:8], 16) for e in example_ids], dtype=np.uint32)


def row_cache(shard_set: ShardSet, columns: list[str], slots: list[str], cache_dir: Path) -> Path | None:
    """The cache file of `shard_set`'s rows of `slots` with `columns` (+ BUCKET_COLUMN), written
    if missing. None for a set without part files."""
    if not shard_set.files:
        return None
    columns = sorted(set(columns))
    key = json.dumps([CACHE_VERSION, shard_set.fingerprint, columns, sorted(slots)])
    path = Path(cache_dir) / f"rows-{shard_set.fingerprint[:16]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.arrow"
    if path.exists():
        problem = cache_problem(path)
        if problem is None:
            return path
        print(f"row cache {path} is damaged ({problem}); rebuilding it from {shard_set.root}", file=sys.stderr)
        path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = [str(shard_set.root / record["path"]) for record in shard_set.files]
        request = json.dumps({"parts": parts, "sha256": [record["sha256"] for record in shard_set.files],
                              "columns": columns, "slots": list(slots), "path": str(path)})
        done = subprocess.run([sys.executable, "-m", "wspo.train.row_cache"], input=request, text=True, capture_output=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            raise ShardError(f"writing the row cache {path} failed: {lines[-1]}")
    return path


def checksum_path(path: Path) -> Path:
    return Path(f"{path}.xxh3")


def checksum_file(path: Path) -> str:
    """XXH3-128 of the file, read through a memory map (no copies: page-cache speed)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_128().hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return xxhash.xxh3_128(view).hexdigest()


def cache_problem(path: Path) -> str | None:
    """What is wrong with a cache file, or None when its checksum matches the one written after it."""
    try:
        recorded = checksum_path(path).read_text().strip()
    except OSError:
        return f"no checksum file {checksum_path(path).name}: its writing was interrupted"
    actual = checksum_file(path)
    if actual != recorded:
        return f"checksum {actual[:12]}… does not match {recorded[:12]}…, recorded when it was written"
    return None


def write_cache(parts: list[str], sha256: list[str], columns: list[str], slots: list[str], path: str) -> None:
    """Runs in the helper process: stream every part, a batch at a time, into the IPC file."""
    per_slot: Counter = Counter()
    for part in parts:  # the slot column alone (dictionary-encoded, small): rows per slot for the run record
        counts = pc.value_counts(_read(part, ["slot"])["slot"])
        per_slot.update({str(d["values"]): d["counts"] for d in counts.to_pylist()})
    fields = [read_parquet_schema(shard_path(parts[0])).field(c) for c in columns] + [pa.field(BUCKET_COLUMN, pa.uint32())]
    schema = pa.schema(fields, metadata={"wspo_rows_per_slot": json.dumps(dict(per_slot))})
    digest = []

    def write(tmp: Path) -> None:
        with pa.ipc.new_file(str(tmp), schema) as writer:
            for part, checksum in zip(parts, sha256):
                try:
                    with local_copy(shard_path(part), checksum, Path(path).parent) as local:
                        batches = pq.ParquetFile(local).iter_batches(batch_size=READ_BATCH_ROWS,
                                                                     columns=sorted(set(columns) | {"slot", "example_id"}))
                        for batch in batches:
                            batch = batch.filter(pc.is_in(batch.column("slot"), value_set=pa.array(slots)))
                            buckets = example_buckets(batch.column("example_id").to_pylist())
                            writer.write_batch(pa.RecordBatch.from_arrays([*(batch.column(c) for c in columns), pa.array(buckets)],
                                                                          schema=schema))
                except (OSError, pa.ArrowException) as e:
                    if disk_errno(e):  # writing the cache failed, not reading the part
                        raise
                    raise ShardError(f"{part}: cannot read ({e})") from None
        digest.append(checksum_file(tmp))

    publish(Path(path), write)
    write_text(digest[0] + "\n", checksum_path(path))  # last: a cache without it is incomplete


def _read(part: str, columns: list[str]) -> pa.Table:
    try:
        return read_parquet(shard_path(part), columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{part}: cannot read ({e})") from None


if __name__ == "__main__":  # the helper process: a JSON request on stdin; the last stderr line names a failure
    request = json.loads(sys.stdin.read())
    try:
        write_cache(request["parts"], request["sha256"], request["columns"], request["slots"], request["path"])
    except WspoError as e:  # ShardError, or the store's StoreError
        sys.exit(str(e))
    except OSError as e:  # a full disk, a quota, a read-only file system: named with the cache's path
        sys.exit(disk_message(e, request["path"], "rerun: the row cache is rebuilt") or str(e))
