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


def packed_row(sequences: list[list[int]], prompt_lengths: list[int]):
    """The inputs of `response_logprobs` for a list of sequences in one row, in order, no padding:
    input_ids, position_ids (restarting at 0 per sequence) and target_mask, all [1, total]. For
    attention that runs per sequence (wspo.sequence_attention)."""
    input_ids = torch.as_tensor([t for s in sequences for t in s], dtype=torch.long)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    target_mask = torch.cat([torch.arange(len(s)) >= p for s, p in zip(sequences, prompt_lengths)])[None]
    return input_ids, position_ids, target_mask


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
    trains = states.requires_grad or any(p.requires_grad for p in head.parameters())
    if torch.is_grad_enabled() and trains:
        if _plain_linear(head, states) and not getattr(inner.config, "final_logit_softcapping", None):
            return _RecomputedHeadLogprobs.apply(states, head.weight, head.bias, targets, chunk_rows)
        return _head_logprobs_autograd(head, states, targets, chunk_rows, inner.config)
    return _head_logprobs_inplace(head, states, targets, chunk_rows, inner.config)


def _plain_linear(head: torch.nn.Module, states: torch.Tensor) -> bool:
    """A bare nn.Linear holding its whole weight as a plain tensor: not a PEFT wrapper, not a
    DeepSpeed parameter (ZeRO-3 gathers and frees it around the module's own call, and may keep
    it gathered between calls, so its shape says nothing), not a DTensor shard; the fast paths
    multiply by `head.weight` themselves, the others call `head(x)`."""
    weight = getattr(head, "weight", None)
    return (type(head) is torch.nn.Linear and weight is not None and type(weight.data) is torch.Tensor
            and not hasattr(weight, "ds_id") and weight.dim() == 2 and weight.shape[1] == states.shape[1])


def _head_logprobs_autograd(head, states, targets, chunk_rows: int, config) -> torch.Tensor:
    """Training through a head we cannot multiply by ourselves (PEFT modules_to_save, ZeRO-3,
    soft-capped logits): the head's own forward per chunk, and autograd keeps every chunk's
    float32 logits for the backward pass."""
    pieces = []
    for start in range(0, states.shape[0], chunk_rows):
        logits = _softcap(head(states[start : start + chunk_rows]), config).float()
        picked = logits.gather(1, targets[start : start + chunk_rows, None]).squeeze(1)
        pieces.append(picked - torch.logsumexp(logits, dim=-1))
    if not pieces:
        return states.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


class _RecomputedHeadLogprobs(torch.autograd.Function):
    """Training through a plain linear head without keeping logits: the forward keeps only each
    position's log-sum-exp, and the backward recomputes each chunk's logits from the saved hidden
    states. Autograd would keep every chunk's float32 logits until the backward (rows x vocabulary
    x 4 bytes: ~1.1 GB for 1,800 response tokens of a 152k vocabulary); this holds one chunk's
    buffer while the forward or the backward of the head runs, and frees it before the decoder's
    backward (where a step's memory peaks: every gradient is alive there). About as fast: the
    recomputed matmul costs about what autograd's fresh [chunk, vocabulary] temporaries cost
    (benchmarks/head_buffer.py --train: 1.02x with a trained head, 0.95x with a frozen one).

    d log p(target) / d logits = onehot(target) - softmax(logits), so with g the incoming gradient
    of each position: d logits = g * (onehot - exp(logits - lse)), then the two matmuls of a linear.
    Autocast is honoured as F.linear would: the matmuls run in the autocast dtype, the softmax in
    float32, and the weight's gradient is summed over chunks in the weight's own dtype.
    """

    @staticmethod
    def forward(ctx, states, weight, bias, targets, chunk_rows: int):
        device = states.device
        compute = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
        total = states.shape[0]
        out = torch.empty(total, dtype=torch.float32, device=device)
        lse = torch.empty(total, dtype=torch.float32, device=device)
        rows = max(1, min(chunk_rows, total))
        scratch: dict = {}  # this call's chunk buffers, freed on return
        with torch.autocast(device.type, enabled=False):
            x_all, w, b = states.to(compute), weight.to(compute), None if bias is None else bias.to(compute)
            for start in range(0, total, rows):
                n = min(rows, total - start)
                logits = _chunk_logits(scratch, x_all[start : start + n], w, b, rows, compute)
                picked = logits.gather(1, targets[start : start + n, None]).squeeze(1)
                peak = logits.amax(dim=1, keepdim=True)
                peak.masked_fill_(torch.isinf(peak), 0.0)  # torch.logsumexp's guard
                norm = logits.sub_(peak).exp_().sum(dim=1).log_().add_(peak.squeeze(1))
                lse[start : start + n] = norm
                out[start : start + n] = picked - norm
        ctx.save_for_backward(states, weight, bias, targets, lse)
        ctx.rows, ctx.compute = rows, compute
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        states, weight, bias, targets, lse = ctx.saved_tensors
        rows, compute = ctx.rows, ctx.compute
        want_states, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_states = torch.empty_like(states) if want_states else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        grad_bias = torch.zeros_like(bias) if want_bias else None
        grad_out = grad_out.float()
        scratch: dict = {}
        with torch.autocast(states.device.type, enabled=False):
            x_all, w, b = states.to(compute), weight.to(compute), None if bias is None else bias.to(compute)
            for start in range(0, states.shape[0], rows):
                n = min(rows, states.shape[0] - start)
                x, g = x_all[start : start + n], grad_out[start : start + n, None]
                d = _chunk_logits(scratch, x, w, b, rows, compute)  # float32, recomputed
                d.sub_(lse[start : start + n, None]).exp_().mul_(g.neg())  # -g * softmax
                d.scatter_add_(1, targets[start : start + n, None], g)  # + g at the target
                if compute != torch.float32:
                    d = _scratch(scratch, rows, d.shape[1], compute, d.device)[:n].copy_(d)
                if want_states:
                    grad_states[start : start + n] = d @ w
                if want_weight:
                    if grad_weight.dtype == d.dtype:
                        grad_weight.addmm_(d.t(), x)
                    else:
                        grad_weight += (d.t() @ x).to(grad_weight.dtype)
                if want_bias:
                    grad_bias += d.sum(dim=0).to(grad_bias.dtype)
        return grad_states, grad_weight, grad_bias, None, None


