"""Implicit-reward accuracy and margins of a (policy, reference) pair on preference pairs.

The implicit reward of a response y to a conversation x is the summed log-ratio over its response
tokens (the tokenization rule's response ids, end-of-turn token included):

    R(x, y) = sum_t ( log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) )

(DPO's reward is beta * R; accuracy does not depend on beta). A pair counts as a win when
R(chosen) > R(rejected) strictly: a tie is not a win, so policy == reference scores accuracy 0.

Pairs come from a preference set (`load_rows` + `to_example`, every layout phase one reads) or
from a shard set with `chosen` and `rejected` rows (paired by `example_id` with training's rule:
shards/pairing.py). Both models are scored with the `hf` scorer (length-sorted batches,
`response_logprobs`, inference mode), one after the other, so they never share memory; or the
reference log-probs come from a shard column.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wspo.errors import WspoError
from wspo.models import check_weights, default_device, load_tokenizer, model_fingerprint, resolve_dtype, resolve_model_dir
from wspo.precompute.data import detect_format, load_rows, to_example
from wspo.precompute.scorers import HFScorer
from wspo.shards.pairing import rows_by_example
from wspo.shards.schema import logp_column
from wspo.shards.store import ShardSet, list_arrays
from wspo.shards.tokenization import ResponseTokenizer, Skip, shards_rule, stored_ids_mismatch

from .config import RewardsArguments

SLOTS = ["chosen", "rejected"]


class EvalError(WspoError):
    """A problem with the user's input; the CLI prints it as one line."""


@dataclass
class ScoredResponse:
    prompt_ids: list[int]
    token_ids: list[int]  # response ids, end-of-turn included unless truncated
    truncated: bool
    ref_logps: np.ndarray | None = None  # from a shard column

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.token_ids


@dataclass
class Pair:
    example_id: str
    chosen: ScoredResponse
    rejected: ScoredResponse


# -- tokenizer ----------------------------------------------------------------------------------


def check_tokenizer(name: str, model_dir: Path, rule: ResponseTokenizer) -> None:
    """A model must share the rule's tokenizer (same ids mean the same text) and hold every id."""
    try:
        rule.check_model(model_dir)
    except ValueError as e:
        raise EvalError(f"{name}: {e}; policy and reference must score the same token ids") from None


def _rule(args: RewardsArguments, source: str, end_of_turn_token: str | None) -> ResponseTokenizer:
    return ResponseTokenizer(load_tokenizer(source), args.max_length, args.max_prompt_length, end_of_turn_token)


# -- pairs from a preference set ----------------------------------------------------------------


def pairs_from_dataset(args: RewardsArguments, rule: ResponseTokenizer) -> tuple[list[Pair], Counter, str]:
    rows = load_rows(args.dataset, args.dataset_split, args.max_samples)
    if not rows:
        raise EvalError(f"dataset {args.dataset} split {args.dataset_split} is empty")
    columns = sorted(set().union(*(r.keys() for r in rows[:100] if isinstance(r, dict))))
    no_rejected = ("rejected" not in columns if args.dataset_format != "columns"
                   else "rejected=" not in (args.column_map or "").replace(" ", ""))
    if no_rejected:
        raise EvalError(f"dataset {args.dataset} split {args.dataset_split} has no rejected responses (columns: "
                        f"{', '.join(columns)}); the reward task needs preference pairs (chosen and rejected)")
    layout = detect_format(rows) if args.dataset_format == "auto" else args.dataset_format
    pairs, skipped = [], Counter()
    for index, row in enumerate(rows):
        try:
            example = to_example(index, row, layout, SLOTS, args.column_map)
            sides = {slot: rule(*example.responses[slot]) for slot in SLOTS}
        except Skip as skip:
            skipped[skip.reason] += 1
            continue
        pairs.append(Pair(example.example_id, *(ScoredResponse(t.prompt_ids, t.token_ids, t.truncated) for t in sides.values())))
    return pairs, skipped, layout


