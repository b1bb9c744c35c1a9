"""Padding-free packed batches (DESIGN section 8).

With `--packing true` the sequences of one micro-batch are concatenated, in order, into rows of at
most `max_length` tokens (next-fit: a sequence that does not fit the current row starts a new
one). Each row carries `position_ids` that restart at 0 at every sequence and no
`attention_mask`; transformers then builds a block-diagonal causal mask from the position ids
(`masking_utils.find_packed_sequence_indices`), so attention never crosses sequences. Rows are
right-padded to the longest row; the pads form one more "sequence" of their own (position ids
from 0 again) that no target position reads.

Because sequences keep their order, `response_logprobs` returns the response log-probs of
sequence 0 first, then sequence 1, ... exactly as for a padded batch: the rewards, reference
log-probs and sequence indices of the collators stay the same, and every loss is computed from
the same flat tensors. `per_device_train_batch_size` keeps counting sequences (examples for
DPO / WRPO), exactly: packing changes only how they are laid out.

Only attention implementations that honour packed position ids are accepted
(`PACKING_ATTENTION`); any other would let a sequence attend to the one before it.
"""

from __future__ import annotations

import torch

# transformers' attention implementations that build the block-diagonal mask from position_ids
# (sdpa, eager, flex_attention: masking_utils; flash_attention_*: cumulative sequence lengths).
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


class PackingError(ValueError):
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


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Sequence indices of each packed row, in order (next-fit). A sequence longer than
    max_length (never produced by the data step, which cuts to max_length) gets a row of its own."""
    rows: list[list[int]] = []
    used = max_length  # forces a new row for the first sequence
    for i, n in enumerate(lengths):
        if used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def pack_sequences(sequences: list[list[int]], prompt_lengths: list[int], max_length: int, pad_token_id: int = 0):
    """input_ids, position_ids, target_mask [rows, longest row] for `sequences` packed in order.

    target_mask marks each sequence's response positions (from its prompt length on), so the
    row-major order of the marked positions is sequence 0's response, then sequence 1's, ...
    """
    rows = pack_rows([len(s) for s in sequences], max_length)
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
    return input_ids, position_ids, target_mask
