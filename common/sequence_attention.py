"""Attention one sequence at a time inside packed rows, so that packing costs no padding.

transformers' `sdpa` attention honours packed rows (position ids restarting per sequence) by
building a block-diagonal mask and computing the whole row x row score matrix under it: a row
holding sequences of n_1 ... n_k tokens costs (n_1 + ... + n_k)^2 instead of n_1^2 + ... + n_k^2,
and a masked call cannot use the causal kernel's skipping of the upper triangle. That is why
packed rows on sdpa had to stay as short as the longest sequence, which left a fifth of every
step's positions padding at UltraFeedback lengths (docs/benchmarks.md, fifth round).

`PER_SEQUENCE_SDPA` is registered with transformers' `AttentionInterface`: it reads the sequence
boundaries from the `position_ids` every decoder layer receives and runs
`scaled_dot_product_attention(is_causal=True)` on each sequence's slice of the row. A micro-batch
then packs into a single row with no padding at all (`wspo.train.packing`), the projections and
MLPs see only real tokens, and attention costs the sum of the sequences' causal triangles. The
same numbers as sdpa's block-diagonal mask, up to the kernels' rounding (tested).

Padded batches (an `attention_mask`) take transformers' own sdpa path, mask and all.
`use_per_sequence_attention` switches a model only where this is known to be the same attention:
sdpa, every layer full attention (no sliding window), and a start-up check that the new path's
logits for two packed sequences equal sdpa's for each alone.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

logger = logging.getLogger(__name__)

PER_SEQUENCE_SDPA = "wspo_per_sequence_sdpa"

# Arguments an attention module may pass that change the result (soft-capping, attention sinks,
# windows): the per-sequence path does not implement them, so it refuses rather than ignore them.
_UNSUPPORTED = ("softcap", "s_aux", "sinks")

# The boundaries of the last position_ids seen: every layer of one forward receives the same
# tensor, so they are read (a device sync on GPUs) once per forward, not once per layer.
_last_bounds: tuple[torch.Tensor | None, list] = (None, [])


def sequence_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """[(start, end), ...] of the sequences of each row: a sequence starts wherever a position
    is not its predecessor's plus one (transformers' `find_packed_sequence_indices` rule)."""
    global _last_bounds
    if _last_bounds[0] is position_ids:
        return _last_bounds[1]
    rows = []
    width = position_ids.shape[-1]
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    for row in starts.cpu().tolist():
        first = [i for i, s in enumerate(row) if s]
        rows.append(list(zip(first, first[1:] + [width])))
    _last_bounds = (position_ids, rows)
    return rows


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_ids: torch.Tensor,
            dropout: float, scale: float | None) -> torch.Tensor:
    """Causal attention within each sequence of each row: [batch, heads, length, head_dim]."""
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, bounds in enumerate(sequence_bounds(position_ids)):
        parts = [F.scaled_dot_product_attention(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e],
                                                value[b : b + 1, :, s:e], dropout_p=dropout, is_causal=True,
                                                scale=scale, enable_gqa=gqa)
                 for s, e in bounds]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


# Under torch.compile (the phase-one scorers' `--compile`) the loop over sequences must not be
# traced: the bounds are data, and every new batch would recompile. As a custom op it is one
# opaque call whose output has the query's shape. Inference only: no gradient formula, so a
# compiled training run keeps sdpa (train/pipeline.py).
@torch.library.custom_op("wspo::per_sequence_sdpa", mutates_args=())
def _per_sequence_sdpa_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_ids: torch.Tensor,
                          scale: float) -> torch.Tensor:
    return _attend(query, key, value, position_ids, 0.0, scale).contiguous()


@_per_sequence_sdpa_op.register_fake
def _(query, key, value, position_ids, scale):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def per_sequence_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, position_ids: torch.Tensor | None = None, **kwargs):
    """transformers' attention-function signature: query [batch, heads, length, head_dim], key and
    value [batch, kv heads, length, head_dim]; returns ([batch, length, heads, head_dim], None)."""
    if attention_mask is not None or position_ids is None or key.shape[2] != query.shape[2]:
        # padded batches, plain calls, decoding with a cache: transformers' sdpa, unchanged
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    unsupported = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
    if sliding_window is not None or unsupported:
        raise NotImplementedError(f"{PER_SEQUENCE_SDPA}: {', '.join(unsupported or ['sliding_window'])} is not "
                                  f"supported; use attn_implementation sdpa")
    if torch.compiler.is_compiling():
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = _per_sequence_sdpa_op(query, key, value, position_ids, scale)
    else:
        out = _attend(query, key, value, position_ids, dropout if module.training else 0.0, scaling)
    return out.transpose(1, 2).contiguous(), None


def _per_sequence_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """The mask transformers builds for this implementation: none for packed or unpadded rows
    (the attention reads position ids), sdpa's own where an attention_mask marks padding."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PER_SEQUENCE_SDPA, per_sequence_sdpa)
    AttentionMaskInterface.register(PER_SEQUENCE_SDPA, _per_sequence_mask)


def two_sequence_logits(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits of two short sequences packed into one row (position ids restarting), and
    of each alone, concatenated: one no-grad forward each, in eval mode (no dropout)."""
    from wspo.logprobs import unwrap_model

    vocab = unwrap_model(model).config.vocab_size
    device = next(model.parameters()).device
    first = torch.arange(3, 11, device=device) % vocab
    second = torch.arange(40, 47, device=device) % vocab
    row = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))]).to(device)[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            apart = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in (first, second)]).float()
            packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    return packed, apart


def logits_agree(logits: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to kernels' rounding: a leak across sequences (or a missing soft-cap) moves
    logits by a large fraction of their size, so the tolerance is 1% of the largest logit."""
    return bool((logits - expected).abs().max() <= 1e-4 + 0.01 * float(expected.abs().max()))


def _set_implementation(model: torch.nn.Module, name: str) -> None:
    from wspo.logprobs import unwrap_model

    unwrap_model(model).config._attn_implementation = name  # the config's setter reaches its sub-configs


def use_per_sequence_attention(*models: torch.nn.Module | None) -> bool:
    """Switch models from sdpa to `PER_SEQUENCE_SDPA` where it is the same attention; True when
    every given model now uses it (then packed rows may hold a whole micro-batch). A model that
    fails the check is switched back, with a warning naming why."""
    from wspo.logprobs import unwrap_model

    models = [m for m in models if m is not None]
    for model in models:
        config = unwrap_model(model).config
        implementation = getattr(config, "_attn_implementation", None)
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if implementation != "sdpa" or layer_types != {"full_attention"} or getattr(config, "use_sliding_window", False):
            return False
    register()
    switched = []
    for model in models:
        _, sdpa_apart = two_sequence_logits(model)
        _set_implementation(model, PER_SEQUENCE_SDPA)
        switched.append(model)
        try:
            packed, apart = two_sequence_logits(model)
            error = None if logits_agree(packed, sdpa_apart) and logits_agree(apart, sdpa_apart) else (
                "its logits for two packed sequences differ from sdpa's for each alone")
        except NotImplementedError as reason:
            error = str(reason)
        if error is not None:
            for m in switched:
                _set_implementation(m, "sdpa")
            logger.warning("attention per sequence not used for %s (%s): keeping sdpa (training: packed rows as long "
                           "as the longest sequence; scoring: padded batches)", type(unwrap_model(model)).__name__, error)
            return False
    return True
