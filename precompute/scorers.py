"""Scorer backends: token ids in, per-token log-probs of the response positions out.

    scorer = open_scorer("hf", model_dir, dtype="auto", batch_tokens=16384)
    logps = scorer.score(sequences, prompt_lengths)   # logps[i][k] = log p(seq[i][p_i + k] | seq[i][:p_i + k])
    scorer.close()                                     # frees the model before the next one loads

`hf` batches with transformers; `vllm` (precompute/vllm_scorer.py) uses vLLM's offline engine and
is imported only when chosen.
"""

from __future__ import annotations

import gc
from typing import Protocol

import numpy as np
import torch

from wspo.errors import ConfigError
from wspo.logprobs import response_logprobs, right_pad
from wspo.models import default_device, load_causal_lm, resolve_dtype


class Scorer(Protocol):
    backend: str
    dtype: str

    def score(self, sequences: list[list[int]], prompt_lengths: list[int]) -> list[np.ndarray]: ...

    def close(self) -> None: ...


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size fits `batch_tokens`.

    Longest first, so an out-of-memory error shows up on the first batch, not after an hour.
    A sequence longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # the first is the longest
        if current and width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class HFScorer:
    """Batched transformers forward in inference mode, log-softmax only at response positions."""

    backend = "hf"

    def __init__(self, model_dir, dtype: str = "auto", batch_tokens: int = 16384, device: str | None = None):
        self.device = device or default_device()
        self.torch_dtype = resolve_dtype(dtype, self.device)
        self.dtype = str(self.torch_dtype).removeprefix("torch.")
        self.batch_tokens = batch_tokens
        self.model = load_causal_lm(model_dir, self.torch_dtype, self.device)

    @torch.inference_mode()
    def score(self, sequences: list[list[int]], prompt_lengths: list[int]) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(sequences)
        for batch in length_batches([len(s) for s in sequences], self.batch_tokens):
            input_ids, attention_mask, target_mask = right_pad([sequences[i] for i in batch], [prompt_lengths[i] for i in batch])
            flat = response_logprobs(
                self.model, input_ids.to(self.device), attention_mask.to(self.device), target_mask.to(self.device)
            ).cpu().numpy()
            offset = 0
            for i in batch:
                n = len(sequences[i]) - prompt_lengths[i]
                results[i] = flat[offset : offset + n]
                offset += n
        return results  # type: ignore[return-value]

    def close(self) -> None:
        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def open_scorer(backend: str, model_dir, dtype: str, batch_tokens: int, **vllm_options) -> Scorer:
    if backend == "hf":
        return HFScorer(model_dir, dtype=dtype, batch_tokens=batch_tokens)
    if backend == "vllm":
        from .vllm_scorer import VLLMScorer  # vLLM is imported only when chosen

        return VLLMScorer(model_dir, dtype=dtype, batch_tokens=batch_tokens, **vllm_options)
    raise ConfigError(f"backend: {backend!r}; choose hf or vllm")