# -- pairs from a shard set ---------------------------------------------------------------------


def _shard_response(row: dict, stored: list[int] | None, ref: np.ndarray | None, rule: ResponseTokenizer, root: Path) -> ScoredResponse:
    """A shard row under `rule`: its stored ids (checked against re-tokenizing) when the rule has
    the shards' fingerprint, else the rule's own tokenization of its text."""
    messages = json.loads(row["messages"])
    if stored is None:
        tok = rule(messages, row["response"])
        return ScoredResponse(tok.prompt_ids, tok.token_ids, tok.truncated)
    prompt = rule.prompt_ids(messages)
    if len(prompt) > rule.max_prompt_length:
        raise Skip("prompt_too_long")
    full, _, _ = rule.response_tokens(row["response"])
    if stored_ids_mismatch(stored, full, row["truncated"]) is not None:
        raise EvalError(f"row {row['id']} (example {row['example_id']}) of {root}: re-tokenizing its response does not give "
                        "the stored token_ids although the tokenizers share a fingerprint; the shard row or the tokenizer "
                        "files were altered")
    keep = min(len(stored), rule.max_length - len(prompt))
    return ScoredResponse(prompt, stored[:keep], bool(row["truncated"]) or keep < len(stored),
                          None if ref is None else ref[:keep].astype(np.float64))


def pairs_from_shards(args: RewardsArguments, policy_dir: Path) -> tuple[list[Pair], Counter, dict]:
    shard_set = ShardSet.open(args.shards).check()
    info = {"shards": str(args.shards), "fingerprint": shard_set.fingerprint}
    shard_tok = shard_set.tokenizer
    ref_column = None
    if args.reference_column:
        name = args.reference_column.removeprefix("logp_")
        ref_column = logp_column(name)
        scorer = next((s for s in shard_set.scorers if s["name"] == name), None)
        if scorer is None:
            raise EvalError(f"shard set {shard_set.root} has no column {ref_column} (scorers: {', '.join(shard_set.scorer_names)})")
        info["reference_scorer"] = {k: scorer.get(k) for k in ("name", "model", "fingerprint", "dtype", "backend")}

    # The shards' rule under the policy's tokenizer: same fingerprint -> stored ids are used.
    source = args.tokenizer or str(policy_dir)
    rule = shards_rule(load_tokenizer(source), shard_tok, args.max_length, args.max_prompt_length, args.end_of_turn_token)
    same = rule is not None
    if not same:
        if ref_column:
            raise EvalError(f"reference_column {ref_column}: the tokenization here ({source}, end-of-turn "
                            f"{args.end_of_turn_token or shard_tok['end_of_turn_token']!r}) differs from the shards' "
                            f"({shard_tok['name']}, end-of-turn {shard_tok['end_of_turn_token']!r}); stored log-probs are per "
                            "token of the shards' tokenization, so give the reference as a model instead")
        rule = _rule(args, source, args.end_of_turn_token)
    info["token_ids"] = "stored" if same else "re-tokenized"

    columns = ["id", "example_id", "slot", "messages", "response", "token_ids", "truncated"] + ([ref_column] if ref_column else [])
    table = shard_set.read_table(columns=columns, slots=SLOTS)
    slots = Counter(table["slot"].to_pylist())
    if not slots["rejected"]:
        present = Counter(shard_set.read_table(columns=["slot"])["slot"].to_pylist())
        raise EvalError(f"shard set {shard_set.root} has no rejected rows (slots: {', '.join(f'{k}={v}' for k, v in present.items()) or 'none'}); "
                        "score them with wspo-precompute --slots chosen,rejected")
    stored = list_arrays(table["token_ids"])
    refs = list_arrays(table[ref_column]) if ref_column else [None] * table.num_rows
    text = table.select(["id", "example_id", "slot", "messages", "response", "truncated"]).to_pylist()
    tuples, per_slot = rows_by_example(table, tuple(SLOTS))
    complete = per_slot.min(axis=1)  # pairs of each example, whose tuples follow one another

    pairs, skipped = [], Counter()
    for rows, n, end in zip(per_slot.tolist(), complete.tolist(), np.cumsum(complete).tolist()):
        if args.max_samples is not None and len(pairs) >= args.max_samples:
            break
        for slot, count in zip(SLOTS, rows):
            if count > n:
                skipped[f"unpaired_{slot}"] += count - n
        for kc, kr in tuples[end - n:end].tolist():
            try:
                sides = [_shard_response(text[k], stored[k].tolist() if same else None, refs[k], rule, shard_set.root)
                         for k in (kc, kr)]
            except Skip as skip:
                skipped[skip.reason] += 1
                continue
            pairs.append(Pair(text[kc]["example_id"], *sides))
    return pairs, skipped, {**info, "rule": rule}


