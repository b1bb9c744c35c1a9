"""`response_logprobs`: equal to a full-logits computation, and refusing heads it cannot reproduce."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from wspo.logprobs import response_logprobs


def batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 2000, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[0, 4:] = True
    target[1, 6:9] = True
    target[2, 1:] = True
    return ids, mask, target


def test_equals_full_logits_with_padding_and_gradients(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["weak_ref"], dtype=torch.float32)
    ids, mask, target = batch()
    ours = response_logprobs(model, ids, mask, target)
    full = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    rows, cols = target.nonzero(as_tuple=True)
    expected = full[rows, cols - 1].gather(1, ids[rows, cols][:, None])[:, 0]
    assert ours.shape == expected.shape == (int(target.sum()),)
    assert (ours - expected).abs().max() < 1e-5
    ours.sum().backward()  # gradients flow (the trainer uses the same function)
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_bf16_autocast_forward_passes_the_self_check(tiny_models):
    """accelerate's mixed precision autocasts the model's forward only, not our head call."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["weak_ref"], dtype=torch.float32)
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    ids, mask, target = batch()
    with torch.no_grad():
        ours = response_logprobs(model, ids, mask, target)
    assert torch.isfinite(ours).all()


def test_a_head_transform_we_do_not_reproduce_is_refused(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["weak_ref"], dtype=torch.float32)
    with torch.no_grad():  # logits large enough that a soft cap changes them visibly
        model.lm_head.weight.mul_(50)
    model.config.final_logit_softcapping = 1.0  # we would apply a cap the Qwen2 forward does not
    ids, mask, target = batch()
    with pytest.raises(RuntimeError, match="does not reproduce the model's logits"):
        response_logprobs(model, ids, mask, target)
    with pytest.raises(ValueError, match="position 0"):
        response_logprobs(model, ids, mask, torch.ones_like(target))
    left = mask.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        response_logprobs(model, ids, left, target & left.bool())


