"""Shard sets for training: opened, verified and checked for the run (DESIGN sections 3, 5, 7).

    open_shard_sets   open and verify every shard set; check they suit the loss
    strong_rule       the tokenization rule under the strong tokenizer; refuse a tokenizer that
                      differs from the shards' unless reward projection is allowed
    reference_sets    the sets holding the strong reference's log-probs scored in phase one
                      (logp_strong_ref; logp_ref for DPO / WRPO), checked to come from the model
                      being trained and the same tokenizer
    describe_shards   what the run record (wspo_run.json) says of each set

Phase two reads nothing else: not the dataset, not the weak models.
"""

from __future__ import annotations

from pathlib import Path

from wspo.errors import WspoError
from wspo.models import model_fingerprint
from wspo.shards.schema import has_reward, logp_column
from wspo.shards.storage import is_url
from wspo.shards.store import ShardSet
from wspo.shards.tokenization import ResponseTokenizer, shards_rule

REFERENCE_SCORER = "strong_ref"  # phase one's name for the strong SFT model (column logp_strong_ref)


class DataError(WspoError):
    """Shards that cannot be trained on as asked; the message says which rows or files and why."""


def opened_set(path: str) -> ShardSet:
    """A shard set, opened and verified: the sha256 of every file of a local set; the sizes and
    row counts of a set on an object store (a URL), whose files the row cache checksums as it
    copies them, once per node (row_cache.py): every rank hashing them here would download the
    whole set once more."""
    shard_set = ShardSet.open(path)
    return shard_set.check(checksums=not is_url(shard_set.root))


def open_shard_sets(paths: list[str], loss: str) -> list[ShardSet]:
    """Open and verify every shard set (`opened_set`), and check it suits `loss`."""
    resolved = [Path(path).resolve() for path in paths]
    repeated = sorted({str(r) for r in resolved if resolved.count(r) > 1})
    if repeated:
        raise DataError(f"shards: {', '.join(repeated)} given more than once (its rows would be trained on twice)")
    sets = [opened_set(path) for path in paths]
    for shard_set in sets:
        if loss == "wspo" and not has_reward(shard_set.scorer_names):
            raise DataError(
                f"shard set {shard_set.root} has no `reward` column (scored with: "
                f"{', '.join(shard_set.scorer_names) or 'nothing'}); loss wspo needs shards scored with both "
                "weak_ref and weak_aligned. Rescore, or use --loss sft."
            )
    # Sets written under one fingerprint definition compare their fingerprints; across definitions
    # what does not depend on it (and strong_rule checks each against the strong tokenizer).
    by_version = {}
    for s in sets:
        by_version.setdefault(s.tokenizer.get("fingerprint_version", 1), set()).add(s.tokenizer["fingerprint"])
    plain = {tuple(s.tokenizer.get(k) for k in _DEFINITION_FREE) for s in sets}
    if any(len(fingerprints) > 1 for fingerprints in by_version.values()) or len(plain) > 1:
        raise DataError(f"the shard sets {', '.join(paths)} were tokenized with different tokenizers; train on one kind at a time")
    return sets


# What a manifest's tokenizer record says independently of the fingerprint definition.
_DEFINITION_FREE = ("vocab_size", "chat_template_hash", "end_of_turn_token", "end_of_turn_id", "rule_version")


