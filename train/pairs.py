"""Shard rows -> preference examples (DPO pairs, WRPO triples) -> batches (DESIGN section 8).

DPO and WRPO compare several responses to one prompt. Phase one writes one row per scored
response, each with its `slot` and the source row's `example_id`; here the rows of one example
are put back together, in the loss's slot order:

    dpo    chosen, rejected
    wrpo   chosen_source (y_ws), chosen_target (y_wt), rejected (y_l)

The rows stay in memory-mapped Arrow (rows.py's row cache, with the preference slots). Grouping
is vectorised (`group_examples`, with shards.pairing's rule, which wspo-eval shares): each
complete tuple is a row of row positions, a few integers per shard row and no Python object per row. An example missing one of its slots is skipped and
counted (`skipped_missing_<slot>`); an example with several rows of a slot (a dataset with a
repeated example id) gives one tuple per complete set, paired in reading order, and the rest are
counted as `unpaired_rows`.

When a tuple is drawn (`PreferenceRowsDataset`), each response is re-tokenized with the trained
model's tokenizer and checked against the stored ids exactly like the WSPO rows, cut to the
training max_length, and carries the reference's per-token log-probs from the shards
(`logp_ref`, scored in phase one by `wspo-precompute --ref_model`, joined on `id`), cut the same
way: D_ref of a response is their sum over exactly the tokens the policy is scored on. No
reference model is in training memory. A tuple with a response that cannot be trained on (no
room under max_length, a conversation the chat template refuses) is counted and the next tuple
stands in, so batches keep their size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from wspo.shards.pairing import rows_by_example
from wspo.shards.schema import logp_column
from wspo.shards.store import ShardSet
from wspo.shards.tokenization import ResponseTokenizer

from .batches import sequence_batch, token_order_ids
from .examples import checked_prompt, kept_tokens
from .row_cache import BUCKET_COLUMN
from .rows import OpenRows, ReferenceJoin
from .shard_sets import DataError, reference_sets

PREFERENCE_SLOTS = {"dpo": ("chosen", "rejected"), "wrpo": ("chosen_source", "chosen_target", "rejected")}
PREFERENCE_REFERENCE = "ref"  # phase one's name for the single DPO/WRPO reference (column logp_ref)
PRECOMPUTE_SLOTS = {"dpo": "chosen,rejected", "wrpo": "chosen_source,chosen_target,rejected"}
PAIR_COLUMNS = ["id", "example_id", "slot", "messages", "response", "token_ids", "truncated", "n_tokens"]


@dataclass
class Response:
    row_id: str
    input_ids: list[int]  # prompt ids + response ids (cut to max_length)
    prompt_length: int
    ref_logps: np.ndarray  # float32 reference log-probs of the kept response tokens


@dataclass
class PreferenceExample:
    index: int  # position in its dataset
    example_id: str
    responses: list[Response]  # one per slot, in PREFERENCE_SLOTS[loss] order

    @property
    def num_tokens(self) -> int:
        return sum(len(r.input_ids) - r.prompt_length for r in self.responses)


def group_examples(table: pa.Table, slots: tuple[str, ...], counts: Counter) -> np.ndarray:
    """[tuples, len(slots)]: the row positions of every complete tuple, in slot order
    (shards.pairing.rows_by_example). Counts the incomplete examples and the rows left unpaired."""
    tuples, per_slot = rows_by_example(table, slots)
    if not table.num_rows:
        return tuples
    for j, name in enumerate(slots):
        counts[f"skipped_missing_{name}"] += int((per_slot[:, j] == 0).sum())
    counts["unpaired_rows"] += int((per_slot.sum(axis=1) - len(slots) * per_slot.min(axis=1)).sum())
    return tuples


class PreferenceRowsDataset(torch.utils.data.Dataset):
    """One side (train or held out) of the complete tuples; examples built and checked when drawn."""

    def __init__(self, rows: OpenRows, tuples: np.ndarray, rule: ResponseTokenizer, reference: ReferenceJoin):
        self.rows, self.tuples, self.rule, self.reference = rows, tuples, rule, reference
        self.counts: Counter = Counter()  # tuples skipped / responses cut as met (in this process)

    def __len__(self) -> int:
        return len(self.tuples)

    def __getitem__(self, i: int) -> PreferenceExample:
        for step in range(len(self.tuples)):  # a tuple that cannot be trained on: the next one stands in
            j = (i + step) % len(self.tuples)
            example = self._example(j)
            if example is not None:
                return example
        raise DataError(f"none of the {len(self.tuples)} examples can be trained on under max_length "
                        f"{self.rule.max_length} (skipped: {dict(self.counts)})")

    def _example(self, j: int) -> PreferenceExample | None:
        responses = []
        for position in self.tuples[j].tolist():
            row = self.rows.table.slice(position, 1).to_pylist()[0]
            response = self._response(row, position)
            if response is None:
                return None
            responses.append(response)
        return PreferenceExample(j, row["example_id"], responses)

    def _response(self, row: dict, position: int) -> Response | None:
        stored = row["token_ids"]
        prompt = checked_prompt(row, stored, self.rule, self.counts, self.rows.root_of(position))
        if prompt is None:
            return None
        ref = self.reference.logps(position)
        # Phase one may have cut the response; a shorter training max_length (or a reference
        # scored under a shorter one) cuts it further. Policy and reference sums then run
        # over the same kept tokens.
        keep = kept_tokens(len(stored), min(self.rule.max_length - len(prompt), len(ref)), self.counts)
        if keep <= 0:
            return None
        return Response(row["id"], prompt + stored[:keep], len(prompt), ref[:keep])

    @property
    def num_tokens(self) -> int:
        """Response tokens as the shards store them (before a shorter training max_length cuts them)."""
        return int(self.rows.table["n_tokens"].to_numpy()[self.tuples].sum())

    @property
    def lengths(self) -> np.ndarray:
        """Approximate tokens per example for length-grouped sampling: rows.ShardRowsDataset's
        estimate, summed over the tuple's responses."""
        messages = pc.binary_length(self.rows.table["messages"]).to_numpy()  # no copy of the text
        per_row = self.rows.table["n_tokens"].to_numpy() + messages // 4
        return per_row[self.tuples].sum(axis=1)


