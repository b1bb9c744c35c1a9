"""Top-k columns for offline distillation (DESIGN sections 4 and 9; shard format version 3).

For every response position a scorer (usually `teacher`) may store its K most likely token ids
and their log-probs, next to `logp_<scorer>`, the log-prob of the actual token. Per row, each
column is one flat list of n_tokens x K values (position 0's K values first). Two encodings, named
in the manifest (`topk.encoding`):

- `compact` (the default): within each position the ids are sorted ascending and stored as
  differences (the first id itself, then the gap to the one before), and each log-prob as the
  uint16 `round(-logp * 256)`: a fixed step of 1/256 nat, so every stored log-prob is within
  1/512 = 0.00195 nat of the scorer's (log-probs below -256 nats, probability < 1e-111, are
  stored as -256). Parquet writes both with byte-stream-split + zstd: sorted ids leave gaps of a
  few hundred (two bytes, one of them nearly constant), so a position costs about
  K x (1.5 + 1.3) bytes on a 152k vocabulary (figures in docs/distill.md).
- `fp32`: ids as int32 and log-probs as float32 exactly as the scorer computed them, most likely
  first: for tests and for anyone who wants the numbers bit for bit (about 4x the bytes).

`decode_topk` turns either back into ids and log-probs of shape [n_tokens, K] (compact: in
ascending id order, which no distillation loss depends on).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

ENCODINGS = ("compact", "fp32")
LOGP_SCALE = 256  # compact: log-probs in steps of 1/256 nat
MAX_ERROR = {"compact": 0.5 / LOGP_SCALE, "fp32": 0.0}  # largest |stored - computed| log-prob, in nats
TOPK_FORMAT_VERSION = 3  # the shard format version that introduced these columns


def ids_column(scorer: str) -> str:
    return f"topk_ids_{scorer}"


def logps_column(scorer: str) -> str:
    return f"topk_logp_{scorer}"


def topk_fields(scorer: str, encoding: str) -> list[pa.field]:
    value_type = pa.uint16() if encoding == "compact" else pa.float32()
    return [pa.field(ids_column(scorer), pa.list_(pa.int32()), nullable=False),
            pa.field(logps_column(scorer), pa.list_(value_type), nullable=False)]


def is_topk_column(name: str) -> bool:
    return name.startswith(("topk_ids_", "topk_logp_"))


def manifest_record(k: int, encoding: str, scorers: list[str]) -> dict:
    """What the manifest records under `topk` (and the run fingerprint covers)."""
    return {"k": k, "encoding": encoding, "scorers": list(scorers), "logp_step": 1 / LOGP_SCALE if encoding == "compact" else None,
            "max_logp_error": MAX_ERROR[encoding],
            "layout": "per row: n_tokens x k values, position by position"
                      + ("; ids ascending per position, stored as differences; log-probs as uint16 round(-logp * 256)"
                         if encoding == "compact" else "; ids most likely first; log-probs float32")}


def encode_topk(logps: np.ndarray, ids: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray]:
    """One row's [n, K] top-k log-probs and ids -> the two flat column values."""
    logps = np.asarray(logps, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    if encoding == "fp32":
        return ids.astype(np.int32).ravel(), logps.ravel()
    if encoding != "compact":
        raise ValueError(f"topk_encoding: {encoding!r}; choose from {', '.join(ENCODINGS)}")
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    logps = np.take_along_axis(logps, order, axis=1)
    gaps = np.diff(ids, axis=1, prepend=0).astype(np.int32)
    quantised = np.clip(np.rint(-logps.astype(np.float64) * LOGP_SCALE), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    return gaps.ravel(), quantised.ravel()


def decode_topk(ids: np.ndarray, logps: np.ndarray, k: int, encoding: str) -> tuple[np.ndarray, np.ndarray]:
    """The two flat column values of one row -> ids (int64) and log-probs (float32), each [n, K]."""
    ids = np.asarray(ids).reshape(-1, k)
    logps = np.asarray(logps).reshape(-1, k)
    if encoding == "fp32":
        return ids.astype(np.int64), logps.astype(np.float32)
    if encoding != "compact":
        raise ValueError(f"unknown top-k encoding {encoding!r}")
    return np.cumsum(ids, axis=1, dtype=np.int64), (logps.astype(np.float32) / -LOGP_SCALE)


def column_bytes(paths, columns: list[str]) -> int:
    """Compressed bytes of `columns` in the Parquet files `paths`, from their footers (what the
    columns cost on disk; `wspo-shards info` and benchmarks/distill.py report it per token)."""
    import pyarrow.parquet as pq

    total = 0
    for path in paths:
        metadata = pq.ParquetFile(path).metadata
        for g in range(metadata.num_row_groups):
            group = metadata.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                if chunk.path_in_schema.split(".")[0] in columns:
                    total += chunk.total_compressed_size
    return total


def alternatives(ids: np.ndarray, logps: np.ndarray, n: int = 5) -> list[tuple[int, float]]:
    """The n most likely (id, log-prob) of one position's decoded top-k (either encoding's order)."""
    order = np.argsort(-logps, kind="stable")[:n]
    return [(int(ids[i]), float(logps[i])) for i in order]
