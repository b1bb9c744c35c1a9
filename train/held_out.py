"""Held-out metrics that count every example once, whatever the number of processes.

With several processes the evaluation data loader gives every rank the same number of batches of
the same size by repeating examples from the start of the held-out set (accelerate's
`even_batches`), so a sum over batches counts those examples twice. Evaluation therefore records
one row of statistics per example, keyed by the example's position in the held-out set (the
batch's `row_index`); at the end of an evaluation the ranks' rows are gathered and each position
is counted once. The same key also counts once a row that stood in for an untrainable one
(rows.py), so one process and several give the same metrics.

What a row holds is the trainer's choice (trainer.py, preference.py); this module only adds
rows up.
"""

from __future__ import annotations

import numpy as np
import torch


class HeldOutLedger:
    def __init__(self) -> None:
        self._positions: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []

    def add(self, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """positions: [examples] held-out positions; rows: [examples, k] their statistics."""
        self._positions.append(positions.detach().cpu().numpy().astype(np.int64))
        self._rows.append(rows.detach().double().cpu().numpy())

    def totals(self, accelerator) -> tuple[int, np.ndarray]:
        """(examples, column sums over them) across every rank, each position once; then empties
        the ledger. A collective when several processes run: every rank must call it."""
        local = (np.concatenate(self._positions) if self._positions else np.zeros(0, np.int64),
                 np.concatenate(self._rows) if self._rows else None)
        self._positions.clear()
        self._rows.clear()
        parts = [local]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object([local])
        parts = [(p, r) for p, r in parts if r is not None]
        if not parts:
            return 0, np.zeros(0)
        positions = np.concatenate([p for p, _ in parts])
        rows = np.concatenate([r for _, r in parts])
        _, first = np.unique(positions, return_index=True)
        return len(first), rows[first].sum(axis=0)
