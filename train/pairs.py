"""Shard rows -> preference examples (DPO pairs, WRPO triples) -> padded batches.

DPO and WRPO compare several responses to one prompt. Phase one writes one row per scored
response, each with its `slot` and the source row's `example_id`; here the rows of one example
are put back together, in the loss's slot order:

    dpo    chosen, rejected
    wrpo   chosen_source (y_ws), chosen_target (y_wt), rejected (y_l)

Each response is re-tokenized with the trained model's tokenizer and checked against the stored
ids exactly like the WSPO rows (data.py), cut to the training max_length, and carries the
reference's per-token log-probs from the shards (`logp_ref`, scored in phase one by
`wspo-precompute --ref_model`), cut the same way: D_ref of a response is their sum over exactly
the tokens the policy is scored on. No reference model is in training memory.

An example missing one of its slots is skipped and counted (`skipped_missing_<slot>`); an
example with several rows of a slot (a dataset with a repeated example id) gives one tuple per
complete set, paired in reading order, and the rest are counted as `unpaired_rows`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from wspo.shards.store import ShardSet
from wspo.shards.tokenization import ResponseTokenizer

from .data import DataError, ExampleDataset, checked_rows, sequence_batch, token_order_ids

PREFERENCE_SLOTS = {"dpo": ("chosen", "rejected"), "wrpo": ("chosen_source", "chosen_target", "rejected")}
PREFERENCE_REFERENCE = "ref"  # phase one's name for the single DPO/WRPO reference (column logp_ref)
PRECOMPUTE_SLOTS = {"dpo": "chosen,rejected", "wrpo": "chosen_source,chosen_target,rejected"}


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


def load_preference_examples(
    shard_sets: list[ShardSet], rule: ResponseTokenizer, loss: str, reference: dict[str, np.ndarray]
) -> tuple[list[PreferenceExample], Counter]:
    """The complete pairs (dpo) or triples (wrpo) of every shard set, checked and cut.

    `reference`: row id -> logp_ref (from `data.reference_logps(..., scorer_name='ref')`).
    Returns the examples and counts (rows per slot, examples skipped by reason, rows cut).
    Raises DataError naming the row when a row has no reference log-probs, and when no example
    is complete (saying which slots the shards hold and how to score the missing ones).
    """
    slots = PREFERENCE_SLOTS[loss]
    counts: Counter = Counter()
    groups: dict[str, dict[str, list[Response | None]]] = {}  # example_id -> slot -> responses, reading order
    for shard_set, row, prompt, stored, _ in checked_rows(shard_sets, rule, slots, counts):
        ref = reference.get(row["id"])
        if ref is None:
            raise DataError(
                f"row {row['id']} (example {row['example_id']}, slot {row['slot']}) of {shard_set.root} has no "
                "logp_ref in the reference shards"
            )
        # Phase one may have cut the response; a shorter training max_length (or a reference
        # scored under a shorter one) cuts it further. Policy and reference sums then run
        # over the same kept tokens.
        keep = min(len(stored), rule.max_length - len(prompt), len(ref))
        response = None
        if keep > 0:
            if keep < len(stored):
                counts["cut_to_max_length"] += 1
            response = Response(row["id"], prompt + stored[:keep], len(prompt), ref[:keep].astype(np.float32))
        groups.setdefault(row["example_id"], {s: [] for s in slots})[row["slot"]].append(response)

    examples: list[PreferenceExample] = []
    for example_id, by_slot in groups.items():
        missing = [s for s in slots if not by_slot[s]]
        if missing:
            for s in missing:
                counts[f"skipped_missing_{s}"] += 1
            counts["unpaired_rows"] += sum(len(v) for v in by_slot.values())
            continue
        n = min(len(v) for v in by_slot.values())
        extra = sum(len(v) - n for v in by_slot.values())
        if extra:
            counts["unpaired_rows"] += extra
        for j in range(n):
            responses = [by_slot[s][j] for s in slots]
            if any(r is None for r in responses):
                counts["skipped_prompt_too_long"] += 1
                continue
            examples.append(PreferenceExample(len(examples), example_id, responses))
    counts["examples_complete"] = len(examples)
    if not examples:
        held = {k.removeprefix("rows_"): v for k, v in sorted(counts.items()) if k.startswith("rows_")}
        skipped = {k: v for k, v in sorted(counts.items()) if k.startswith("skipped_")}
        raise DataError(
            f"loss {loss} needs, for each example_id, one row of each slot {', '.join(slots)}; no example of "
            f"{', '.join(str(s.root) for s in shard_sets)} is complete (rows by slot: {held or 'none'}; skipped: "
            f"{skipped or 'none'}). Score all of them with their reference: wspo-precompute --ref_model MODEL "
            f"--slots {PRECOMPUTE_SLOTS[loss]}"
        )
    return examples, counts


class PreferenceDataset(ExampleDataset):
    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.examples)

    @property
    def lengths(self) -> list[int]:
        """Tokens of all responses of each example, for length-grouped sampling."""
        return [sum(len(r.input_ids) for r in e.responses) for e in self.examples]


class PreferenceCollator:
    """Right-pads the responses of a list of examples into one batch of sequences.

    Sequences are example-major: example 0's responses in slot order, then example 1's, ...; so
    per-sequence sums reshape to [examples, slots]. input_ids, attention_mask, target_mask:
    [examples * slots, length]; seq_ids and ref_logps: [response tokens of the batch], in the order
    `response_logprobs` returns its log-probs; row_index: [examples] dataset positions.
    """

    def __init__(self, pad_token_id: int, packing_max_length: int | None = None, packing_row_length: int | None = None):
        self.pad_token_id = pad_token_id
        self.packing_max_length = packing_max_length  # packed rows (packing.py) instead of padded ones
        self.packing_row_length = packing_row_length

    def __call__(self, examples: list[PreferenceExample]) -> dict[str, torch.Tensor]:
        seqs = [r for e in examples for r in e.responses]
        batch, order = sequence_batch([r.input_ids for r in seqs], [r.prompt_length for r in seqs], self.pad_token_id,
                                      self.packing_max_length, self.packing_row_length)
        # Per-token values follow the order of the response positions (packing reorders sequences).
        batch["seq_ids"] = token_order_ids(order, [len(r.input_ids) - r.prompt_length for r in seqs])
        batch["ref_logps"] = torch.from_numpy(np.concatenate([seqs[i].ref_logps for i in order]))
        batch["row_index"] = torch.tensor([e.index for e in examples])
        return batch


def preference_examples(args, shard_sets: list[ShardSet], rule: ResponseTokenizer, projected: bool, model_dir):
    """Pipeline step 2 for dpo / wrpo: (examples, counts, row id -> logp_ref, reference sets, record).

    The reference is checked to be the model training starts from (scorer fingerprint in the
    shards' manifest == fingerprint of model_name_or_path), since that is what DPO's reference is
    (the SFT model the policy starts from); `allow_reference_mismatch` lifts the check for a
    deliberately different reference. wspo_run.json records the scorer either way.
    """
    from wspo.models import model_fingerprint

    from .data import reference_logps

    if projected:
        raise DataError(
            f"loss {args.loss} compares log-probs summed over the shards' tokens (logp_ref); train a model with the "
            "shards' tokenizer (reward_projection applies to wspo only)"
        )
    paths = args.reference_shards or args.shards
    by_id, reference_sets = reference_logps(paths, shard_sets, model_dir, scorer_name=PREFERENCE_REFERENCE,
                                            allow_other_weights=args.allow_reference_mismatch)
    examples, counts = load_preference_examples(shard_sets, rule, args.loss, by_id)
    scorers = [next(sc for sc in s.scorers if sc["name"] == PREFERENCE_REFERENCE) for s in reference_sets]
    if args.allow_reference_mismatch:
        weights = model_fingerprint(model_dir)
        same = all(sc["fingerprint"] == weights for sc in scorers)
    else:
        same = True  # checked by reference_logps
    record = {
        "loss": args.loss,
        "slots": list(PREFERENCE_SLOTS[args.loss]),
        "beta": args.beta,
        "wrpo_alpha": args.wrpo_alpha if args.loss == "wrpo" else None,
        "wrpo_alpha_schedule": args.wrpo_alpha_schedule if args.loss == "wrpo" else None,
        "reference": {
            "column": "logp_ref",
            "scorers": [{k: sc[k] for k in ("model", "fingerprint")} for sc in scorers],
            "same_weights_as_model": same,
            "checked": not args.allow_reference_mismatch,
        },
    }
    return examples, counts, by_id, reference_sets, record
