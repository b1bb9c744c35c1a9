"""Held-out metrics count every held-out example once, with one process or several.

With two processes the evaluation loader repeats held-out examples so both ranks get batches of
one size (accelerate's `even_batches`); summing over batches would count those twice. The
metrics of a 2-process run (torchrun, gloo) must equal a 1-process run's and the value computed
here from the held-out rows themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from test_train_distributed import REPO, free_port
from test_train_helpers import TRAIN_MAX_LENGTH, train_argv, train_setup  # noqa: F401  (fixture)

EVAL_FRACTION = 0.3


def held_out_expected(setup, cache_dir) -> tuple[int, float, float]:
    """(held-out examples, eval_loss, eval_reward_mean) before any training step: the policy is
    the reference, so each example's WSPO term is the mean of its squared rewards."""
    from wspo.models import load_tokenizer
    from wspo.train.shard_sets import open_shard_sets, strong_rule
    from wspo.train.rows import row_datasets

    sets = open_shard_sets([str(setup["shards"])], "wspo")
    rule, _ = strong_rule(sets, load_tokenizer(setup["strong_sft"]), TRAIN_MAX_LENGTH, "none")
    _, held_out, _ = row_datasets(sets, rule, "wspo", False, EVAL_FRACTION, cache_dir, Counter())
    rewards = {e.index: e.rewards.astype(np.float64) for e in (held_out[i] for i in range(len(held_out)))}
    loss = np.mean([np.mean(r * r) for r in rewards.values()])
    mean = sum(r.sum() for r in rewards.values()) / sum(len(r) for r in rewards.values())
    return len(held_out), float(loss), float(mean)


def first_eval(output_dir) -> dict:
    record = json.loads((output_dir / "wspo_run.json").read_text())
    return next(h for h in record["log_history"] if "eval_loss" in h)


@pytest.mark.slow
def test_two_processes_count_each_held_out_example_once(train_setup, tmp_path):  # noqa: F811
    n, loss, reward_mean = held_out_expected(train_setup, tmp_path / "cache")
    batch = next(b for b in (3, 4, 5, 6) if n % (2 * b) and n > 2 * b)  # the last batches must be evened out
    # Evaluate before the first step (policy = reference), with packed batches: their rows are
    # not the examples, which the stock per-batch loss weighting got wrong as well.
    keys = dict(eval_fraction=EVAL_FRACTION, eval_strategy="steps", eval_steps=100, eval_on_start="true", max_steps=1,
                per_device_eval_batch_size=batch, per_device_train_batch_size=2, packing="true")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}

    single = tmp_path / "single"
    argv = [str(a) for a in train_argv(train_setup, single, **keys)]
    done = subprocess.run([sys.executable, "-m", "wspo.train.cli", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    multi = tmp_path / "two"
    argv = [str(a) for a in train_argv(train_setup, multi, **keys)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                "-m", "wspo.train.cli"]
    done = subprocess.run([*torchrun, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((multi / "wspo_run.json").read_text())["parallel"]["world_size"] == 2

    one, two = first_eval(single), first_eval(multi)
    assert one["step"] == two["step"] == 0
    for metrics in (one, two):
        assert metrics["eval_loss"] == pytest.approx(loss, rel=1e-6)
        assert metrics["eval_reward_mean"] == pytest.approx(reward_mean, rel=1e-6, abs=1e-9)
        assert metrics["eval_scaled_logratio_mean"] == pytest.approx(0.0, abs=1e-9)


def test_ledger_counts_each_position_once():
    """One process: a position seen twice (a stand-in row, a repeated example) counts once."""
    from accelerate import PartialState

    from wspo.train.held_out import HeldOutLedger

    class OneProcess:
        num_processes = PartialState().num_processes

    ledger = HeldOutLedger()
    ledger.add(torch.tensor([0, 1, 2]), torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]))
    ledger.add(torch.tensor([2, 0, 3]), torch.tensor([[3.0, 30.0], [1.0, 10.0], [4.0, 40.0]]))
    n, totals = ledger.totals(OneProcess())
    assert n == 4 and totals.tolist() == [10.0, 100.0]
    assert ledger.totals(OneProcess())[0] == 0  # emptied
