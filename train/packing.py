"""Padding-free packed batches (DESIGN section 8).

With `--packing true` the sequences of one micro-batch are concatenated into rows (first-fit
decreasing) of up to `packing_row_length` tokens (default: the micro-batch's longest sequence),
never more than `max_length`. Each
row carries `position_ids` that restart at 0 at every sequence and no `attention_mask`;
transformers then builds a block-diagonal causal mask from the position ids
(`masking_utils.find_packed_sequence_indices`), so attention never crosses sequences. Rows are
right-padded to the longest row; the pads form one more "sequence" of their own (position ids
from 0 again) that no target position reads.

Packing reorders sequences, so the collators lay out every per-token tensor (rewards, reference
log-probs, sequence and chunk indices) in the packed order too; every loss reduces by sequence
index (`losses.segment_sums`), so it is the padded batch's loss up to float summation order.
`per_device_train_batch_size` keeps counting sequences (examples for DPO / WRPO), exactly:
packing changes only how they are laid out.

Only attention implementations that honour packed position ids are accepted
(`PACKING_ATTENTION`); any other would let a sequence attend to the one before it. `--packing
auto` (the default) also runs the model once on two short sequences, packed and apart, and packs
only when the logits agree (`packed_attention_is_exact`): a model whose own code ignores packed
position ids (remote code, an unusual mask) is padded instead of silently leaking attention.
"""

from __future__ import annotations

import logging

import torch

from wspo.errors import WspoError
from wspo.sequence_attention import logits_agree, two_sequence_logits

# transformers' attention implementations that build the block-diagonal mask from position_ids
# (sdpa, eager, flex_attention: masking_utils; flash_attention_*: cumulative sequence lengths).
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


logger = logging.getLogger(__name__)


class PackingError(WspoError, ValueError):
    """Packing asked for where it would be wrong; the message names the reason."""


def check_packing_attention(model: torch.nn.Module) -> str:
    """The model's attention implementation; refused (naming it) when packed masks would leak."""
    from wspo.logprobs import unwrap_model

    config = unwrap_model(model).config
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in PACKING_ATTENTION:
        raise PackingError(
            f"packing true: the model uses attention implementation {implementation!r}, which does not build "
            f"per-sequence masks from position_ids (sequences would attend to each other); use one of "
            f"{', '.join(PACKING_ATTENTION)} (attn_implementation) or packing false"
        )
    return implementation


def packed_attention_is_exact(model: torch.nn.Module) -> bool:
    """One no-grad forward of two short sequences packed into a row (position ids restarting)
    against each alone: True when every logit agrees, i.e. attention stayed inside each sequence."""
    packed, apart = two_sequence_logits(model)
    return logits_agree(packed, apart)


def resolve_packing(choice: str, model: torch.nn.Module, zero3: bool = False) -> bool:
    """`--packing` (auto / true / false) as a yes/no for this model. true refuses (PackingError,
    naming the reason) what auto pads with a warning: an attention implementation that ignores packed
    position ids, a failed start-up check. Under ZeRO-3 the weights are partitioned until the
    Trainer wraps the model, so the check cannot run: auto pads there, true packs on the
    implementation's word alone."""
    if choice == "false" or (choice == "auto" and zero3):
        return False
    try:
        check_packing_attention(model)
        if not zero3 and not packed_attention_is_exact(model):
            raise PackingError("packing true: the model's logits for two sequences packed into one row differ from "
                               "each alone (its attention crosses packed sequences); set packing false")
    except PackingError as reason:
        if choice == "true":
            raise
        logger.warning("packing auto: training on padded batches: %s", str(reason).removeprefix("packing true: "))
        return False
    return True


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequence indices of each packed row: first-fit decreasing (longest first, each into the
    first row with room), which leaves little room unused. A sequence longer than `capacity`
    (never produced by the data step, which cuts to max_length) gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def pack_sequences(sequences: list[list[int]], prompt_lengths: list[int], max_length: int, pad_token_id: int = 0,
                   row_length: int | None = None, one_row: bool = False):
    """input_ids, position_ids, target_mask [rows, longest row], and `order`: the sequence
    indices in the order their response positions appear (row-major), which is the order of the
    log-probs `response_logprobs` returns for this batch.

    Rows hold up to `row_length` tokens (default: the longest sequence), never more than
    max_length: sdpa / eager attention over a row costs the square of its length (the
    block-diagonal mask is applied to a full row x row score matrix), so on them rows much longer
    than the sequences cost more than the padding they save; flash_attention_2 computes each
    sequence's block alone, so there rows of max_length are best. `one_row` (and no row_length):
    every sequence in one row, no padding at all, for attention that runs per sequence
    (`wspo.sequence_attention`), where a row's length costs nothing.
    """
    if one_row and row_length is None:
        capacity = sum(len(s) for s in sequences)
    else:
        capacity = min(max_length, row_length or max(len(s) for s in sequences))
    rows = pack_rows([len(s) for s in sequences], capacity)
    width = max(sum(len(sequences[i]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(sequences[i])
            input_ids[r, at : at + n] = torch.as_tensor(sequences[i])
            position_ids[r, at : at + n] = torch.arange(n)
            target_mask[r, at + prompt_lengths[i] : at + n] = True
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # the pads: a sequence of their own
    return input_ids, position_ids, target_mask, [i for row in rows for i in row]
