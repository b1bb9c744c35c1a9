"""Dataset rows -> examples: (example id, conversation before the response, response per slot).

Layouts (`dataset_format`):
- `h4`: HuggingFaceH4/ultrafeedback_binarized: `prompt`, `prompt_id`, `chosen`/`rejected` as
  message lists whose last message is the assistant's response;
- `llamafactory`: llamafactory/ultrafeedback_binarized: `instruction` (+ optional `system`),
  `chosen`/`rejected` as response strings;
- `wrpo`: the WRPO release: `prompt`, `chosen` = [y_ws, y_wt] message lists, `rejected` = [y_l];
- `columns`: any other layout, through `column_map` ('prompt=COL,chosen=COL,...').
A malformed row raises `Skip` with the reason counted in the manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from wspo.errors import ConfigError, InputError, InputPathError
from wspo.shards.schema import canonical_json
from wspo.shards.tokenization import Skip


@dataclass
class DatasetExample:
    index: int  # position in the source split: the order of rows in the shards
    example_id: str
    responses: dict[str, tuple[list[dict], str]]  # slot -> (messages before the response, response)


# -- reading the source -------------------------------------------------------------------------
#
# A split is read lazily (DESIGN section 8): `open_source` counts and fingerprints it cheaply (one
# pass over the raw bytes of local files, the Arrow metadata of Parquet files and hub datasets),
# and `Source.rows(start, stop)` yields only the rows of one block, one at a time. Nothing holds
# the whole split in Python objects, so a worker's memory does not grow with the split's size.

_SUFFIXES = (".json", ".jsonl", ".parquet")
_BATCH = 1024  # rows converted from Arrow to Python at a time


class InvalidRow:
    """A line of a JSON-lines file that is not valid JSON or not UTF-8: it keeps its place in the
    split (so row numbers stay those of the file) and `to_example` turns it into a counted skip."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


def _split_files(path: Path, split: str) -> list[Path]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES)
    if not files or any(p.suffix not in _SUFFIXES for p in files):
        raise InputPathError(f"dataset: {path} holds no .json, .jsonl or .parquet files")
    if path.is_dir():
        # A folder of split files (train_prefs.jsonl, ...) picks the split by file name.
        named = [p for p in files if p.stem == split or p.stem.startswith(f"{split}-") or p.parent.name == split]
        if not named:
            raise InputPathError(
                f"dataset: {path} has no files for split {split!r} (looked for {split}.jsonl, {split}-*.parquet, {split}/*)"
            )
        files = named
    return files


class _JsonLines:
    """One JSON-lines file: a line index of block boundaries is not kept; `rows` re-scans the raw
    bytes (fast, in C) to the block's first line and parses only the block's lines."""

    def __init__(self, path: Path, digest):
        self.path = path
        self.num_rows = 0
        with open(path, "rb") as f:
            for line in f:
                digest.update(line)
                if line.strip():
                    self.num_rows += 1

    def rows(self, start: int, stop: int):
        index = 0
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                if index >= stop:
                    return
                if index >= start:
                    yield self._parse(raw, lineno)
                index += 1

    def _parse(self, raw: bytes, lineno: int):
        where = f"{self.path} line {lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return InvalidRow("invalid_text", f"{where}: bytes that are not UTF-8 at column {e.start + 1}")
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            return InvalidRow("invalid_json", f"{where}: invalid JSON ({e.msg}, column {e.colno})")


class _JsonList:
    """A `.json` file holding one JSON list: JSON has no streaming parse in the standard library, so
    this one file is read whole (prefer JSON lines or Parquet for large splits)."""

    def __init__(self, path: Path, digest):
        raw = path.read_bytes()
        digest.update(raw)
        try:
            self._rows = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(f"dataset: {path}: bytes that are not UTF-8 at offset {e.start}") from None
        except json.JSONDecodeError as e:
            raise InputError(f"dataset: {path}: invalid JSON ({e})") from None
        if not isinstance(self._rows, list):
            raise InputError(f"dataset: {path}: a .json file must hold a list of rows or JSON lines")
        self.num_rows = len(self._rows)

    def rows(self, start: int, stop: int):
        yield from self._rows[start:stop]


