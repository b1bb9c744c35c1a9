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
