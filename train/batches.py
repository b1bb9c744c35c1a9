"""Training examples -> padded (or packed) batches.

    sequence_batch    the model inputs of a list of sequences, padded or packed (packing.py), and
                      the order in which their response positions come
    Collator          pad (or pack) a list of examples; rewards and sequence indices flattened
                      in the order `response_logprobs` returns its log-probs
"""

from __future__ import annotations

import numpy as np
import torch

from wspo.logprobs import right_pad

from .examples import Example
from .packing import pack_sequences


def sequence_batch(sequences: list[list[int]], prompt_lengths: list[int], pad_token_id: int,
                   packing_max_length: int | None = None, packing_row_length: int | None = None,
                   one_row: bool = False) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The model inputs of a list of sequences, and the order (sequence indices) in which their
    response positions come, row-major: right-padded rows (input_ids, attention_mask,
    target_mask; in order), or with `packing_max_length` packed rows (input_ids, position_ids,
    target_mask; see packing.py; `one_row`: the whole list in one row, for per-sequence attention)."""
    if packing_max_length is None:
        input_ids, attention_mask, target_mask = right_pad(sequences, prompt_lengths, pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}, list(range(len(sequences)))
    input_ids, position_ids, target_mask, order = pack_sequences(sequences, prompt_lengths, packing_max_length, pad_token_id,
                                                               packing_row_length, one_row)
    return {"input_ids": input_ids, "position_ids": position_ids, "target_mask": target_mask}, order


def token_order_ids(order: list[int], n_response: list[int]) -> torch.Tensor:
    """The sequence of each response position, positions in `order` (sequence_batch)."""
    return torch.repeat_interleave(torch.tensor(order), torch.tensor([n_response[i] for i in order]))


class Collator:
    """Right-pads a list of examples into one batch (or packs them: `packing_max_length`).

    input_ids, attention_mask, target_mask: [batch, length]; target_mask marks response tokens.
    Packed: input_ids, position_ids, target_mask [packed rows, length], no attention_mask.
    rewards, seq_ids (and ref_logps): [response tokens of the batch], row-major (row 0 first), the order in which
    `response_logprobs` returns log-probs (packed: the packing's order of sequences; seq_ids keeps naming
    each token's sequence by its place in `examples`). row_index: [batch] dataset positions (for logs/tests).
    """

    def __init__(self, pad_token_id: int, packing_max_length: int | None = None, packing_row_length: int | None = None,
                 one_row: bool = False):
        self.pad_token_id = pad_token_id
        self.packing_max_length = packing_max_length
        self.packing_row_length = packing_row_length
        self.one_row = one_row  # packed: the micro-batch in one row (attention per sequence)

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        batch, order = sequence_batch([e.input_ids for e in examples], [e.prompt_length for e in examples],
                                      self.pad_token_id, self.packing_max_length,
                                      self.packing_row_length, self.one_row)
        # Per-token values follow the order of the response positions (packing reorders sequences).
        in_order = [examples[i] for i in order]
        batch["seq_ids"] = token_order_ids(order, [len(e.input_ids) - e.prompt_length for e in examples])
        batch["row_index"] = torch.tensor([e.index for e in examples])
        if examples[0].token_segments is not None:
            # Projection: one reward per chunk, chunks numbered over the batch in sequence order;
            # token_segments: the chunk of each token (token order); segment_seq_ids: the sequence of each chunk.
            n_chunks = [len(e.rewards) for e in examples]
            offsets = np.cumsum([0] + n_chunks[:-1])
            batch["rewards"] = torch.from_numpy(np.concatenate([e.rewards for e in examples]))
            batch["token_segments"] = torch.from_numpy(np.concatenate([examples[i].token_segments + offsets[i] for i in order]))
            batch["segment_seq_ids"] = torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(n_chunks))
        elif examples[0].rewards is not None:
            batch["rewards"] = torch.from_numpy(np.concatenate([e.rewards for e in in_order]))
        if examples[0].ref_logps is not None:
            batch["ref_logps"] = torch.from_numpy(np.concatenate([e.ref_logps for e in in_order]))
        if examples[0].topk_ids is not None:  # kd: [response tokens, K], in token order
            batch["topk_ids"] = torch.from_numpy(np.concatenate([e.topk_ids for e in in_order]))
            batch["teacher_topk_logps"] = torch.from_numpy(np.concatenate([e.topk_logps for e in in_order]))
        return batch
