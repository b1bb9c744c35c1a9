"""Writing, reading and verifying shard sets (DESIGN section 4).

A shard set is a directory of Parquet part files plus one manifest per worker:
`manifest.json` when one worker wrote the set, `manifest-00003-of-00008.json` for worker 3 of 8.
Every file is written under a temporary name and renamed into place, the manifest last, so a file
with a final name is complete, and a directory with a manifest is a finished set. The directory
may be a local folder or any fsspec URL (`s3://...`): storage.py makes both look alike, and on
an object store a file appears under its final key only once its upload is complete. What a
manifest holds, and how it is named, built and read, is manifest.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import manifest_checksum, read_manifests
from .schema import byte_stream_split_columns, list_arrays  # noqa: F401  (list_arrays: re-exported)
from .storage import AnyPath, ShardError, is_url, parquet_file, publish, read_parquet, shard_path

ROWS_PER_ROW_GROUP = 4096


# -- names --------------------------------------------------------------------------------------


DATA_DIR = "data"  # format version 2: Parquet parts under data/, as a Hugging Face dataset folder


def part_name(worker_index: int, part_index: int) -> str:
    """A part's path relative to the set's root."""
    return f"{DATA_DIR}/part-{worker_index:05d}-{part_index:05d}.parquet"


# -- writing ------------------------------------------------------------------------------------


def sha256_file(path: AnyPath) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_parquet(table: pa.Table, path: AnyPath, metadata: dict[str, str] | None = None) -> None:
    """Write `table` with the format's Parquet settings, atomically.

    zstd; dictionary encoding only for the low-cardinality `slot` column (never for float lists);
    byte-stream-split for float columns, which compresses log-probs far better; no statistics on
    list columns (min/max of token ids are never queried).
    """
    if metadata:
        schema_md = dict(table.schema.metadata or {})
        schema_md.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(schema_md)
    floats = [f"{name}.list.element" for name in byte_stream_split_columns(table.schema)]
    floats += [f.name for f in table.schema if pa.types.is_floating(f.type)]
    publish(path, lambda tmp: pq.write_table(
        table,
        tmp,
        compression="zstd",
        use_dictionary=[name for name in ("slot",) if name in table.column_names],
        use_byte_stream_split=floats,
        write_statistics=[f.name for f in table.schema if not pa.types.is_list(f.type)],
        row_group_size=ROWS_PER_ROW_GROUP,
    ))


def write_text(text: str, path: AnyPath) -> None:
    publish(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(obj: dict, path: AnyPath) -> None:
    write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", path)


def write_manifest(manifest: dict, path: AnyPath) -> None:
    """The worker's manifest, with its checksum, written last and atomically."""
    write_json({**manifest, "checksum": manifest_checksum(manifest)}, path)


