"""One shard row -> one training example (DESIGN sections 3, 5, 7).

    checked_prompt    the strong prompt ids of a row whose response, re-tokenized with the strong
                      tokenizer, gives its stored ids (else the error naming the row)
    kept_tokens       how many response tokens fit under max_length (skipped and cut rows counted)
    token_example     one checked row cut to the training max_length (rewards too)
    project_row       with another strong tokenizer: rewards summed over chunks (DESIGN section 5)
    is_eval_example   held-out evaluation rows, chosen by a hash of example_id

Training reads rows lazily from memory-mapped Arrow (rows.py, pairs.py) and builds each example
with these functions when it is drawn.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wspo.shards.projection import EXCLUDED, chunk_rewards, chunk_tokens, roundtrip_ok
from wspo.shards.tokenization import ResponseTokenizer, Skip, stored_ids_mismatch

from .shard_sets import DataError

TRAIN_SLOTS = ["chosen"]  # WSPO and SFT learn from chosen responses only (DESIGN section 1)


@dataclass
class Example:
    index: int  # position in its dataset, carried into batches so runs can name rows
    row_id: str
    example_id: str
    input_ids: list[int]  # prompt ids + response ids (end-of-turn included unless cut)
    prompt_length: int
    rewards: np.ndarray | None  # float32, one per segment (= response token, or chunk); None without reward
    ref_logps: np.ndarray | None = None  # float32 strong-reference log-probs from shards, else None
    # Reward projection (DESIGN section 5): the chunk of each strong response token; `rewards` then
    # holds one summed weak reward per chunk. None: one segment per token.
    token_segments: np.ndarray | None = None
    # Distillation (--loss kd): the teacher's top-k ids and log-probs, [response tokens, K].
    topk_ids: np.ndarray | None = None
    topk_logps: np.ndarray | None = None


def example_of(row: dict, prompt: list[int], response_ids: list[int], **values) -> Example:
    """The example of a shard row: its ids, the prompt ids then the kept response ids, and `values`
    (rewards, ...). Its index is set by the dataset that draws it."""
    return Example(index=0, row_id=row["id"], example_id=row["example_id"], input_ids=prompt + response_ids,
                   prompt_length=len(prompt), **values)


def checked_prompt(row: dict, stored: list[int], rule: ResponseTokenizer, counts: Counter, root: Path) -> list[int] | None:
    """The strong prompt ids of a shard row whose response, re-tokenized with the strong
    tokenizer, gives its stored ids (else the error naming the row, `_check_retokenized`); None,
    counted, when the strong chat template refuses the conversation."""
    try:
        prompt = rule.prompt_ids(json.loads(row["messages"]))
    except Skip as skip:
        counts[f"skipped_{skip.reason}"] += 1
        return None
    full_response, _, _ = rule.response_tokens(row["response"])
    _check_retokenized(row, stored, full_response, root)
    return prompt


def kept_tokens(n_tokens: int, room: int, counts: Counter) -> int:
    """How many of a response's `n_tokens` train: those that fit in `room` (max_length less the
    prompt, or less when the reference is shorter). None fitting (<= 0) is counted as skipped, a
    response cut short as cut."""
    keep = min(n_tokens, room)
    if keep <= 0:
        counts["skipped_prompt_too_long"] += 1
    elif keep < n_tokens:
        counts["cut_to_max_length"] += 1
    return keep


def token_example(row: dict, prompt: list[int], stored: list[int], reward: np.ndarray | None, ref: np.ndarray | None,
                  rule: ResponseTokenizer, counts: Counter, root: Path) -> Example | None:
    """One checked row (same tokenizer as the shards) cut to the training max_length; None (counted)
    when no response token fits."""
    if reward is not None and len(reward) != len(stored):
        raise DataError(f"row {row['id']} of {root}: {len(reward)} rewards for {len(stored)} tokens")
    # Phase one may have cut the response (truncated); a shorter training max_length cuts
    # it further, and the rewards of the cut tokens go with it.
    room = rule.max_length - len(prompt)
    if ref is not None:
        room = min(room, len(ref))  # scored under a shorter max_length: cut like a truncation
    keep = kept_tokens(len(stored), room, counts)
    if keep <= 0:
        return None
    return example_of(row, prompt, stored[:keep],
                      rewards=None if reward is None else np.asarray(reward[:keep], dtype=np.float32),
                      ref_logps=None if ref is None else np.asarray(ref[:keep], dtype=np.float32))


def project_row(row: dict, rule: ResponseTokenizer, weak: dict, same_vocab: bool, counts: Counter) -> Example | None:
    """One shard row under another tokenizer: strong ids, chunk of each strong token, chunk rewards.

    Skipped (counted) when the response does not round-trip through the strong tokenizer, when
    no strong response token fits max_length, or when no chunk is usable.
    """
    response = row["response"]
    if not roundtrip_ok(rule.tokenizer, response):
        counts["skipped_not_roundtrip"] += 1
        return None
    try:
        prompt = rule.prompt_ids(json.loads(row["messages"]))
    except Skip as skip:
        counts[f"skipped_{skip.reason}"] += 1
        return None
    ids, starts, ends = rule.response_tokens(response)
    keep = kept_tokens(len(ids), rule.max_length - len(prompt), counts)
    if keep <= 0:
        return None
    if "reward" not in weak:  # sft: the strong ids are all it needs
        return example_of(row, prompt, ids[:keep], rewards=None)
    chunking = chunk_tokens(
        len(response), weak["token_start"], weak["token_end"], starts[:keep], ends[:keep],
        weak_has_end_of_turn=not row["truncated"], strong_has_end_of_turn=keep == len(ids),
        weak_pieces=weak["token_ids"] if same_vocab else None, strong_pieces=ids[:keep] if same_vocab else None,
    )
    # Excluded tokens (past the text both sides cover) are always a suffix: drop them.
    included = int((chunking.strong_chunk != EXCLUDED).sum())
    if chunking.num_chunks == 0 or included == 0:
        counts["skipped_no_chunk"] += 1
        return None
    return example_of(row, prompt, ids[:included], rewards=chunk_rewards(chunking, weak["reward"]).astype(np.float32),
                      token_segments=chunking.strong_chunk[:included].astype(np.int64))


def _check_retokenized(row: dict, stored: list[int], full: list[int], root: Path) -> None:
    """Stored ids must be the strong tokenizer's ids: all of them, or a prefix when phase one cut the response."""
    at = stored_ids_mismatch(stored, full, row["truncated"])
    if at is None:
        return
    raise DataError(
        f"row {row['id']} (example {row['example_id']}) of {root}: re-tokenizing its response with the strong "
        f"tokenizer gives {len(full)} ids, the shard stores {len(stored)}, first difference at token {at}. The "
        "tokenizers share a fingerprint, so the shard row or the tokenizer files were altered; rescore the shards."
    )


def is_eval_example(example_id: str, eval_fraction: float) -> bool:
    """A stable pseudo-random choice per example: every response of one example lands on one side."""
    bucket = int(hashlib.sha256(example_id.encode()).hexdigest()[:8], 16) / 2**32
    return bucket < eval_fraction

