"""Completions for a prompt set, written in AlpacaEval's JSON layout.

Prompt ids are the tokenization rule's (`ResponseTokenizer.prompt_ids`: the chat template with
the generation prompt, or the documented fallback template), for both backends; generation stops
at the rule's end-of-turn token (the tokenizer's eos unless `end_of_turn_token` says otherwise).
The output text is the generated ids up to (not including) the end-of-turn token, decoded with
the same tokenizer and special tokens skipped, unstripped.

Only the options given here steer decoding: the model's own `generation_config.json` sampling
defaults (repetition penalty, top-k, ...) are ignored by both backends, so `hf` and `vllm` decode
the same way. Greedy is `temperature 0`; sampling uses `temperature`, `top_p` and `seed` (top-k off).

- `hf`: transformers `generate` with left padding; prompts sorted by length into batches of at most
  `batch_tokens` = rows x (longest prompt + max_new_tokens) (the scorers' `length_batches`).
- `vllm`: offline `LLM.generate` on token-id prompts (`TokensPrompt`), no tokenizer in the engine,
  `stop_token_ids=[end-of-turn]`; the engine is shut down at the end. vLLM is imported only here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from wspo.errors import InputPathError
from wspo.embedded.sample import shows_preference_signal
from wspo.models import (check_weights, default_device, load_causal_lm, load_tokenizer, read_config, release_freed_memory,
                         resolve_dtype, resolve_model_dir)
from wspo.precompute.data import detect_format, load_rows, to_example
from wspo.precompute.scorers import length_batches
from wspo.shards.store import write_text
from wspo.shards.tokenization import ResponseTokenizer, Skip

from .config import GenerateArguments
from .rewards import EvalError


@dataclass
class Prompt:
    messages: list[dict]  # the conversation before the response
    dataset: str

    @property
    def instruction(self) -> str:
        """AlpacaEval's `instruction`: the last user message."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), self.messages[-1]["content"])


# -- prompts ------------------------------------------------------------------------------------


def prompts_from_dataset(args: GenerateArguments) -> tuple[list[Prompt], Counter]:
    rows = load_rows(args.dataset, args.dataset_split, args.max_samples)
    layout = detect_format(rows) if args.dataset_format == "auto" else args.dataset_format
    prompts, skipped = [], Counter()
    for index, row in enumerate(rows):
        try:
            example = to_example(index, row, layout, ["chosen"], args.column_map)
        except Skip as skip:
            skipped[skip.reason] += 1
            continue
        prompts.append(Prompt(example.responses["chosen"][0], args.dataset))
    return prompts, skipped


def prompts_from_instructions(args: GenerateArguments) -> tuple[list[Prompt], Counter]:
    path = Path(args.instructions)
    if not path.is_file():
        raise InputPathError(f"instructions: {path} does not exist")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalError(f"instructions: {path} is not valid JSON ({e})") from None
    if not isinstance(items, list):
        raise EvalError(f"instructions: {path} must hold a JSON list of strings or of objects with an 'instruction' key")
    prompts = []
    for i, item in enumerate(items[: args.max_samples]):
        text = item.get("instruction") if isinstance(item, dict) else item
        if not isinstance(text, str) or not text.strip():
            raise EvalError(f"instructions: {path} item {i} has no instruction string")
        dataset = item.get("dataset") if isinstance(item, dict) and isinstance(item.get("dataset"), str) else path.stem
        prompts.append(Prompt([{"role": "user", "content": text}], dataset))
    return prompts, Counter()


# -- backends -----------------------------------------------------------------------------------


