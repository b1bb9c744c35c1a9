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

from wspo.shards.schema import canonical_json
from wspo.shards.tokenization import Skip


@dataclass
class Example:
    index: int  # position in the source split: the order of rows in the shards
    example_id: str
    responses: dict[str, tuple[list[dict], str]]  # slot -> (messages before the response, response)


# -- reading the source -------------------------------------------------------------------------

_SUFFIXES = (".json", ".jsonl", ".parquet")


def _read_json_file(path: Path) -> list[dict]:
    """JSON lines or a JSON list, read with `json` so that a row of the wrong type reaches
    `to_example` (and is skipped, counted) instead of failing Arrow's type unification."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset: {path}: invalid JSON ({e})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"dataset: {path} line {lineno}: invalid JSON ({e})") from None
    return rows


def load_rows(dataset: str, split: str, max_samples: int | None = None) -> list[dict]:
    """The source split as a list of dicts (hub name, local file or folder, or 'embedded')."""
    if dataset == "embedded":
        from wspo.embedded.sample import SAMPLE_DIR

        dataset = str(SAMPLE_DIR)
    path = Path(dataset).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES)
        if not files or any(p.suffix not in _SUFFIXES for p in files):
            raise FileNotFoundError(f"dataset: {path} holds no .json, .jsonl or .parquet files")
        if path.is_dir():
            # A folder of split files (train_prefs.jsonl, ...) picks the split by file name.
            named = [p for p in files if p.stem == split or p.stem.startswith(f"{split}-") or p.parent.name == split]
            if not named:
                raise FileNotFoundError(
                    f"dataset: {path} has no files for split {split!r} (looked for {split}.jsonl, {split}-*.parquet, {split}/*)"
                )
            files = named
        rows = []
        for p in files:
            if p.suffix == ".parquet":
                import pyarrow.parquet as pq

                rows += pq.read_table(p).to_pylist()
            else:
                rows += _read_json_file(p)
    elif path.is_absolute() or dataset.startswith("."):
        raise FileNotFoundError(f"dataset: {dataset} does not exist")
    else:
        import datasets

        try:
            rows = datasets.load_dataset(dataset, split=split)
        except Exception as e:
            raise FileNotFoundError(f"dataset: cannot load {dataset!r} split {split!r} ({type(e).__name__}: {e})") from None
        if max_samples is not None:
            rows = rows.select(range(min(max_samples, len(rows))))
        return rows.to_list()
    return rows[:max_samples] if max_samples is not None else rows


def dataset_fingerprint(rows) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(canonical_json(row).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def detect_format(rows: list[dict]) -> str:
    cols = set().union(*(row.keys() for row in rows[:100] if isinstance(row, dict)))
    if {"instruction", "chosen", "rejected"} <= cols:
        return "llamafactory"
    if {"prompt", "chosen", "rejected"} <= cols:
        # H4 and WRPO share column names; WRPO's `chosen` holds two conversations.
        first = next((row["chosen"] for row in rows if isinstance(row, dict) and row.get("chosen")), None)
        return "wrpo" if isinstance(first, list) and isinstance(first[0], list) else "h4"
    raise ValueError(
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
            raise ValueError(f"column_map: bad item {item!r}; expected prompt=COL, system=COL, chosen=COL, rejected=COL or id=COL")
        mapping[key.strip()] = column.strip()
    for key in ("prompt", "chosen"):
        if key not in mapping:
            raise ValueError(f"column_map: {key}=COL is required")
    return mapping


def _row_hash(row: dict) -> str:
    return hashlib.sha256(canonical_json(row).encode()).hexdigest()


def to_example(index: int, row: dict, layout: str, slots: list[str], column_map: str | None = None) -> Example:
    """Normalise one source row; raises `Skip` (with a counted reason) when it is malformed."""
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
        raise ValueError(f"unknown dataset layout {layout!r}")
    for slot, (_, response) in responses.items():
        if not response.strip():
            raise Skip("empty_response", f"{slot} response is empty")
    return Example(index=index, example_id=example_id, responses=responses)