def _chunk_logits(scratch: dict, x, weight, bias, rows: int, compute: torch.dtype) -> torch.Tensor:
    """x @ weight.T (+ bias) as float32 [n, vocabulary], in `scratch`'s buffers: the matmul in
    `compute`, cast to float32 when that is narrower."""
    vocab = weight.shape[0]
    raw = _scratch(scratch, rows, vocab, compute, x.device)[: x.shape[0]]
    if bias is None:
        torch.mm(x, weight.t(), out=raw)
    else:
        torch.addmm(bias, x, weight.t(), out=raw)
    if compute == torch.float32:
        return raw
    return _scratch(scratch, rows, vocab, torch.float32, x.device)[: x.shape[0]].copy_(raw)


def _scratch(buffers: dict, rows: int, vocab: int, dtype: torch.dtype, device) -> torch.Tensor:
    if dtype not in buffers:
        buffers[dtype] = torch.empty((rows, vocab), dtype=dtype, device=device)
    return buffers[dtype]


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


# Output heads whose float32 log-sum-exp runs as one compiled kernel (set by
# wspo.models.compile_decoder). Eager, log-softmax at the picked ids is five passes over the
# [chunk, vocabulary] logits (a float32 copy of bf16 ones, max, subtract, exp, sum); inductor fuses
# them into one reduction that reads the head's own output once: bf16 scoring's head went from 1.6x
# to 1.1x the time of its matmul (benchmarks/head_buffer.py --compile).
_FUSED_NORMALISERS: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()


def _picked_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)


def fuse_head_normaliser(head: torch.nn.Module, backend: str = "inductor") -> None:
    """Compile the no-grad path's log-sum-exp for this output head (undo: unfuse_head_normaliser).
    Every head shares `_picked_logprobs`'s compiled entries (one per dtype, grad mode and backend,
    dynamic in sizes), so a process scoring with several models compiles each kind once."""
    _FUSED_NORMALISERS[head] = torch.compile(_picked_logprobs, dynamic=True, backend=backend)


def unfuse_head_normaliser(head: torch.nn.Module) -> None:
    _FUSED_NORMALISERS.pop(head, None)


def _head_logprobs_inplace(head, states, targets, chunk_rows: int, config) -> torch.Tensor:
    """No gradients (scoring, evaluation): the head's logits go into one reused buffer, in the
    head's dtype (bf16 matmuls stay bf16), and the log-sum-exp runs in float32 in place: the same
    numbers as `_head_logprobs_autograd` (max, subtract, exp, sum, log, as torch.logsumexp does)."""
    total = states.shape[0]
    if not total:
        return states.new_zeros(0, dtype=torch.float32)
    rows = min(chunk_rows, total)
    weight = getattr(head, "weight", None)
    plain = (_plain_linear(head, states) and states.dtype == weight.dtype
             and not torch.is_autocast_enabled(states.device.type))  # autocast casts head(x), not mm(out=)
    vocab = weight.shape[0] if plain else None
    cap = getattr(config, "final_logit_softcapping", None)
    fused = _FUSED_NORMALISERS.get(head)
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
        if fused is not None:
            out[start : start + n] = fused(raw, targets[start : start + n])
        elif raw.dtype == torch.float32:
            out[start : start + n] = _picked_logprobs_inplace(raw, targets[start : start + n])
        else:  # bf16/fp16 matmul, float32 log-sum-exp: a quarter of the chunk at a time, so the
            # float32 copy is a quarter of the chunk's bytes (at the 0.5B shape 67 MiB, not 268)
            step = max(1, rows // 4)
            wide = _buffer(head, step, vocab, torch.float32, states.device)
            for first in range(0, n, step):
                m = min(step, n - first)
                block = wide[:m].copy_(raw[first : first + m])
                out[start + first : start + first + m] = _picked_logprobs_inplace(block, targets[start + first : start + first + m])
    return out


def _picked_logprobs_inplace(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`_picked_logprobs` of float32 logits without temporaries: the logits are overwritten."""
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    peak = logits.amax(dim=1, keepdim=True)
    peak.masked_fill_(torch.isinf(peak), 0.0)  # torch.logsumexp's guard: an infinite max would make x - max NaN
    sums = logits.sub_(peak).exp_().sum(dim=1)
    return picked - (sums.log_() + peak.squeeze(1))
