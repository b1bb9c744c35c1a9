"""Training rows kept in memory-mapped Arrow; each example built and checked when it is drawn
(DESIGN section 8).

    row_cache        (row_cache.py) once per shard set: its rows of the wanted slots and columns,
                     decompressed into an uncompressed Arrow IPC file named by the set's
                     fingerprint (reused by later runs), with the held-out bucket of each row's
                     example_id; opened as a memory-mapped table, so the ranks of a node share
                     its pages and nothing scales with the number of rows in Python objects
    OpenRows         the cached tables of every training set, the rows per slot, and the
                     vectorised checks (a row id in two sets; the `id` join with logp_strong_ref)
    ShardRowsDataset the train or held-out side (numpy positions chosen by the example_id hash);
                     `__getitem__` re-tokenizes one row, checks it against its stored ids (the
                     same error naming the row as the eager path) and cuts it to max_length, so
                     start-up does not grow with the number of rows and the data loader's workers
                     share the tokenization work

A row the strong rule cannot train on (its prompt leaves no room under max_length, the strong
chat template refuses it, or with projection no chunk is usable) is counted and replaced by the
next trainable row, so batches keep their size.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from wspo.shards.store import ShardSet
from wspo.shards.tokenization import ResponseTokenizer

from .examples import TRAIN_SLOTS, checked_prompt, project_row, token_example
from .row_cache import BUCKET_COLUMN, row_cache
from .shard_sets import DataError


def open_cache(path: Path) -> tuple[pa.Table, dict]:
    """A cache file as a memory-mapped table (zero-copy views of the file's pages), and the
    set's rows per slot."""
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    return table, json.loads(table.schema.metadata[b"wspo_rows_per_slot"])


class MappedTables:
    """Cache files opened as one concatenated, memory-mapped table. Pickled (a data loader worker
    started by spawn) as the file paths, and mapped again on arrival: never as row data."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self._open()

    def _open(self) -> None:
        opened = [open_cache(path) for path in self.paths]
        self.parts = [table for table, _ in opened]
        self.rows_per_slot = [per_slot for _, per_slot in opened]
        # zero-copy: one chunk list over the mapped files
        self.table = pa.concat_tables(self.parts) if self.parts else pa.table({"id": pa.array([], pa.string())})

    def __getstate__(self) -> dict:
        return {"paths": self.paths}

    def __setstate__(self, state: dict) -> None:
        self.paths = state["paths"]
        self._open()


class OpenRows:
    """The cached training rows of every set (`MappedTables`), the rows per slot, and the
    vectorised check that no row id is in two sets."""

    def __init__(self, shard_sets: list[ShardSet], columns: list[str], cache_dir: Path, slots=TRAIN_SLOTS):
        cached = [(s.root, row_cache(s, columns, slots, cache_dir)) for s in shard_sets]
        self.counts = Counter()
        self.roots = [root for root, path in cached if path is not None]
        self.mapped = MappedTables([path for _, path in cached if path is not None])
        for per_slot in self.mapped.rows_per_slot:
            self.counts.update({f"rows_{slot}": n for slot, n in per_slot.items()})
        self.set_ends = np.cumsum([t.num_rows for t in self.mapped.parts])  # row r is in the first set whose end > r
        parts = self.mapped.parts
        for a in range(len(parts)):  # the same (messages, response) in two sets would be trained on twice
            for b in range(a + 1, len(parts)):
                both = pc.is_in(parts[b]["id"], value_set=parts[a]["id"].combine_chunks())
                if pc.any(both).as_py():
                    row = parts[b]["id"][pc.index(both, True).as_py()].as_py()
                    raise DataError(f"row {row} is in both {self.roots[a]} and {self.roots[b]}")

    @property
    def table(self) -> pa.Table:
        return self.mapped.table

    def root_of(self, position: int) -> Path:
        return self.roots[int(np.searchsorted(self.set_ends, position, side="right"))]

    def split(self, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the training and held-out rows, by the hash of example_id (examples.is_eval_example)."""
        if self.table.num_rows == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        buckets = self.table[BUCKET_COLUMN].to_numpy() / 2**32
        held_out = buckets < eval_fraction
        return np.flatnonzero(~held_out), np.flatnonzero(held_out)


class ReferenceJoin:
    """Row id -> its reference log-probs (logp_strong_ref) in the reference sets: a vectorised
    `id` join, one int64 per training row; a training row missing there is named up front."""

    def __init__(self, rows: OpenRows, sets: list[ShardSet], column: str, cache_dir: Path, slots=TRAIN_SLOTS):
        paths = [row_cache(s, ["id", column], slots, cache_dir) for s in sets]
        self.mapped = MappedTables([p for p in paths if p is not None])
        self.column = column
        ids = self.mapped.table["id"].combine_chunks() if self.mapped.table.num_rows else pa.array([], pa.string())
        found = pc.index_in(rows.table["id"], value_set=ids)
        missing = pc.is_null(found)
        if pc.any(missing).as_py():
            at = pc.index(missing, True).as_py()
            raise DataError(
                f"row {rows.table['id'][at].as_py()} (example {rows.table['example_id'][at].as_py()}) of "
                f"{rows.root_of(at)} has no {column} in the reference shards"
            )
        self.index = found.to_numpy(zero_copy_only=False).astype(np.int64)

    def logps(self, position: int) -> np.ndarray:
        return np.asarray(self.mapped.table[self.column][int(self.index[position])].as_py(), dtype=np.float32)


class ShardRowsDataset(torch.utils.data.Dataset):
    """One side (train or held out) of the rows; examples are built when drawn (module docstring)."""

    def __init__(self, rows: OpenRows, positions: np.ndarray, rule: ResponseTokenizer, with_rewards: bool,
                 project: bool = False, reference: ReferenceJoin | None = None, same_vocab: bool = False,
                 teacher=None, vocab_size: int | None = None):
        self.rows, self.positions, self.rule = rows, positions, rule
        self.teacher, self.vocab_size = teacher, vocab_size  # kd: distill.TeacherColumns, the student's embeddings
        self.with_rewards, self.project, self.reference, self.same_vocab = with_rewards, project, reference, same_vocab
        self.counts: Counter = Counter()  # rows skipped / cut as met (in this process)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        for step in range(len(self.positions)):  # a skipped row: the next trainable one stands in
            j = (i + step) % len(self.positions)
            example = self._example(int(self.positions[j]))
            if example is not None:
                example.index = j
                return example
        raise DataError(f"none of the {len(self.positions)} rows can be trained on under max_length {self.rule.max_length} "
                        f"(skipped: {dict(self.counts)})")

    def _example(self, position: int):
        row = self.rows.table.slice(position, 1).to_pylist()[0]
        root = self.rows.root_of(position)
        if self.project:
            weak = {c: np.asarray(row[c]) for c in ("token_ids", "token_start", "token_end", "reward") if c in row}
            return project_row(row, self.rule, weak, self.same_vocab, self.counts)
        stored = row["token_ids"]
        prompt = checked_prompt(row, stored, self.rule, self.counts, root)
        if prompt is None:
            return None
        reward = np.asarray(row["reward"], dtype=np.float32) if self.with_rewards else None
        ref = self.reference.logps(position) if self.reference is not None else None
        example = token_example(row, prompt, stored, reward, ref, self.rule, self.counts, root)
        if example is not None and self.teacher is not None:
            keep = len(example.input_ids) - example.prompt_length
            example.topk_ids, example.topk_logps = self.teacher.decode(row, keep, self.vocab_size, root)
        return example

    @property
    def num_tokens(self) -> int:
        """Response tokens as the shards store them (before a shorter training max_length cuts them)."""
        return int(self.rows.table["n_tokens"].to_numpy()[self.positions].sum())

    @property
    def lengths(self) -> np.ndarray:
        """Approximate tokens per row for length-grouped sampling: the stored response tokens plus
        the conversation's UTF-8 bytes / 4 (the prompt is tokenized only when the row is drawn)."""
        messages = pc.binary_length(self.rows.table["messages"]).to_numpy()  # no copy of the text
        return self.rows.table["n_tokens"].to_numpy()[self.positions] + messages[self.positions] // 4


def row_datasets(shard_sets: list[ShardSet], rule: ResponseTokenizer, loss: str, project: bool, eval_fraction: float,
                 cache_dir: Path, counts: Counter, reference: tuple[list[ShardSet], str] | None = None,
                 teacher=None, vocab_size: int | None = None):
    """Pipeline step 2 for wspo / sft: (train dataset, held-out dataset or None, row count).

    `reference`: (reference shard sets, column) when the strong reference's log-probs come from
    shards. `teacher` (kd): the top-k columns to read (distill.TeacherColumns), checked against the
    student's `vocab_size`. `counts` receives the rows per slot now and, as rows are drawn, the skipped and cut
    rows (the run record's counts).
    """
    if project and reference is not None:
        raise DataError("reference log-probs from shards are per token of the shards' tokenizer; with reward projection use --reference_logps model")
    columns = ["id", "example_id", "messages", "response", "token_ids", "truncated", "n_tokens"]
    if loss == "wspo":
        columns.append("reward")
    if project:
        columns += ["token_start", "token_end"]
    if teacher is not None:
        columns += teacher.columns
    rows = OpenRows(shard_sets, columns, cache_dir)
    counts.update(rows.counts)
    join = ReferenceJoin(rows, reference[0], reference[1], cache_dir) if reference is not None else None
    train, held_out = rows.split(eval_fraction)
    same_vocab = rule.matches(shard_sets[0].tokenizer)

    def side(positions):
        dataset = ShardRowsDataset(rows, positions, rule, with_rewards=loss == "wspo", project=project, reference=join,
                                   same_vocab=same_vocab, teacher=teacher, vocab_size=vocab_size)
        dataset.counts = counts
        return dataset

    return side(train), side(held_out) if len(held_out) else None, rows.table.num_rows