def strong_rule(shard_sets: list[ShardSet], tokenizer, max_length: int, reward_projection: str,
                distill: bool = False) -> tuple[ResponseTokenizer, bool]:
    """The shared tokenization rule under the strong tokenizer, and whether rewards are projected.

    Same fingerprint as the shards': rewards are used token for token, with the shards'
    end-of-turn token. Otherwise, with `reward_projection chunks`, the strong tokenizer applies
    the rule with its own end-of-turn token and rewards are projected onto chunks; without it,
    an error that says how to allow it. The prompt bound is max_length - 1: a prompt that leaves
    no room for one response token cannot be trained on. `distill` (loss kd): another tokenizer is
    refused outright, since the stored top-k ids are the teacher's vocabulary.
    """
    shard_tok = shard_sets[0].tokenizer
    rule = shards_rule(tokenizer, shard_tok, max_length, max_length - 1)
    matching = [s.root for s in shard_sets if rule is not None and rule.matches(s.tokenizer)]
    if len(matching) == len(shard_sets):
        return rule, False
    if matching:
        raise DataError(
            f"the shard sets {', '.join(str(s.root) for s in shard_sets)} were tokenized with different "
            "tokenizers; train on one kind at a time"
        )
    if distill:
        raise DataError(
            f"loss kd: the student's tokenizer ({tokenizer.name_or_path}) differs from the tokenizer the shards were "
            f"scored with ({shard_tok['name']}, fingerprint {shard_tok['fingerprint'][:12]}); the stored top-k ids are "
            "the teacher's vocabulary, so the student must use the same tokenizer (cross-tokenizer distillation is "
            "not supported)"
        )
    if reward_projection == "chunks":
        return ResponseTokenizer(tokenizer, max_length, max_length - 1), True
    raise DataError(
        f"the strong model's tokenizer ({tokenizer.name_or_path}) differs from the tokenizer the shards were "
        f"scored with ({shard_tok['name']}, fingerprint {shard_tok['fingerprint'][:12]}); rewards are per token "
        "of the shards' tokenizer. Use a strong model with the same tokenizer, or allow projecting the rewards "
        "onto chunks with --reward_projection chunks (see `wspo-shards project --tokenizer` for how lossy it is)."
    )


def reference_sets(paths: list[str], train_sets: list[ShardSet], model_dir: Path, rule: ResponseTokenizer,
                   scorer_name: str = REFERENCE_SCORER, allow_other_weights: bool = False) -> list[ShardSet]:
    """The reference shard sets, opened and checked as `reference_logps` describes (nothing read).
    `rule`: the training sets' rule under the strong tokenizer (their tokenizer, not projected)."""
    by_root = {str(s.root): s for s in train_sets}
    sets = [by_root.get(str(Path(path))) or opened_set(path) for path in paths]
    weights = None if allow_other_weights else model_fingerprint(model_dir)
    column = logp_column(scorer_name)
    for shard_set in sets:
        scorer = next((sc for sc in shard_set.scorers if sc["name"] == scorer_name), None)
        if scorer is None:
            hint = (
                "score the strong SFT model in phase one (wspo-precompute --strong_ref MODEL), or use --reference_logps model"
                if scorer_name == REFERENCE_SCORER
                else "score the reference (the model training starts from) in phase one: wspo-precompute --ref_model MODEL"
            )
            raise DataError(
                f"shard set {shard_set.root} has no {column} column (scored with: {', '.join(shard_set.scorer_names)}); {hint}"
            )
        if weights is not None and scorer["fingerprint"] != weights:
            hint = "" if scorer_name == REFERENCE_SCORER else " (to train against another reference: --allow_reference_mismatch true)"
            raise DataError(
                f"{column} of {shard_set.root} was scored with {scorer['model']}, whose weights differ from "
                f"model_name_or_path ({model_dir}); the reference must be the model training starts from{hint}"
            )
        if not rule.matches(shard_set.tokenizer):
            raise DataError(f"shard set {shard_set.root} was tokenized differently from the training shards")
    return sets


def describe_shards(shard_sets: list[ShardSet]) -> list[dict]:
    """What wspo_run.json records of each shard set."""
    return [
        {
            "path": str(s.root),
            "fingerprint": s.fingerprint,
            "tokenizer_fingerprint": s.tokenizer["fingerprint"],
            "scorers": [{k: sc[k] for k in ("name", "model", "fingerprint")} for sc in s.scorers],
            "rows": s.num_rows,
            "tokens": s.num_tokens,
        }
        for s in shard_sets
    ]

