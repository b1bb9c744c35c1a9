"""Phase two at scale (train/rows.py, DESIGN section 8): rows in memory-mapped Arrow, examples
built and checked when drawn, equal to the eager path's (tests/eager_examples.py); length-grouped sampling."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from eager_examples import load_examples, split_examples
from test_train_helpers import TRAIN_MAX_LENGTH, train_setup  # noqa: F401  (fixture)

from wspo.train.rows import ShardRowsDataset, row_datasets
from wspo.train.shard_sets import open_shard_sets, strong_rule


def rule_of(setup, max_length=TRAIN_MAX_LENGTH):
    from wspo.models import load_tokenizer

    sets = open_shard_sets([str(setup["shards"])], "wspo")
    return sets, strong_rule(sets, load_tokenizer(setup["strong_sft"]), max_length, "chunks")[0]


def assert_same_examples(lazy: ShardRowsDataset, eager: list):
    """Every example drawn equals the eager example of its row; every eager example is drawn;
    in the eager order when no row was skipped (a skipped row's next trainable row stands in)."""
    by_id = {e.row_id: e for e in eager}
    drawn = [lazy[i] for i in range(len(lazy))]
    assert {e.row_id for e in drawn} == set(by_id) and len(by_id) > 0
    if len(lazy) == len(eager):
        assert [e.row_id for e in drawn] == [e.row_id for e in eager]
    for i, got in enumerate(drawn):
        expected = by_id[got.row_id]
        assert (got.example_id, got.prompt_length, got.input_ids) == (expected.example_id, expected.prompt_length, expected.input_ids)
        for name in ("rewards", "ref_logps", "token_segments"):
            a, b = getattr(got, name), getattr(expected, name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert np.array_equal(a, b), name


@pytest.mark.parametrize("loss,project", [("wspo", False), ("sft", False), ("wspo", True)])
def test_lazy_rows_equal_eager_examples(train_setup, tmp_path, loss, project):  # noqa: F811
    sets, rule = rule_of(train_setup)
    eager, eager_counts = load_examples(sets, rule, with_rewards=loss == "wspo", project=project)
    eager_train, eager_held = split_examples(eager, 0.25)
    counts = Counter()
    train, held, n_rows = row_datasets(sets, rule, loss, project, 0.25, tmp_path / "cache", counts)
    assert n_rows == eager_counts["rows_chosen"] == counts["rows_chosen"] >= len(eager)
    assert_same_examples(train, eager_train)
    assert_same_examples(held, eager_held)
    assert train.num_tokens + held.num_tokens == sets[0].num_tokens  # every response token of the set, stored counts


def test_reference_join_equals_eager(train_setup, tmp_path):  # noqa: F811
    """logp_strong_ref joined on id (vectorised) gives each row the eager dict's log-probs."""
    from test_train_helpers import precompute

    from wspo.train.shard_sets import reference_sets
    from eager_examples import reference_logps

    ref_shards = precompute(tmp_path / "ref", None, None, strong_ref=train_setup["strong_sft"])
    sets, rule = rule_of(train_setup)
    by_id, _ = reference_logps([str(ref_shards)], sets, train_setup["strong_sft"], rule)
    eager, _ = split_examples(load_examples(sets, rule, with_rewards=True, reference=by_id)[0], 0.0)
    reference = (reference_sets([str(ref_shards)], sets, train_setup["strong_sft"], rule), "logp_strong_ref")
    train, _, _ = row_datasets(sets, rule, "wspo", False, 0.0, tmp_path / "cache", Counter(), reference)
    assert_same_examples(train, eager)


def test_cache_is_reused_and_pickles_as_paths(train_setup, tmp_path):  # noqa: F811
    sets, rule = rule_of(train_setup)
    train, _, _ = row_datasets(sets, rule, "wspo", False, 0.0, tmp_path / "cache", Counter())
    (cache,) = (tmp_path / "cache").glob("rows-*.arrow")
    assert cache.name.startswith(f"rows-{sets[0].fingerprint[:16]}-")
    stamp = cache.stat().st_mtime_ns
    again, _, _ = row_datasets(sets, rule, "wspo", False, 0.0, tmp_path / "cache", Counter())
    # Reused, not rewritten: the one cache file and its checksum (written last, train/row_cache.py).
    assert cache.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [cache.name, f"{cache.name}.xxh3"]
    # A spawned data loader worker receives the dataset: file paths and positions, not row data.
    blob = pickle.dumps(again)
    assert len(pickle.dumps(again.rows)) < 2000 < cache.stat().st_size
    responses = sets[0].read_table(columns=["response"])["response"].to_pylist()
    assert not any(r[:40].encode() in blob for r in responses if len(r) >= 40)
    copy = pickle.loads(blob)
    assert copy[3].input_ids == train[3].input_ids and np.array_equal(copy[3].rewards, train[3].rewards)


def test_rows_without_room_are_counted_and_replaced(train_setup, tmp_path):  # noqa: F811
    """A max_length that leaves some prompts no room: those rows are skipped when drawn
    (counted like the eager path counts them) and the next trainable row stands in."""
    sets, rule = rule_of(train_setup, max_length=40)
    eager, eager_counts = load_examples(sets, rule, with_rewards=True)
    assert 0 < eager_counts["skipped_prompt_too_long"] < sets[0].num_rows
    counts = Counter()
    train, _, n_rows = row_datasets(sets, rule, "wspo", False, 0.0, tmp_path / "cache", counts)
    drawn = [train[i] for i in range(len(train))]
    assert counts["skipped_prompt_too_long"] >= eager_counts["skipped_prompt_too_long"]
    assert {e.row_id for e in drawn} == {e.row_id for e in eager}  # every trainable row, and only those
    assert all(len(e.input_ids) <= 40 for e in drawn)


def test_group_by_length_sampler_groups(train_setup, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, TrainingArguments
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from wspo.train.trainer import WSPOTrainer

    sets, rule = rule_of(train_setup)
    train, _, _ = row_datasets(sets, rule, "sft", False, 0.0, tmp_path / "cache", Counter())
    lengths = train.lengths
    assert lengths.shape == (len(train),) and lengths.dtype.kind in "iu"
    model = AutoModelForCausalLM.from_pretrained(str(train_setup["strong_sft"]), dtype=torch.float32)
    spreads = {}
    for strategy in ("random", "group_by_length"):
        args = TrainingArguments(output_dir=str(tmp_path / strategy), use_cpu=True, report_to="none", disable_tqdm=True,
                                 per_device_train_batch_size=4, train_sampling_strategy=strategy, seed=0)
        trainer = WSPOTrainer(model, args, loss="sft", train_dataset=train)
        sampler = trainer._get_train_sampler()
        assert isinstance(sampler, LengthGroupedSampler) == (strategy == "group_by_length")
        order = np.array(list(iter(sampler)))
        assert sorted(order.tolist()) == list(range(len(train)))  # a permutation: every row once
        batches = [lengths[order[i : i + 4]] for i in range(0, len(order), 4)]
        spreads[strategy] = np.mean([b.max() - b.min() for b in batches])
    assert spreads["group_by_length"] < 0.5 * spreads["random"], spreads
