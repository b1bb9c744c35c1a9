"""Offline distillation (`--loss kd`, docs/distill.md): which stored top-k columns are the teacher.

Phase one stored, per response position, a scorer's K most likely ids and their log-probs
(shards/topk.py). Here the shard sets are checked to carry them, all with one K and one encoding
(a batch's [tokens, K] tensors need one width), and each drawn row's columns are decoded and
cut like its tokens. The student must share the shards' tokenizer (pipeline.py refuses
another one): the ids are the teacher's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wspo.shards.store import ShardSet
from wspo.shards.topk import decode_topk, ids_column, logps_column

from .shard_sets import DataError


@dataclass(frozen=True)
class TeacherColumns:
    scorer: str
    k: int
    encoding: str

    @property
    def columns(self) -> list[str]:
        return [ids_column(self.scorer), logps_column(self.scorer)]

    def decode(self, row: dict, keep: int, vocab_size: int | None, root) -> tuple[np.ndarray, np.ndarray]:
        """A row's teacher ids [keep, K] (int64) and log-probs [keep, K] (float32), the first `keep`
        positions; an id outside the student's vocabulary is an error naming the row."""
        ids, logps = decode_topk(row[self.columns[0]], row[self.columns[1]], self.k, self.encoding)
        if len(ids) < keep:
            raise DataError(f"row {row['id']} of {root}: {len(ids)} top-k positions for {keep} tokens")
        ids, logps = ids[:keep], logps[:keep]
        if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
            raise DataError(f"row {row['id']} (example {row['example_id']}) of {root}: teacher token id {int(ids.max())} "
                            f"is outside the student's {vocab_size} embeddings")
        return ids, logps


def teacher_columns(shard_sets: list[ShardSet], kd_scorer: str | None) -> TeacherColumns:
    """The teacher's top-k columns, the same in every set; an error naming the set otherwise."""
    found = []
    for shard_set in shard_sets:
        topk = shard_set.topk
        if not topk:
            raise DataError(
                f"shard set {shard_set.root} has no top-k columns (format version "
                f"{shard_set.manifests[0].get('format_version')}); loss kd needs a teacher's top-k log-probs: "
                "wspo-precompute --teacher MODEL --topk K"
            )
        scorer = kd_scorer or (topk["scorers"][0] if len(topk["scorers"]) == 1 else "teacher")
        if scorer not in topk["scorers"]:
            raise DataError(f"shard set {shard_set.root} stores top-k columns of {', '.join(topk['scorers'])}, not of "
                            f"{scorer!r}; choose one with --kd_scorer")
        found.append((shard_set.root, TeacherColumns(scorer, int(topk["k"]), topk["encoding"])))
    first = found[0][1]
    for root, columns in found[1:]:
        if (columns.k, columns.encoding) != (first.k, first.encoding):
            raise DataError(f"shard set {root} stores top-{columns.k} ({columns.encoding}) but {found[0][0]} top-{first.k} "
                            f"({first.encoding}); distill from sets scored with one --topk at a time")
    return first