# -- scoring and figures ------------------------------------------------------------------------


PROGRESS_ROWS = 64  # rows per scorer call in wspo-eval rewards (progress granularity)


def score_pairs(model_dir: Path, pairs: list[Pair], args: RewardsArguments, name: str) -> list[np.ndarray]:
    """Per-token log-probs of every response, [chosen 0, rejected 0, chosen 1, ...]; one model in memory."""
    responses = [r for p in pairs for r in (p.chosen, p.rejected)]
    scorer = HFScorer(model_dir, dtype=args.dtype, batch_tokens=args.batch_tokens)
    # Scored in slices of rows so a progress bar (rows/s, tokens/s) can follow; each slice is
    # batched by the scorer as a whole call would be.
    bar = tqdm(total=len(responses), unit="row", desc=f"scoring {name}", file=sys.stderr, disable=args.disable_tqdm)
    started, tokens, logps = time.perf_counter(), 0, []
    try:
        for start in range(0, len(responses), PROGRESS_ROWS):
            part = responses[start : start + PROGRESS_ROWS]
            logps += scorer.score([r.input_ids for r in part], [len(r.prompt_ids) for r in part])
            tokens += sum(len(r.input_ids) for r in part)
            bar.update(len(part))
            bar.set_postfix(tok_s=round(tokens / max(time.perf_counter() - started, 1e-9)))
    finally:
        bar.close()
        scorer.close()
    bad = [pairs[i // 2].example_id for i, lp in enumerate(logps) if not np.isfinite(lp).all()]
    if bad:
        raise EvalError(f"{name} ({model_dir}) gave NaN or infinite log-probs for example(s) {', '.join(sorted(set(bad))[:10])}; "
                        "check the weights and dtype (float16 overflows are common)")
    return logps


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _nll_per_token(logps: list[np.ndarray]) -> float:
    """-sum(log-probs) / number of tokens, over all the given responses together (float64)."""
    return float(-sum(np.sum(lp.astype(np.float64)) for lp in logps) / sum(len(lp) for lp in logps))


def figures(chosen: np.ndarray, rejected: np.ndarray) -> dict:
    """Accuracy (strict: ties are not wins), ties, margins and mean rewards of paired rewards."""
    margin = chosen - rejected
    return {
        "accuracy": _mean(margin > 0),
        "ties": int((margin == 0).sum()),
        "margin_mean": _mean(margin),
        "margin_std": float(np.std(margin)) if len(margin) else None,
        "chosen_reward_mean": _mean(chosen),
        "rejected_reward_mean": _mean(rejected),
    }


def run(args: RewardsArguments) -> tuple[dict, list[dict]]:
    """Evaluate; returns the summary and one record per pair."""
    started = time.perf_counter()
    policy_dir = resolve_model_dir(args.policy, option="policy")
    reference_dir = resolve_model_dir(args.reference, option="reference") if args.reference else None
    check_weights(policy_dir, option="policy")
    if reference_dir is not None:
        check_weights(reference_dir, option="reference")
    if args.shards is not None:
        pairs, skipped, info = pairs_from_shards(args, policy_dir)
        rule = info.pop("rule")
        source = info
    else:
        rule = _rule(args, args.tokenizer or str(policy_dir), args.end_of_turn_token)
        pairs, skipped, layout = pairs_from_dataset(args, rule)
        source = {"dataset": args.dataset, "split": args.dataset_split, "format": layout}
    if not pairs:
        where = args.shards if args.shards is not None else f"{args.dataset} split {args.dataset_split}"
        raise EvalError(f"no pairs to evaluate in {where} (skipped: {dict(skipped) or 'none'})")
    check_tokenizer("policy", policy_dir, rule)
    if reference_dir is not None:
        check_tokenizer("reference", reference_dir, rule)

    scoring_started = time.perf_counter()
    policy = score_pairs(policy_dir, pairs, args, "policy")
    if reference_dir is not None:
        reference = score_pairs(reference_dir, pairs, args, "reference")
    else:
        reference = [r.ref_logps for p in pairs for r in (p.chosen, p.rejected)]
    scoring_seconds = time.perf_counter() - scoring_started
    # Tokens through a model (prompt + response, every scored model), per second of scoring.
    scored_tokens = sum(len(r.input_ids) for p in pairs for r in (p.chosen, p.rejected)) * (2 if reference_dir else 1)
    # Summed in float64; log-probs are float32 per token.
    rewards = np.array([np.sum(lp.astype(np.float64) - ref.astype(np.float64)) for lp, ref in zip(policy, reference)])
    lengths = np.array([len(lp) for lp in policy])
    chosen, rejected = rewards[0::2], rewards[1::2]
    n_chosen, n_rejected = lengths[0::2], lengths[1::2]

    summary = {
        "task": "rewards",
        "policy": args.policy,
        "reference": args.reference if reference_dir is not None else {"column": logp_column(args.reference_column.removeprefix("logp_")),
                                                                      **source.pop("reference_scorer", {})},
        "source": source,
        "pairs": len(pairs),
        "skipped": dict(sorted(skipped.items())),
        "truncated_responses": int(sum(r.truncated for p in pairs for r in (p.chosen, p.rejected))),
        "response_tokens": {"chosen": int(n_chosen.sum()), "rejected": int(n_rejected.sum())},
        **figures(chosen, rejected),
        "per_token": figures(chosen / n_chosen, rejected / n_rejected),
        # Fluency on held-out text: mean negative log-likelihood per token of the chosen responses
        # (all chosen tokens pooled), under the policy and under the reference.
        "policy_nll_per_token": _nll_per_token(policy[0::2]),
        "reference_nll_per_token": _nll_per_token(reference[0::2]),
        "beta": args.beta,
        "scaled": {k: v * args.beta for k, v in figures(chosen, rejected).items() if k.endswith("_mean")},
        "policy_fingerprint": model_fingerprint(policy_dir),
        "reference_fingerprint": model_fingerprint(reference_dir) if reference_dir is not None else None,
        "dtype": str(resolve_dtype(args.dtype, default_device())).removeprefix("torch."),
        "tokenizer_fingerprint": rule.fingerprint,
        "scored_tokens_per_second": round(scored_tokens / max(scoring_seconds, 1e-9), 1),
        "seconds": round(time.perf_counter() - started, 3),
    }
    records = [
        {"example_id": p.example_id, "chosen_reward": float(c), "rejected_reward": float(r), "margin": float(c - r),
         "chosen_tokens": int(nc), "rejected_tokens": int(nr), "chosen_truncated": p.chosen.truncated,
         "rejected_truncated": p.rejected.truncated}
        for p, c, r, nc, nr in zip(pairs, chosen, rejected, n_chosen, n_rejected)
    ]
    return summary, records