def file_record(path: AnyPath, tokens: int, root: AnyPath | None = None) -> dict:
    return {
        "path": path.relative_to(root).as_posix() if root is not None else path.name,
        "rows": parquet_file(path).metadata.num_rows,
        "tokens": tokens,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


class RewardStatistics:
    """The manifest's `reward` summary, accumulated one table at a time in bounded memory.

    Counts, mean, standard deviation, min and max are exact (means and squared deviations are
    merged per table, Chan et al.); the 1/50/99th percentiles are exact up to `SAMPLE` tokens and
    beyond that come from a systematic sample of every 2^k-th token (at least SAMPLE / 2 of them),
    so a set of any size costs a few MB here.
    """

    SAMPLE = 1 << 20

    def __init__(self):
        import numpy as np

        self._np = np
        self.tokens, self.mean, self.m2 = 0, 0.0, 0.0
        self.min, self.max = float("inf"), float("-inf")
        self.responses, self.sum_mean, self.sum_m2, self.positive = 0, 0.0, 0.0, 0
        self._sample, self._stride, self._seen = [], 1, 0

    @staticmethod
    def _merge(n, mean, m2, values):
        k = values.size
        if not k:
            return n, mean, m2
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = n + k
        delta = batch_mean - mean
        return total, mean + delta * k / total, m2 + batch_m2 + delta * delta * n * k / total

    def add(self, table: pa.Table) -> None:
        np = self._np
        if "reward" not in table.column_names:
            return
        column = table["reward"].combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        sums = table["reward_sum"].to_numpy().astype(np.float64)
        self.tokens, self.mean, self.m2 = self._merge(self.tokens, self.mean, self.m2, values)
        self.responses, self.sum_mean, self.sum_m2 = self._merge(self.responses, self.sum_mean, self.sum_m2, sums)
        self.positive += int((sums > 0).sum())
        if values.size:
            self.min, self.max = min(self.min, float(values.min())), max(self.max, float(values.max()))
        # Systematic sample: keep the tokens whose running index is a multiple of the stride;
        # when the sample is full, keep every other one and double the stride.
        first = (-self._seen) % self._stride
        self._sample.append(values[first :: self._stride].astype(np.float32))
        self._seen += values.size
        if sum(a.size for a in self._sample) > self.SAMPLE:
            # The sample holds tokens 0, s, 2s, ... in order: every other one is 0, 2s, 4s, ...
            self._sample = [np.concatenate(self._sample)[::2]]
            self._stride *= 2

    def result(self) -> dict | None:
        np = self._np
        if not self.tokens:
            return None
        sample = np.concatenate(self._sample).astype(np.float64)
        return {
            "tokens": int(self.tokens),
            "token_mean": float(self.mean),
            "token_std": float(np.sqrt(self.m2 / self.tokens)),
            "token_min": self.min,
            "token_max": self.max,
            "token_p01_p50_p99": [float(q) for q in np.quantile(sample, [0.01, 0.5, 0.99])],
            "token_percentiles_sampled": self._stride > 1,
            "sum_mean": float(self.sum_mean),
            "sum_std": float(np.sqrt(self.sum_m2 / self.responses)),
            "positive_sum_fraction": float(self.positive / self.responses),
        }


def reward_statistics(tables) -> dict | None:
    """Summary of the `reward` / `reward_sum` columns over `tables` (any iterable, read one by one)."""
    stats = RewardStatistics()
    for table in tables:
        stats.add(table)
    return stats.result()


# -- reading ------------------------------------------------------------------------------------


@dataclass
class ShardSet:
    root: AnyPath  # a local folder, or a URL (storage.UrlPath)
    manifests: list[dict]  # one per worker, in worker order

    @classmethod
    def open(cls, root: str | os.PathLike) -> "ShardSet":
        """Load the manifest(s) and check that every worker's part is present and consistent."""
        root = shard_path(root)
        return cls(root, read_manifests(root))

    # -- what the set is --

    @property
    def tokenizer(self) -> dict:
        return self.manifests[0]["tokenizer"]

    @property
    def scorers(self) -> list[dict]:
        return self.manifests[0]["scorers"]

    @property
    def topk(self) -> dict | None:
        """The top-k record (shards/topk.py) of a version-3 set with top-k columns, else None."""
        return self.manifests[0].get("topk")

    @property
    def scorer_names(self) -> list[str]:
        return [s["name"] for s in self.scorers]

    @property
    def files(self) -> list[dict]:
        return [f for m in self.manifests for f in m["files"]]

    @property
    def num_rows(self) -> int:
        return sum(f["rows"] for f in self.files)

    @property
    def num_tokens(self) -> int:
        return sum(f["tokens"] for f in self.files)

    @property
    def fingerprint(self) -> str:
        """Identity of the data: the sha256 of every file, in order."""
        return hashlib.sha256("".join(f["sha256"] for f in self.files).encode()).hexdigest()

    # -- checks --

    def file_problems(self, checksums: bool = True) -> dict[str, str]:
        """File name -> what is wrong with it, for every file that does not verify."""
        problems = {}
        for record in self.files:
            path = self.root / record["path"]
            if not path.exists():
                problems[record["path"]] = "missing"
            elif path.stat().st_size != record["bytes"]:
                problems[record["path"]] = f"{path.stat().st_size} bytes, manifest says {record['bytes']} (truncated or altered)"
            elif checksums and sha256_file(path) != record["sha256"]:
                problems[record["path"]] = "sha256 does not match the manifest (altered after writing)"
            else:
                try:
                    rows = parquet_file(path).metadata.num_rows
                except Exception as e:  # pyarrow raises several types for corrupt files
                    problems[record["path"]] = f"unreadable Parquet ({e})"
                    continue
                if rows != record["rows"]:
                    problems[record["path"]] = f"{rows} rows, manifest says {record['rows']}"
        return problems

    def unlisted_parts(self) -> list[str]:
        """Parquet parts in the set's folders that no manifest lists."""
        listed = {f["path"] for f in self.files}
        present = [p.relative_to(self.root).as_posix() for folder in (self.root, self.root / DATA_DIR)
                   if folder.is_dir() for p in sorted(folder.glob("*.parquet"))]
        return [p for p in present if p not in listed]

    def verify(self, checksums: bool = True) -> list[str]:
        """Everything wrong with the set's files, one line each (empty: the set verifies)."""
        problems = [f"{self.root / name}: {problem}" for name, problem in self.file_problems(checksums).items()]
        problems += [f"{self.root / name}: unlisted: a Parquet part that no manifest lists" for name in self.unlisted_parts()]
        return problems

    def check(self, checksums: bool = True) -> "ShardSet":
        problems = self.verify(checksums)
        if problems:
            raise ShardError(f"shard set {self.root} does not verify:\n  " + "\n  ".join(problems))
        return self

    # -- rows --

    def read_table(self, columns: list[str] | None = None, slots: list[str] | None = None) -> pa.Table:
        """All rows (optionally only some columns / slots), in file order."""
        tables = []
        for record in self.files:
            path = self.root / record["path"]
            try:
                table = read_parquet(path, columns=columns)
            except Exception as e:
                raise ShardError(f"{path}: cannot read ({e})") from None
            tables.append(table)
        table = pa.concat_tables(tables) if tables else pa.table({})
        if slots is not None:
            import pyarrow.compute as pc

            table = table.filter(pc.is_in(table["slot"], pa.array(slots)))
        return table

    # -- the Python API (docs/api.md) --

    @property
    def manifest(self) -> dict:
        """The set's manifest: the one worker's, or for several workers the first one's shared
        entries (tokenizer, scorers, run settings) with every worker's files and summed counts
        (`workers` then lists each worker's own manifest)."""
        if len(self.manifests) == 1:
            return self.manifests[0]
        counts = {}
        for m in self.manifests:
            for key, value in m["counts"].items():
                if isinstance(value, dict):
                    merged = counts.setdefault(key, {})
                    for reason, n in value.items():
                        merged[reason] = merged.get(reason, 0) + n
                elif key != "rows_in_split":
                    counts[key] = counts.get(key, 0) + value
                else:
                    counts[key] = value
        return {**self.manifests[0], "files": self.files, "counts": counts, "workers": self.manifests}

    def rows(self, columns: list[str] | None = None, slots: list[str] | None = None, batch_size: int = 1024):
        """Every row as a dict, in file order, read one batch of `batch_size` rows at a time (memory
        follows the batch, not the set); optionally only some columns and slots."""
        read = None if columns is None else list(dict.fromkeys([*columns, *(["slot"] if slots else [])]))
        for record in self.files:
            path = self.root / record["path"]
            try:
                batches = parquet_file(path).iter_batches(batch_size=batch_size, columns=read)
                for batch in batches:
                    for row in batch.to_pylist():
                        if slots is None or row["slot"] in slots:
                            yield {k: row[k] for k in columns} if columns is not None else row
            except (OSError, pa.ArrowException) as e:
                raise ShardError(f"{path}: cannot read ({e})") from None

    def to_dataset(self, cache_dir: str | os.PathLike | None = None):
        """The rows as a memory-mapped `datasets.Dataset` (Arrow files in the datasets cache, or
        `cache_dir`; built once per set, then reused)."""
        from datasets import Dataset

        if is_url(self.root):
            raise ShardError(f"{self.root}: to_dataset reads a local shard set; copy it to a local folder first "
                             "(or read it with .rows(), which streams from the store)")
        return Dataset.from_parquet([str(self.root / f["path"]) for f in self.files],
                                    cache_dir=None if cache_dir is None else str(cache_dir))

    def to_trl_dpo(self, tokenizer=None, max_length: int | None = 1024):
        """A `datasets.Dataset` that TRL 1.16's DPOTrainer trains on with the shards' reference
        log-prob sums; refused, naming the row, if TRL would tokenize differently
        (wspo.shards.trl_export; docs/shard-format.md "Training with TRL")."""
        from .trl_export import to_trl_dpo

        return to_trl_dpo(self, tokenizer=tokenizer, max_length=max_length)