class _ParquetFile:
    """A Parquet file: the row count comes from its footer; `rows` reads only the row groups that
    overlap the block, a batch at a time."""

    def __init__(self, path: Path, digest):
        import pyarrow.parquet as pq

        self.path = path
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        try:
            self.num_rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow raises several types for a damaged footer
            raise InputError(f"dataset: {path}: not a readable Parquet file ({e})") from None

    def rows(self, start: int, stop: int):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(self.path)
        first = 0
        for group in range(parquet.num_row_groups):
            size = parquet.metadata.row_group(group).num_rows
            if first + size > start and first < stop:
                table = parquet.read_row_group(group)
                lo, hi = max(start - first, 0), min(stop - first, size)
                for offset in range(lo, hi, _BATCH):
                    yield from table.slice(offset, min(_BATCH, hi - offset)).to_pylist()
            first += size
            if first >= stop:
                return


class _HubDataset:
    """A hub dataset through `datasets`: an Arrow table memory-mapped from its cache."""

    def __init__(self, name: str, split: str):
        import datasets

        try:
            self.dataset = datasets.load_dataset(name, split=split)
        except Exception as e:
            raise InputPathError(f"dataset: cannot load {name!r} split {split!r} ({type(e).__name__}: {e})") from None
        self.num_rows = len(self.dataset)
        self.fingerprint = self.dataset._fingerprint

    def rows(self, start: int, stop: int):
        for offset in range(start, stop, _BATCH):
            batch = self.dataset[offset : min(offset + _BATCH, stop)]
            keys = list(batch)
            yield from (dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys)))


@dataclass
class Source:
    """A split, counted and fingerprinted; rows are read by block on demand."""

    name: str
    split: str
    parts: list  # the split's files in order (or one hub dataset)
    num_rows: int  # after max_samples
    fingerprint: str

    def rows(self, start: int = 0, stop: int | None = None):
        """Rows [start, stop) of the split, in order; a malformed JSON line is an `InvalidRow`."""
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        first = 0
        for part in self.parts:
            lo, hi = max(start - first, 0), min(stop - first, part.num_rows)
            if lo < hi:
                yield from part.rows(lo, hi)
            first += part.num_rows
            if first >= stop:
                return

    def head(self, n: int = 100) -> list:
        return list(self.rows(0, min(n, self.num_rows)))


def open_source(dataset: str, split: str, max_samples: int | None = None) -> Source:
    """The split of a hub dataset, a local file or folder, or 'embedded', ready to read by block."""
    if dataset == "embedded":
        from wspo.embedded.sample import SAMPLE_DIR

        dataset = str(SAMPLE_DIR)
    path = Path(dataset).expanduser()
    digest = hashlib.sha256()
    if path.exists():
        parts = []
        for p in _split_files(path, split):
            digest.update(f"{p.name}\0".encode())
            if p.suffix == ".parquet":
                parts.append(_ParquetFile(p, digest))
            elif p.suffix == ".json" and p.read_bytes()[:64].lstrip().startswith(b"["):
                parts.append(_JsonList(p, digest))
            else:
                parts.append(_JsonLines(p, digest))
        fingerprint = digest.hexdigest()
    elif path.is_absolute() or dataset.startswith("."):
        raise InputPathError(f"dataset: {dataset} does not exist")
    else:
        parts = [_HubDataset(dataset, split)]
        fingerprint = parts[0].fingerprint
    num_rows = sum(p.num_rows for p in parts)
    if max_samples is not None:
        num_rows = min(num_rows, max_samples)
    return Source(dataset, split, parts, num_rows, fingerprint)


def load_rows(dataset: str, split: str, max_samples: int | None = None) -> list:
    """A whole (small) split as a list, for evaluation sets; phase one reads by block instead."""
    return list(open_source(dataset, split, max_samples).rows())


def detect_format(rows: list) -> str:
    """The layout of a split from its first rows (`Source.head()`)."""
    cols = set().union(*(row.keys() for row in rows[:100] if isinstance(row, dict)))
    if {"instruction", "chosen", "rejected"} <= cols:
        return "llamafactory"
    if {"prompt", "chosen", "rejected"} <= cols:
        # H4 and WRPO share column names; WRPO's `chosen` holds two conversations.
        first = next((row["chosen"] for row in rows if isinstance(row, dict) and row.get("chosen")), None)
        return "wrpo" if isinstance(first, list) and isinstance(first[0], list) else "h4"
    raise InputError(
        f"dataset_format=auto: columns {sorted(cols)} match no known layout (h4: prompt/chosen/rejected; "
        "llamafactory: instruction/chosen/rejected); set dataset_format=columns and column_map"
    )


# -- one row -> one example ---------------------------------------------------------------------


def _require(row: dict, key: str, kind: type | tuple[type, ...]):
    if key not in row or row[key] is None:
        raise Skip("missing_field", f"field {key!r} is missing")
    if not isinstance(row[key], kind):
        raise Skip("wrong_type", f"field {key!r} is {type(row[key]).__name__}")
    return row[key]