def test_head_chunks_sized_by_bytes_give_the_same_logprobs(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["weak_ref"], dtype=torch.float32).eval()
    ids, mask, target = batch()
    vocab = model.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        whole = response_logprobs(model, ids, mask, target)  # default budget: one chunk here
        three_rows = response_logprobs(model, ids, mask, target, chunk_bytes=3 * 4 * vocab)  # 3 positions a chunk
    assert int(target.sum()) > 3 and torch.allclose(whole, three_rows, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_inference_head_in_one_reused_buffer_equals_the_autograd_path(dtype, softcap):
    """Without gradients the head writes its logits into one buffer kept per head and does the
    log-sum-exp in place (float32); the numbers equal the training path's bit for bit."""
    from types import SimpleNamespace

    from wspo.logprobs import _LOGIT_BUFFERS, _head_logprobs_autograd, _head_logprobs_inplace

    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(32, 5000, bias=False).to(dtype)
    states = (torch.randn(23, 32, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, 5000, (23,), generator=gen)
    config = SimpleNamespace(final_logit_softcapping=softcap)
    with torch.no_grad():
        expected = _head_logprobs_autograd(head, states, targets, 7, config)
        first = _head_logprobs_inplace(head, states, targets, 7, config)
        buffers = {key: buf.data_ptr() for key, buf in _LOGIT_BUFFERS[head].items()}
        second = _head_logprobs_inplace(head, states[:10], targets[:10], 7, config)
        expected_second = _head_logprobs_autograd(head, states[:10], targets[:10], 7, config)
    assert torch.equal(first, expected) and torch.equal(second, expected_second)
    assert {key: buf.data_ptr() for key, buf in _LOGIT_BUFFERS[head].items()} == buffers  # reused, not reallocated
    assert len(buffers) == (1 if dtype == torch.float32 else 2)  # bf16 logits + their float32 copy


def _saved_bytes(fn):
    """Bytes autograd keeps for the backward pass while `fn` runs (parameters counted too)."""
    seen = []

    def pack(t):
        seen.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen)


@pytest.mark.parametrize("case", ["fp32", "bias", "frozen_head", "bf16_autocast"])
def test_training_head_recomputes_logits_and_equals_autograd(case):
    """Training through a plain linear head keeps only each position's log-sum-exp and recomputes
    the chunk's logits in the backward: the same log-probs and gradients as autograd through
    head(x) per chunk, without keeping [chunk, vocabulary] logits alive until the backward."""
    from types import SimpleNamespace

    from wspo.logprobs import _RecomputedHeadLogprobs, _head_logprobs_autograd

    gen = torch.Generator().manual_seed(1)
    vocab, hidden, positions, chunk = 3000, 24, 29, 8  # 4 chunks, the last one short
    head = torch.nn.Linear(hidden, vocab, bias=case == "bias")
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=gen))
    head.weight.requires_grad_(case != "frozen_head")
    targets = torch.randint(0, vocab, (positions,), generator=gen)
    weights = torch.randn(positions, generator=gen)  # an arbitrary downstream loss
    config = SimpleNamespace(final_logit_softcapping=None)
    results = {}
    for path in ("autograd", "recompute"):
        states = torch.randn(positions, hidden, generator=torch.Generator().manual_seed(2)).requires_grad_()
        head.zero_grad()

        def run():
            if path == "autograd":
                return _head_logprobs_autograd(head, states, targets, chunk, config)
            return _RecomputedHeadLogprobs.apply(states, head.weight, head.bias, targets, chunk)

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16_autocast"):
            logps, saved = _saved_bytes(run)
        (logps * weights).sum().backward()
        grads = [states.grad] + [p.grad for p in head.parameters() if p.requires_grad]
        results[path] = (logps.detach(), [g.clone() for g in grads], saved)
    (lp_a, grads_a, saved_a), (lp_r, grads_r, saved_r) = results["autograd"], results["recompute"]
    assert lp_r.dtype == torch.float32 and len(grads_a) == len(grads_r) == {"frozen_head": 1, "bias": 3}.get(case, 2)
    tolerance = 2e-2 if case == "bf16_autocast" else 1e-5  # bf16 matmuls, summed in another order
    assert (lp_r - lp_a).abs().max() <= tolerance * max(1.0, float(lp_a.abs().max()))
    for ours, theirs in zip(grads_r, grads_a):
        assert ours.dtype == theirs.dtype
        assert (ours - theirs).abs().max() <= tolerance * float(theirs.abs().max())
    # autograd keeps every chunk's float32 logits (29 x 3000 x 4 bytes at least); the recompute
    # keeps the inputs it was given (states, weight, bias, targets) and 29 log-sum-exps.
    assert saved_a >= positions * vocab * 4
    inputs = sum(t.numel() * t.element_size() for t in (head.weight, targets)) + positions * hidden * 4
    assert saved_r <= inputs + (vocab * 4 if case == "bias" else 0) + positions * 4


def test_a_trained_head_over_a_frozen_body_gets_its_gradient(tiny_models):
    """Only the output head trains (the hidden states carry no gradient): the training path still
    runs, and the head's gradient equals the one through full logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["weak_ref"], dtype=torch.float32)
    model.config.tie_word_embeddings = False
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untied from the input embeddings
    for p in model.parameters():
        p.requires_grad_(False)
    head.weight.requires_grad_(True)
    ids, mask, target = batch()
    response_logprobs(model, ids, mask, target).sum().backward()
    ours, head.weight.grad = head.weight.grad, None
    full = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    rows, cols = target.nonzero(as_tuple=True)
    full[rows, cols - 1].gather(1, ids[rows, cols][:, None]).sum().backward()
    assert ours is not None and ours.abs().sum() > 0
    assert (ours - head.weight.grad).abs().max() < 1e-5


def test_deepspeed_and_wrapped_heads_take_the_heads_own_forward():
    """The fast paths multiply by head.weight themselves; a ZeRO-3 parameter (gathered and freed by
    hooks around the module's call, `ds_id`) or a wrapper must go through head(x)."""
    from wspo.logprobs import _plain_linear

    states = torch.zeros(3, 8)
    head = torch.nn.Linear(8, 50, bias=False)
    assert _plain_linear(head, states)
    head.weight.ds_id = 7
    assert not _plain_linear(head, states)
    assert not _plain_linear(torch.nn.Sequential(torch.nn.Linear(8, 50)), states)