@torch.inference_mode()
def generate_hf(model_dir: Path, prompt_ids: list[list[int]], args: GenerateArguments, eot_id: int, pad_id: int) -> list[list[int]]:
    from transformers import GenerationConfig

    device = default_device()
    model = load_causal_lm(model_dir, resolve_dtype(args.dtype, device), device)
    model.generation_config = GenerationConfig(eos_token_id=eot_id, pad_token_id=pad_id)  # no hub sampling defaults
    options = dict(max_new_tokens=args.max_new_tokens, eos_token_id=eot_id, pad_token_id=pad_id, repetition_penalty=1.0)
    if args.temperature > 0:
        options.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
        torch.manual_seed(args.seed)
    else:
        options.update(do_sample=False)
    results: list[list[int] | None] = [None] * len(prompt_ids)
    bar = tqdm(total=len(prompt_ids), unit="row", desc="generating", file=sys.stderr)
    started, new_tokens = time.perf_counter(), 0
    try:
        for batch in length_batches([len(p) + args.max_new_tokens for p in prompt_ids], args.batch_tokens):
            width = max(len(prompt_ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
                n = len(prompt_ids[i])
                input_ids[row, width - n :] = torch.tensor(prompt_ids[i])
                attention_mask[row, width - n :] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **options)
            for row, i in enumerate(batch):
                results[i] = out[row, width:].tolist()
                new_tokens += len(results[i])  # up to the end-of-turn token's padding; a progress figure
            bar.update(len(batch))
            bar.set_postfix(tok_s=round(new_tokens / max(time.perf_counter() - started, 1e-9)))
    finally:
        bar.close()
        del model
        release_freed_memory()
    return results  # type: ignore[return-value]


def generate_vllm(model_dir: Path, prompt_ids: list[list[int]], args: GenerateArguments, eot_id: int) -> list[list[int]]:
    # vLLM logs to stdout by default; keep stdout for the JSON summary (unless the user chose).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from wspo.precompute.vllm_scorer import kv_cache_size, shutdown_engine

    longest = max(len(p) for p in prompt_ids) + args.max_new_tokens
    positions = read_config(model_dir).get("max_position_embeddings")
    if positions is not None and longest > positions:
        raise EvalError(f"the longest prompt + max_new_tokens is {longest} tokens, more than the model's "
                        f"max_position_embeddings {positions}; lower max_new_tokens or max_prompt_length")
    llm = LLM(
        model=str(model_dir),
        skip_tokenizer_init=True,  # ids in, ids out: the rule's tokenizer decodes, as with hf
        generation_config="vllm",  # ignore the model's sampling defaults, like the hf backend
        dtype=str(resolve_dtype(args.dtype, default_device())).removeprefix("torch."),
        seed=args.seed,
        max_model_len=longest,
        max_num_batched_tokens=args.batch_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=True,
        **kv_cache_size(args.kv_cache_memory_bytes),
    )
    try:
        params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed if args.temperature > 0 else None, stop_token_ids=[eot_id], detokenize=False)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_ids], params, use_tqdm=True)  # vLLM's bar: prompts/s, input and output tokens/s
        results = []
        for i, (p, out) in enumerate(zip(prompt_ids, outputs, strict=True)):
            if list(out.prompt_token_ids) != list(p):
                raise RuntimeError(f"vLLM output {i} is not for prompt {i}")
            results.append(list(out.outputs[0].token_ids))
        return results
    finally:
        shutdown_engine(llm)


# -- the task -----------------------------------------------------------------------------------


def run(args: GenerateArguments) -> tuple[dict, list[dict]]:
    """Generate; returns the summary and the AlpacaEval records (also written to output_file)."""
    started = time.perf_counter()
    model_dir = resolve_model_dir(args.model, option="model")
    check_weights(model_dir, option="model")
    tokenizer = load_tokenizer(args.tokenizer or model_dir)
    rule = ResponseTokenizer(tokenizer, args.max_prompt_length + args.max_new_tokens, args.max_prompt_length, args.end_of_turn_token)
    prompts, skipped = prompts_from_dataset(args) if args.dataset is not None else prompts_from_instructions(args)
    kept, prompt_ids = [], []
    for prompt in prompts:
        try:
            ids = rule.prompt_ids(prompt.messages)
        except Skip as skip:  # invalid text, or the chat template rejects this conversation
            skipped[skip.reason] += 1
            continue
        if len(ids) > args.max_prompt_length:
            skipped["prompt_too_long"] += 1
            continue
        kept.append(prompt)
        prompt_ids.append(ids)
    if not kept:
        where = args.dataset if args.dataset is not None else args.instructions
        raise EvalError(f"no prompts to generate for in {where} (skipped: {dict(skipped) or 'none'})")

    eot = rule.end_of_turn_id
    generation_started = time.perf_counter()
    if args.backend == "vllm":
        generated = generate_vllm(model_dir, prompt_ids, args, eot)
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
        generated = generate_hf(model_dir, prompt_ids, args, eot, pad)
    generation_seconds = time.perf_counter() - generation_started

    generator = args.generator or model_dir.resolve().name
    records, unfinished, tokens = [], 0, 0
    for prompt, ids in zip(kept, generated):
        if eot in ids:
            ids = ids[: ids.index(eot)]
        else:
            unfinished += 1
        tokens += len(ids)
        records.append({"instruction": prompt.instruction,
                        "output": tokenizer.decode(ids, skip_special_tokens=True),
                        "generator": generator,
                        "dataset": prompt.dataset})
    out = Path(args.output_file)
    write_text(json.dumps(records, ensure_ascii=False, indent=2) + "\n", out)
    summary = {
        "task": "generate",
        "model": args.model,
        "generator": generator,
        "backend": args.backend,
        "source": {"dataset": args.dataset, "split": args.dataset_split} if args.dataset is not None else {"instructions": args.instructions},
        "outputs": len(records),
        "skipped": dict(sorted(skipped.items())),
        "hit_max_new_tokens": unfinished,
        "generated_tokens": tokens,
        "generated_tokens_per_second": round(tokens / max(generation_seconds, 1e-9), 1),
        "preference_signal_share": sum(shows_preference_signal(r["output"]) for r in records) / len(records),
        "decoding": {"temperature": args.temperature, "top_p": args.top_p if args.temperature > 0 else None,
                     "max_new_tokens": args.max_new_tokens, "seed": args.seed if args.temperature > 0 else None,
                     "end_of_turn_token": rule.end_of_turn_token},
        "output_file": str(out),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return summary, records