def _check_messages(messages, key: str) -> list[dict]:
    if not isinstance(messages, list):
        raise Skip("wrong_type", f"field {key!r} is {type(messages).__name__}, expected a message list")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise Skip("wrong_type", f"field {key!r} has a message that is not {{role: str, content: str}}")
        clean.append({"role": m["role"], "content": m["content"]})
    return clean


def _split_conversation(conversation, key: str) -> tuple[list[dict], str]:
    messages = _check_messages(conversation, key)
    if len(messages) < 2:
        raise Skip("missing_field", f"field {key!r} has no conversation before the response")
    if messages[-1]["role"] != "assistant":
        raise Skip("last_turn_not_assistant", f"the last turn of {key!r} is {messages[-1]['role']!r}")
    return messages[:-1], messages[-1]["content"]


def _parse_column_map(column_map: str) -> dict[str, str]:
    mapping = {}
    for item in column_map.split(","):
        key, sep, column = item.partition("=")
        if not sep or key.strip() not in ("prompt", "system", "chosen", "rejected", "id"):
            raise ConfigError(f"column_map: bad item {item!r}; expected prompt=COL, system=COL, chosen=COL, rejected=COL or id=COL")
        mapping[key.strip()] = column.strip()
    for key in ("prompt", "chosen"):
        if key not in mapping:
            raise ConfigError(f"column_map: {key}=COL is required")
    return mapping


def _row_hash(row: dict) -> str:
    return hashlib.sha256(canonical_json(row).encode()).hexdigest()


def to_example(index: int, row: dict, layout: str, slots: list[str], column_map: str | None = None) -> DatasetExample:
    """Normalise one source row; raises `Skip` (with a counted reason) when it is malformed."""
    if isinstance(row, InvalidRow):
        raise Skip(row.reason, row.detail)
    if not isinstance(row, dict):
        raise Skip("wrong_type", f"row is a {type(row).__name__}, not an object")
    responses: dict[str, tuple[list[dict], str]] = {}
    if layout == "h4":
        _require(row, "prompt", str)
        for slot in slots:
            if slot not in ("chosen", "rejected"):
                raise Skip("slot_not_in_layout", f"slot {slot!r} does not exist in the h4 layout")
            responses[slot] = _split_conversation(_require(row, slot, list), slot)
        example_id = row.get("prompt_id") if isinstance(row.get("prompt_id"), str) else _row_hash(row)
    elif layout == "wrpo":
        _require(row, "prompt", str)
        chosen = _require(row, "chosen", list)
        rejected = _require(row, "rejected", list)
        if len(chosen) != 2 or len(rejected) < 1:
            raise Skip("wrong_type", "wrpo layout needs chosen = [y_ws, y_wt] and rejected = [y_l]")
        sources = {"chosen_source": (chosen[0], "chosen[0]"), "chosen_target": (chosen[1], "chosen[1]"),
                   "rejected": (rejected[0], "rejected[0]"), "chosen": (chosen[1], "chosen[1]")}
        for slot in slots:
            conversation, key = sources[slot]
            responses[slot] = _split_conversation(conversation, key)
        example_id = row.get("prompt_id") if isinstance(row.get("prompt_id"), str) else _row_hash(row)
    elif layout in ("llamafactory", "columns"):
        mapping = (
            {"prompt": "instruction", "system": "system", "chosen": "chosen", "rejected": "rejected", "id": "id"}
            if layout == "llamafactory"
            else _parse_column_map(column_map or "")
        )
        prompt = _require(row, mapping["prompt"], str)
        messages = []
        system = row.get(mapping.get("system", ""), None)
        if system:
            if not isinstance(system, str):
                raise Skip("wrong_type", f"field {mapping['system']!r} is {type(system).__name__}")
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
        for slot in slots:
            if slot not in ("chosen", "rejected") or slot not in mapping:
                raise Skip("slot_not_in_layout", f"slot {slot!r} has no column in the {layout} layout")
            value = _require(row, mapping[slot], (str, list))
            if isinstance(value, list):  # a message list ending with the response
                responses[slot] = _split_conversation(value, mapping[slot])
            else:
                responses[slot] = (messages, value)
        rid = row.get(mapping.get("id", ""), None)
        example_id = str(rid) if isinstance(rid, (str, int)) else _row_hash(row)
    else:
        raise ConfigError(f"unknown dataset layout {layout!r}")
    for slot, (_, response) in responses.items():
        if not response.strip():
            raise Skip("empty_response", f"{slot} response is empty")
    return DatasetExample(index=index, example_id=example_id, responses=responses)
