"""Scorer backends: token ids in, per-token log-probs of the response positions out.

    scorer = open_scorer("hf", model_dir, dtype="auto", batch_tokens=None)   # None: default_batch_tokens
    scorer = open_scorer("hf", model_dir, dtype="auto", batch_tokens=None, compile=True)  # torch.compile'd decoder
    logps = scorer.score(sequences, prompt_lengths)   # logps[i][k] = log p(seq[i][p_i + k] | seq[i][:p_i + k])
    scorer.close()                                     # frees the model before the next one loads

With `topk=K` (distillation) `score` returns, per sequence, (logps [n], topk_logps [n, K],
topk_ids [n, K]): the K most likely ids at each response position, most likely first.

`hf` batches with transformers; `vllm` (precompute/vllm_scorer.py) uses vLLM's offline engine and
is imported only when chosen.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import torch

from wspo.errors import ConfigError
from wspo.logprobs import packed_row, response_logprobs, right_pad
from wspo.sequence_attention import use_per_sequence_attention
from wspo.models import (compile_decoder, default_device, load_causal_lm, release_freed_memory, resolve_dtype,
                         uncompile_decoder)

logger = logging.getLogger(__name__)


class Scorer(Protocol):
    backend: str
    dtype: str

    def score(self, sequences: list[list[int]], prompt_lengths: list[int], topk: int = 0) -> list: ...

    def close(self) -> None: ...


def length_batches(lengths: list[int], batch_tokens: int, padded: bool = True) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size (or, `padded` False, whose
    tokens: one packed row) fits `batch_tokens`.

    Longest first, so an out-of-memory error shows up on the first batch, not after an hour.
    A sequence longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current, tokens = [], [], 0
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # the first is the longest
        size = width * (len(current) + 1) if padded else tokens + lengths[i]
        if current and size > batch_tokens:
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    if current:
        batches.append(current)
    return batches


# glibc hands blocks above 32 MiB (its largest mmap threshold) straight back to the kernel when
# they are freed, so every larger activation costs fresh zeroed pages on the next batch.
CPU_ACTIVATION_BYTES = 32 * 2**20
GPU_BATCH_TOKENS = 16384


def default_batch_tokens(config, device: str, dtype: torch.dtype) -> int:
    """The hf scorer's tokens per forward (padded, or one packed row's) when `batch_tokens` is not set.

    GPU: 16,384 (large batches keep the device busy). CPU: the largest power of two, within
    512-4,096, that keeps the widest activation ([tokens, intermediate_size]) under 32 MiB. Past
    ~1,000 rows a CPU matmul runs no faster, while a larger batch pads more (batches are cut from
    length-sorted rows) and re-faults its activations every layer: on 2 cores at the quick shape
    (docs/benchmarks.md) 16,384 padded 1.37x and ran at half the speed of 2,048. One packed row
    per batch (CPU) has no padding, and still gains nothing from more: at the 0.5B shape, float32,
    1,024 / 2,048 / 4,096 tokens scored the same rows in 72 / 76 / 74 s with 0.5M / 3.0M / 4.2M
    page faults.
    """
    if not device.startswith("cpu"):
        return GPU_BATCH_TOKENS
    width = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    tokens = CPU_ACTIVATION_BYTES // (width * torch.tensor([], dtype=dtype).element_size())
    return int(min(4096, max(512, 2 ** max(0, int(tokens).bit_length() - 1))))


# `compile="auto"` compiles where it was measured faster and the job is long enough to repay the
# compile (docs/benchmarks.md, issue 18). On 2 CPU cores, with each batch one packed row, the
# compiled decoder (RMSNorm, rotary, SiLU and residual adds fused into a few loops) scored faster
# than eager in the same process: 1.08x (float32) and 1.30x (bfloat16) at the quick shape, 1.07x
# and 1.12x at the Qwen2-0.5B shape, after 12-50 s of compiling per scorer (inductor's on-disk
# cache warm; ~100 s cold). 2,048 rows (one part at the default rows_per_file) take tens of
# minutes to hours there. GPUs: not measured yet, so auto leaves them eager.
COMPILE_MIN_ROWS = 2048


def resolve_compile(choice: str, rows: int, device: str | None = None) -> bool:
    """`--compile` as a yes/no for an hf scorer about to score `rows` sequences. auto: on a CPU with
    at least COMPILE_MIN_ROWS rows, where it was measured faster and pays for itself."""
    if choice != "auto":
        return choice == "true"
    return (device or default_device()).startswith("cpu") and rows >= COMPILE_MIN_ROWS


class HFScorer:
    """Batched transformers forward in inference mode, log-softmax only at response positions.

    compile: wrap the decoder's forward in `torch.compile(dynamic=True)`, and compile the head's
    log-sum-exp as one fused reduction (the head's matmul stays eager, in one reused buffer:
    wspo.logprobs). The compile happens on open, on two small warm-up batches (one row with one
    response position, two rows: PyTorch specialises size 1), so `score` times scoring only and
    `compile_seconds` says what the compile cost. A compile that fails (no C++ compiler, an
    unsupported model) falls back to the eager forward with a warning.
    """

    backend = "hf"

    def __init__(self, model_dir, dtype: str = "auto", batch_tokens: int | None = None, device: str | None = None,
                 compile: bool = False, attn_implementation: str = "auto"):
        self.device = device or default_device()
        self.torch_dtype = resolve_dtype(dtype, self.device)
        self.dtype = str(self.torch_dtype).removeprefix("torch.")
        auto = attn_implementation == "auto"
        self.model = load_causal_lm(model_dir, self.torch_dtype, self.device, attn_implementation)
        # CPU: each batch packed into one row, attention per sequence (no padding, causal kernel);
        # GPUs keep padded batches (a kernel launch per sequence and layer) until measured there.
        self.one_row = auto and self.device.startswith("cpu") and use_per_sequence_attention(self.model)
        self.batch_tokens = batch_tokens or default_batch_tokens(self.model.config, self.device, self.torch_dtype)
        self.compiled, self.compile_seconds = False, 0.0
        if compile:
            self._compile()

    def _compile(self) -> None:
        compile_decoder(self.model)
        start = time.perf_counter()
        try:
            # One row with one response position, then two rows with eight each: PyTorch
            # specialises size 1, so both graphs exist before the first real batch.
            for rows, prompt in ((1, 15), (2, 8)):
                warm = [[1 + (i % 7) for i in range(16)]] * rows
                self.score(warm, [prompt] * rows)
        except torch._dynamo.exc.TorchDynamoException as e:  # BackendCompilerFailed, InductorError, ...
            uncompile_decoder(self.model)
            logger.warning("torch.compile of %s failed, scoring with the eager forward: %s",
                           type(self.model).__name__, " ".join(str(e).splitlines()[:2]) or type(e).__name__)
            return
        self.compiled, self.compile_seconds = True, time.perf_counter() - start

    @torch.inference_mode()
    def score(self, sequences: list[list[int]], prompt_lengths: list[int], topk: int = 0) -> list:
        results: list = [None] * len(sequences)
        for batch in length_batches([len(s) for s in sequences], self.batch_tokens, padded=not self.one_row):
            rows = ([sequences[i] for i in batch], [prompt_lengths[i] for i in batch])
            if self.one_row:
                input_ids, position_ids, target_mask = packed_row(*rows)
                attention_mask, position_ids = None, position_ids.to(self.device)
            else:
                (input_ids, attention_mask, target_mask), position_ids = right_pad(*rows), None
                attention_mask = attention_mask.to(self.device)
            out = response_logprobs(self.model, input_ids.to(self.device), attention_mask, target_mask.to(self.device),
                                    topk=topk, position_ids=position_ids)
            flat = (out[0] if topk else out).cpu().numpy()
            if topk:
                top_logps, top_ids = (t.cpu().numpy() for t in out[1])
            offset = 0
            for i in batch:
                n = len(sequences[i]) - prompt_lengths[i]
                part = slice(offset, offset + n)
                results[i] = (flat[part], top_logps[part], top_ids[part]) if topk else flat[part]
                offset += n
        return results

    def close(self) -> None:
        del self.model
        release_freed_memory()  # the next scorer loads into the memory this one held


def open_scorer(backend: str, model_dir, dtype: str, batch_tokens: int | None, compile: bool = False,
                attn_implementation: str = "auto", **vllm_options) -> Scorer:
    """compile, attn_implementation: hf only (vLLM decides its own compilation and attention).
    vllm_options: engine settings of VLLMScorer (max_topk: the largest topk `score` will be asked for)."""
    if backend == "hf":
        return HFScorer(model_dir, dtype=dtype, batch_tokens=batch_tokens, compile=compile,
                        attn_implementation=attn_implementation)
    if backend == "vllm":
        from .vllm_scorer import VLLMScorer  # vLLM is imported only when chosen

        return VLLMScorer(model_dir, dtype=dtype, batch_tokens=batch_tokens or GPU_BATCH_TOKENS, **vllm_options)
    raise ConfigError(f"backend: {backend!r}; choose hf or vllm")