def pair_datasets(shard_sets: list[ShardSet], rule: ResponseTokenizer, loss: str, ref_sets: list[ShardSet],
                  eval_fraction: float, cache_dir: Path, counts: Counter):
    """(train dataset, held-out dataset or None, complete tuples) of the shard sets' rows of the
    loss's slots, with `logp_ref` from `ref_sets`; held out by the hash of example_id
    (examples.is_eval_example). `counts` receives rows per slot and incomplete examples now, and
    skipped tuples and cut responses as they are drawn (the run record's counts).

    Raises DataError naming the row when a row has no reference log-probs, and when no example
    is complete (saying which slots the shards hold and how to score the missing ones).
    """
    slots = PREFERENCE_SLOTS[loss]
    rows = OpenRows(shard_sets, PAIR_COLUMNS, cache_dir, slots)
    counts.update(rows.counts)
    join = ReferenceJoin(rows, ref_sets, logp_column(PREFERENCE_REFERENCE), cache_dir, slots)
    tuples = group_examples(rows.table, slots, counts)
    counts["examples_complete"] = len(tuples)
    if not len(tuples):
        held = {k.removeprefix("rows_"): v for k, v in sorted(counts.items()) if k.startswith("rows_")}
        skipped = {k: v for k, v in sorted(counts.items()) if k.startswith("skipped_") and v}
        raise DataError(
            f"loss {loss} needs, for each example_id, one row of each slot {', '.join(slots)}; no example of "
            f"{', '.join(str(s.root) for s in shard_sets)} is complete (rows by slot: {held or 'none'}; skipped: "
            f"{skipped or 'none'}). Score all of them with their reference: wspo-precompute --ref_model MODEL "
            f"--slots {PRECOMPUTE_SLOTS[loss]}"
        )
    held_out = rows.table[BUCKET_COLUMN].to_numpy()[tuples[:, 0]] / 2**32 < eval_fraction

    def side(selected: np.ndarray) -> PreferenceRowsDataset:
        dataset = PreferenceRowsDataset(rows, selected, rule, join)
        dataset.counts = counts
        return dataset

    return side(tuples[~held_out]), side(tuples[held_out]) if held_out.any() else None, len(tuples)


