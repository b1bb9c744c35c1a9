"""The rows of one example put back together, by `example_id` (DESIGN section 2).

Phase one writes one row per scored response, each with its `slot` and the source row's
`example_id`. Readers that compare responses to one prompt (DPO / WRPO training, wspo-eval's
implicit-reward accuracy) pair them here, vectorised: a few integers per row, no Python object
per row. Examples come in the order of their first row; an example with several rows of a slot
(a dataset with a repeated example id) gives one tuple per complete set, paired in reading order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def rows_by_example(table: pa.Table, slots: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(tuples, per_slot) of a table of rows of `slots` (columns `example_id`, `slot`).

    tuples: [complete tuples, len(slots)], the row positions of each, in slot order; tuples in
    the reading order of their examples' first rows, then of the rows of each slot.
    per_slot: [examples, len(slots)], the rows each example has of each slot (examples in the
    order of their first rows), so an example has per_slot.min(axis=1) tuples and the rest of its
    rows are unpaired.
    """
    k, n = len(slots), table.num_rows
    if n == 0:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.int64)
    example = pc.index_in(table["example_id"], value_set=pc.unique(table["example_id"])).to_numpy().astype(np.int64)
    slot = pc.index_in(table["slot"].cast(pa.string()), value_set=pa.array(list(slots))).to_numpy().astype(np.int64)
    per_slot = np.bincount(example * k + slot, minlength=(example.max() + 1) * k).reshape(-1, k)  # [examples, k]
    complete = per_slot.min(axis=1)  # tuples of each example
    # Each row's rank among its example's rows of its slot, in reading order; tuple r takes rank r.
    order = np.lexsort((np.arange(n), slot, example))
    key = (example * k + slot)[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    kept = np.flatnonzero(rank < complete[example])
    return kept[np.lexsort((slot[kept], rank[kept], example[kept]))].reshape(-1, k), per_slot
