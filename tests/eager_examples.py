"""The eager path: every chosen row of the shard sets read, checked and built at once.

Training reads rows lazily from memory-mapped Arrow (wspo.train.rows, wspo.train.pairs). The
functions here do the same eagerly, with the toolkit's own per-row steps (wspo.train.examples):
the plain reference the lazy datasets are tested against (tests/test_train_scale.py), and the
row order benchmarks/train_vs_reference.py trains its reference approach in.

    load_examples     chosen rows of every set -> examples (rewards projected onto chunks with
                      another strong tokenizer), and the counts of rows read, skipped and cut
    reference_logps   row id -> logp_strong_ref from the reference sets
    split_examples    train / held-out sides by the hash of example_id
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wspo.shards.schema import list_arrays, logp_column
from wspo.shards.store import ShardSet
from wspo.shards.tokenization import ResponseTokenizer
from wspo.train.examples import TRAIN_SLOTS, Example, checked_prompt, is_eval_example, project_row, token_example
from wspo.train.shard_sets import REFERENCE_SCORER, DataError, reference_sets


def reference_logps(paths: list[str], train_sets: list[ShardSet], model_dir: Path, rule: ResponseTokenizer,
                    scorer_name: str = REFERENCE_SCORER, allow_other_weights: bool = False) -> tuple[dict[str, np.ndarray], list[ShardSet]]:
    """Row id -> logp_strong_ref, from shard sets scored in phase one with the strong SFT model
    (and those sets, for the run record). DPO and WRPO use it with scorer_name 'ref' (logp_ref).

    They stand in for the reference model only if they were scored with exactly the weights
    training starts from (the scorer fingerprint in the manifest; `allow_other_weights` lifts
    this check) and the same tokenizer.
    """
    sets = reference_sets(paths, train_sets, model_dir, rule, scorer_name, allow_other_weights)
    column = logp_column(scorer_name)
    logps = {}
    for shard_set in sets:
        table = shard_set.read_table(columns=["id", column])
        logps.update(zip(table["id"].to_pylist(), list_arrays(table[column])))
    return logps, sets


def checked_rows(shard_sets: list[ShardSet], rule: ResponseTokenizer, slots, counts: Counter, extra_columns=()):
    """The rows of `slots` of every set, each re-tokenized with the strong tokenizer and checked
    against its stored ids (wspo.train.examples.checked_prompt).

    Yields (shard set, row dict, prompt ids, stored response ids, {extra column: array}); counts
    the rows read per slot into `counts`. The same (messages, response) in two shard sets would
    be trained on twice, so it is an error; within one set it is the dataset's own duplicate.
    """
    columns = ["id", "example_id", "slot", "messages", "response", "token_ids", "truncated", *extra_columns]
    seen: dict[str, Path] = {}
    for shard_set in shard_sets:
        table = shard_set.read_table(columns=columns)
        for slot, n in Counter(table["slot"].to_pylist()).items():
            counts[f"rows_{slot}"] += n
        table = table.filter(pc.is_in(table["slot"], value_set=pa.array(list(slots))))
        arrays = {c: list_arrays(table[c]) for c in ("token_ids", *extra_columns)}
        for k, row in enumerate(table.select(["id", "example_id", "slot", "messages", "response", "truncated"]).to_pylist()):
            if seen.get(row["id"], shard_set.root) != shard_set.root:
                raise DataError(f"row {row['id']} (example {row['example_id']}) is in both {seen[row['id']]} and {shard_set.root}")
            seen[row["id"]] = shard_set.root
            stored = arrays["token_ids"][k].tolist()
            prompt = checked_prompt(row, stored, rule, counts, shard_set.root)
            if prompt is not None:
                yield shard_set, row, prompt, stored, {c: arrays[c][k] for c in extra_columns}


def load_examples(
    shard_sets: list[ShardSet], rule: ResponseTokenizer, with_rewards: bool, reference: dict[str, np.ndarray] | None = None,
    project: bool = False,
) -> tuple[list[Example], Counter]:
    """Chosen rows of every set, re-tokenized with the strong tokenizer and checked against the shards.

    `reference`: row id -> strong-reference log-probs (see `reference_logps`), attached to each row.
    `project`: the strong tokenizer differs; rewards are projected onto chunks (`project_row`).

    Returns the examples and counts: rows read per slot, rows skipped by reason, responses cut
    further than phase one cut them.
    """
    if project:
        if reference is not None:
            raise DataError("reference log-probs from shards are per token of the shards' tokenizer; with reward projection use --reference_logps model")
        columns = ["id", "example_id", "slot", "messages", "response", "token_ids", "truncated", "token_start", "token_end"]
        return _load_projected(shard_sets, rule, columns + (["reward"] if with_rewards else []))
    examples, counts = [], Counter()
    extra = ("reward",) if with_rewards else ()
    for shard_set, row, prompt, stored, arrays in checked_rows(shard_sets, rule, TRAIN_SLOTS, counts, extra):
        ref = None
        if reference is not None:
            ref = reference.get(row["id"])
            if ref is None:
                raise DataError(f"row {row['id']} (example {row['example_id']}) of {shard_set.root} has no logp_strong_ref in the reference shards")
        example = token_example(row, prompt, stored, arrays.get("reward"), ref, rule, counts, shard_set.root)
        if example is not None:
            example.index = len(examples)
            examples.append(example)
    return examples, counts


def _load_projected(shard_sets: list[ShardSet], rule: ResponseTokenizer, columns: list[str]) -> tuple[list[Example], Counter]:
    """Chosen rows re-tokenized with a different strong tokenizer, rewards summed per chunk."""
    examples, counts = [], Counter()
    for shard_set in shard_sets:
        # Identical vocabularies (a forced projection, as in the exactness test) may use token ids
        # as pieces: then every chunk is one token of each side.
        same_vocab = rule.matches(shard_set.tokenizer)
        table = shard_set.read_table(columns=columns)
        for slot, n in Counter(table["slot"].to_pylist()).items():
            counts[f"rows_{slot}"] += n
        table = table.filter(pc.is_in(table["slot"], value_set=pa.array(TRAIN_SLOTS)))
        weak = {c: list_arrays(table[c]) for c in ("token_ids", "token_start", "token_end", "reward") if c in columns}
        for k, row in enumerate(table.select(["id", "example_id", "messages", "response", "truncated"]).to_pylist()):
            example = project_row(row, rule, {c: v[k] for c, v in weak.items()}, same_vocab, counts)
            if example is not None:
                example.index = len(examples)
                examples.append(example)
    return examples, counts

def split_examples(examples: list[Example], eval_fraction: float) -> tuple[list[Example], list[Example]]:
    train, held_out = [], []
    for example in examples:
        (held_out if is_eval_example(example.example_id, eval_fraction) else train).append(example)
    for side in (train, held_out):
        for i, example in enumerate(side):
            example.index = i
    return train, held_out
