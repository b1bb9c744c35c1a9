"""Per-token log-probs of the response positions of a causal LM, without full-vocabulary logits.

Both phases need `log p(y_t | x, y_<t)` at response positions only. A plain forward returns
logits for every position ([batch, length, vocab]; 150k-vocab models make that the largest
tensor of the step). Instead we run the model's own forward with `logits_to_keep=1` (so wrappers
such as PEFT, DDP and DeepSpeed see a normal call), capture the decoder's final hidden states with
a forward hook, pick the rows of the positions we need, and apply the output head to those rows
in chunks: log-softmax = logit[target] - logsumexp(logits), in float32, per chunk.
"""

from __future__ import annotations

import weakref

import torch

from wspo.errors import InputError


# float32 logits of one output-head chunk; log-softmax needs about 3x this at its peak.
HEAD_CHUNK_BYTES = 256 * 2**20


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / DeepSpeed (`.module`) and PEFT (`get_base_model`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _softcap(logits: torch.Tensor, config) -> torch.Tensor:
    # Gemma-2 style final logit soft-capping; the self-check below catches any other head transform.
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def right_pad(sequences: list[list[int]], prompt_lengths: list[int], pad_token_id: int = 0):
    """The inputs of `response_logprobs` for a list of sequences: input_ids, attention_mask and
    target_mask (the response positions, from each prompt length on), all [batch, longest].

    Right padding: with a causal mask, real tokens never attend to the pads after them.
    """
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    target_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[row, : len(sequence)] = torch.as_tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        target_mask[row, prompt_length : len(sequence)] = True
    return input_ids, attention_mask, target_mask


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    target_mask: torch.Tensor,
    chunk_rows: int | None = None,
    position_ids: torch.Tensor | None = None,
    chunk_bytes: int = HEAD_CHUNK_BYTES,
    topk: int = 0,
    gather_ids: torch.Tensor | None = None,
):
    """Log-probs of `input_ids[b, t]` given `input_ids[b, :t]` wherever `target_mask[b, t]`.

    Returns a 1-D float32 tensor of the selected positions in row-major order (row 0's response
    tokens first). `target_mask[:, 0]` must be False (the first token has no context). Gradients
    flow when grad mode is on, so the trainer uses the same function as the scorers.

    Packed rows (`wspo.train.packing.pack_sequences`): `attention_mask` None and `position_ids`
    restarting at 0 at every sequence; the model then keeps attention inside each sequence, and
    a response token is still predicted from the position before it, in its own sequence.

    Distillation (wspo.shards.topk), from the same chunks of logits, never the whole vocabulary:
    `topk=K` also returns the K most likely ids of every selected position and their log-probs
    (phase one's teacher); `gather_ids` ([positions, K] ids) also returns the log-probs of those
    ids (phase two's student). Then the result is (log-probs, extra):
    extra = (topk log-probs [positions, K], topk ids [positions, K]) or gathered log-probs [positions, K].
    """
    if target_mask[:, 0].any():
        raise ValueError("target_mask marks position 0, which has no preceding context")
    if attention_mask is None:
        if position_ids is None:
            raise ValueError("response_logprobs needs attention_mask (padded rows) or position_ids (packed rows)")
    elif not bool(attention_mask[:, 0].all()):  # no position_ids are passed: pads must come last
        raise ValueError("left-padded batch: response_logprobs needs right padding (see right_pad)")
    inner = unwrap_model(model)
    decoder = inner.get_decoder()
    head = inner.get_output_embeddings()
    if decoder is None or head is None:
        raise InputError(f"{type(inner).__name__} has no decoder/output head: not a causal LM")

    captured: list[torch.Tensor] = []

    def grab(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(grab)
    try:
        if attention_mask is None:  # packed: the block-diagonal mask comes from position_ids
            out = model(input_ids=input_ids, position_ids=position_ids, logits_to_keep=1, use_cache=False)
        else:
            out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    hidden = captured[-1]  # [batch, length, hidden], after the final norm

    # Self-check, nearly free: the last position's logits the model computed itself must equal
    # our head applied to the captured hidden state, else this architecture transforms logits in
    # a way we do not reproduce (a logit scale, a soft cap) and every log-prob would be silently
    # wrong. The tolerance is 2% of the largest logit: mixed precision (accelerate's autocast
    # covers the model's forward, not our head call) differs by ~0.4%, such transforms by far more.
    ours = _softcap(head(hidden[:, -1:, :]), inner.config).float()
    theirs = out.logits[:, -1:, :].float()
    tolerance = 1e-3 + 0.02 * float(theirs.detach().abs().nan_to_num().max())
    if not torch.allclose(ours, theirs, rtol=0.0, atol=tolerance, equal_nan=True):  # NaN: reported by the caller
        raise RuntimeError(
            f"{type(inner).__name__}: output head applied to the decoder's hidden states does not "
            "reproduce the model's logits; response_logprobs does not support this architecture"
        )

    # The token at t is predicted from the hidden state at t - 1.
    rows, cols = target_mask.nonzero(as_tuple=True)
    states = hidden[rows, cols - 1]
    targets = input_ids[rows, cols]
    # The output head runs on chunks of positions sized by a byte budget for their float32 logits
    # (rows x vocabulary x 4), so a 152k vocabulary takes ~440 rows a chunk, a 2k one 32k rows.
    if chunk_rows is None:
        # out_features, not weight.shape: under ZeRO-3 the local weight is an empty partition.
        vocab = getattr(head, "out_features", None) or inner.config.vocab_size
        chunk_rows = max(1, chunk_bytes // (4 * vocab))
    if topk or gather_ids is not None:  # distillation: the top-k or the gathered ids from the same chunks
        return _head_logprobs_distill(head, states, targets, chunk_rows, inner.config, topk, gather_ids)
    if torch.is_grad_enabled() and states.requires_grad:
        return _head_logprobs_autograd(head, states, targets, chunk_rows, inner.config)
    return _head_logprobs_inplace(head, states, targets, chunk_rows, inner.config)


def _head_logprobs_autograd(head, states, targets, chunk_rows: int, config) -> torch.Tensor:
    """Training: fresh tensors per chunk, as autograd needs them."""
    pieces = []
    for start in range(0, states.shape[0], chunk_rows):
        logits = _softcap(head(states[start : start + chunk_rows]), config).float()
        picked = logits.gather(1, targets[start : start + chunk_rows, None]).squeeze(1)
        pieces.append(picked - torch.logsumexp(logits, dim=-1))
    if not pieces:
        return states.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def _head_logprobs_distill(head, states, targets, chunk_rows: int, config, topk: int, gather_ids):
    """Distillation (wspo.shards.topk): per chunk, the actual token's log-prob and the chunk's
    top-k (log-probs, ids), or its log-probs at `gather_ids`; fresh tensors (gradients flow)."""
    pieces, extra = [], []
    for start in range(0, states.shape[0], chunk_rows):
        logits = _softcap(head(states[start : start + chunk_rows]), config).float()
        picked = logits.gather(1, targets[start : start + chunk_rows, None]).squeeze(1)
        normaliser = torch.logsumexp(logits, dim=-1)
        pieces.append(picked - normaliser)
        if topk:
            values, ids = logits.topk(min(topk, logits.shape[-1]), dim=-1)  # sorted, most likely first
            extra.append((values - normaliser[:, None], ids))
        else:
            extra.append(logits.gather(1, gather_ids[start : start + chunk_rows]) - normaliser[:, None])
    if not pieces:
        logps = states.new_zeros(0, dtype=torch.float32)
        empty = states.new_zeros((0, topk or gather_ids.shape[1]), dtype=torch.float32)
        return logps, ((empty, empty.long()) if topk else empty)
    if topk:
        return torch.cat(pieces), (torch.cat([v for v, _ in extra]), torch.cat([i for _, i in extra]))
    return torch.cat(pieces), torch.cat(extra)


# One logits buffer per output head (and dtype), reused by every chunk of every call while the
# model lives: a fresh [chunk, vocab] tensor per chunk costs a page fault per 4 KiB on CPU (glibc
# returns blocks this large to the kernel when freed) and a pass over memory per temporary.
_LOGIT_BUFFERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _buffer(head: torch.nn.Module, rows: int, vocab: int, dtype: torch.dtype, device) -> torch.Tensor:
    cache = _LOGIT_BUFFERS.setdefault(head, {})
    key = (dtype, str(device))
    buf = cache.get(key)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != vocab:
        cache.pop(key, None)
        buf = cache[key] = torch.empty((rows, vocab), dtype=dtype, device=device)
    return buf[:rows]


def _head_logprobs_inplace(head, states, targets, chunk_rows: int, config) -> torch.Tensor:
    """No gradients (scoring, evaluation): the head's logits go into one reused buffer, in the
    head's dtype (bf16 matmuls stay bf16), and the log-sum-exp runs in float32 in place: the same
    numbers as `_head_logprobs_autograd` (max, subtract, exp, sum, log, as torch.logsumexp does)."""
    total = states.shape[0]
    if not total:
        return states.new_zeros(0, dtype=torch.float32)
    rows = min(chunk_rows, total)
    weight = getattr(head, "weight", None)
    plain = (type(head) is torch.nn.Linear and weight is not None and weight.dim() == 2
             and weight.shape[1] == states.shape[1] and states.dtype == weight.dtype
             and not torch.is_autocast_enabled(states.device.type))  # autocast casts head(x), not mm(out=)
    vocab = weight.shape[0] if plain else None
    cap = getattr(config, "final_logit_softcapping", None)
    out = torch.empty(total, dtype=torch.float32, device=states.device)
    for start in range(0, total, rows):
        n = min(rows, total - start)
        x = states[start : start + n]
        if plain:
            raw = _buffer(head, rows, vocab, weight.dtype, states.device)[:n]
            if head.bias is None:
                torch.mm(x, weight.t(), out=raw)
            else:
                torch.addmm(head.bias, x, weight.t(), out=raw)
        else:  # a wrapped head (PEFT modules_to_save, ZeRO-3 partitions): its own forward
            raw = head(x)
            vocab = raw.shape[1]
        if cap:  # as _softcap, in place, in the head's dtype
            raw.div_(cap).tanh_().mul_(cap)
        if raw.dtype == torch.float32:
            logits = raw
        else:  # bf16/fp16 matmul, float32 log-sum-exp
            logits = _buffer(head, rows, vocab, torch.float32, states.device)[:n]
            logits.copy_(raw)
        picked = logits.gather(1, targets[start : start + n, None]).squeeze(1)
        peak = logits.amax(dim=1, keepdim=True)
        # torch.logsumexp's guard: an infinite max would make x - max NaN.
        peak.masked_fill_(torch.isinf(peak), 0.0)
        sums = logits.sub_(peak).exp_().sum(dim=1)
        out[start : start + n] = picked - (sums.log_() + peak.squeeze(1))
    return out