class PreferenceCollator:
    """Right-pads the responses of a list of examples into one batch of sequences.

    Sequences are example-major: example 0's responses in slot order, then example 1's, ...; so
    per-sequence sums reshape to [examples, slots]. input_ids, attention_mask, target_mask:
    [examples * slots, length]; seq_ids and ref_logps: [response tokens of the batch], in the order
    `response_logprobs` returns its log-probs; row_index: [examples] dataset positions.
    """

    def __init__(self, pad_token_id: int, packing_max_length: int | None = None, packing_row_length: int | None = None,
                 one_row: bool = False):
        self.pad_token_id = pad_token_id
        self.packing_max_length = packing_max_length  # packed rows (packing.py) instead of padded ones
        self.packing_row_length = packing_row_length
        self.one_row = one_row  # packed: the micro-batch in one row (attention per sequence)

    def __call__(self, examples: list[PreferenceExample]) -> dict[str, torch.Tensor]:
        seqs = [r for e in examples for r in e.responses]
        batch, order = sequence_batch([r.input_ids for r in seqs], [r.prompt_length for r in seqs], self.pad_token_id,
                                      self.packing_max_length, self.packing_row_length, self.one_row)
        # Per-token values follow the order of the response positions (packing reorders sequences).
        batch["seq_ids"] = token_order_ids(order, [len(r.input_ids) - r.prompt_length for r in seqs])
        batch["ref_logps"] = torch.from_numpy(np.concatenate([seqs[i].ref_logps for i in order]))
        batch["row_index"] = torch.tensor([e.index for e in examples])
        return batch


def preference_datasets(shard_sets: list[ShardSet], rule: ResponseTokenizer, loss: str, project: bool, eval_fraction: float,
                        cache_dir: Path, counts: Counter, reference_paths: list[str], model_dir: Path,
                        allow_reference_mismatch: bool = False):
    """Pipeline step 2 for dpo / wrpo, the twin of rows.row_datasets: (train dataset, held-out
    dataset or None, complete tuples, reference sets, what wspo_run.json records of the reference).

    The reference (`logp_ref` of the sets at `reference_paths`) is checked to be the model
    training starts from (scorer fingerprint in the shards' manifest == fingerprint of
    `model_dir`), since that is what DPO's reference is (the SFT model the policy starts from);
    `allow_reference_mismatch` lifts the check for a deliberately different reference.
    wspo_run.json records the scorer either way.
    """
    from wspo.models import model_fingerprint

    if project:
        raise DataError(
            f"loss {loss} compares log-probs summed over the shards' tokens (logp_ref); train a model with the "
            "shards' tokenizer (reward_projection applies to wspo only)"
        )
    ref_sets = reference_sets(reference_paths, shard_sets, model_dir, rule, PREFERENCE_REFERENCE, allow_reference_mismatch)
    train, held_out, n_tuples = pair_datasets(shard_sets, rule, loss, ref_sets, eval_fraction, cache_dir, counts)
    scorers = [next(sc for sc in s.scorers if sc["name"] == PREFERENCE_REFERENCE) for s in ref_sets]
    if allow_reference_mismatch:
        weights = model_fingerprint(model_dir)
        same = all(sc["fingerprint"] == weights for sc in scorers)
    else:
        same = True  # checked by reference_sets
    reference = {
        "column": "logp_ref",
        "scorers": [{k: sc[k] for k in ("model", "fingerprint")} for sc in scorers],
        "same_weights_as_model": same,
        "checked": not allow_reference_mismatch,
    }
    return train, held_out, n_tuples, ref_sets, reference
