"""Shard rows -> training examples -> padded batches (DESIGN sections 3, 5, 7).

    open_shard_sets   open and verify every shard set; check they suit the loss
    strong_rule       the tokenization rule under the strong tokenizer; refuse a tokenizer that
                      differs from the shards' unless reward projection is allowed
    project_row       with another strong tokenizer: rewards summed over chunks (DESIGN section 5)
    token_example     one checked row cut to the training max_length (rewards too)
    reference_sets    the sets holding the strong reference's log-probs scored in phase one
                      (logp_strong_ref; logp_ref for DPO / WRPO), checked to come from the model
                      being trained and the same tokenizer
    is_eval_example   held-out evaluation rows, chosen by a hash of example_id
    Collator          pad (or pack) a list of examples; rewards and sequence indices flattened
                      in the order `response_logprobs` returns its log-probs

Training reads rows lazily from memory-mapped Arrow (rows.py, pairs.py) with these functions.
`load_examples`, `reference_logps` and `split_examples` do the same eagerly, every row at once:
the plain reference the lazy datasets are tested against (tests/test_train_scale.py).

Phase two reads nothing else: not the dataset, not the weak models.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from wspo.errors import WspoError
from wspo.logprobs import right_pad
from wspo.models import model_fingerprint
from wspo.shards.projection import EXCLUDED, chunk_rewards, chunk_tokens, roundtrip_ok
from wspo.shards.schema import has_reward, logp_column
from wspo.shards.storage import is_url
from wspo.shards.store import ShardSet, list_arrays
from wspo.shards.tokenization import ResponseTokenizer, Skip, shards_rule, stored_ids_mismatch

from .packing import pack_sequences

TRAIN_SLOTS = ["chosen"]  # WSPO and SFT learn from chosen responses only (DESIGN section 1)
REFERENCE_SCORER = "strong_ref"  # phase one's name for the strong SFT model (column logp_strong_ref)


class DataError(WspoError):
    """Shards that cannot be trained on as asked; the message says which rows or files and why."""


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


# -- shard sets ---------------------------------------------------------------------------------


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


# -- reference log-probs from shards ------------------------------------------------------------


def reference_logps(paths: list[str], train_sets: list[ShardSet], model_dir: Path, rule: ResponseTokenizer,
                    scorer_name: str = REFERENCE_SCORER, allow_other_weights: bool = False) -> tuple[dict[str, np.ndarray], list[ShardSet]]:
    """Row id -> logp_strong_ref, from shard sets scored in phase one with the strong SFT model
    (and those sets, for the run record). DPO and WRPO use it with scorer_name 'ref' (logp_ref).

    They stand in for the reference model only if they were scored with exactly the weights
    training starts from (the scorer fingerprint in the manifest; `allow_other_weights` lifts
    this check) and the same tokenizer.
    """
    sets = reference_sets(paths, train_sets, model_dir, rule, scorer_name, allow_other_weights)
    column = logp_column(scorer_name)
    logps = {}
    for shard_set in sets:
        table = shard_set.read_table(columns=["id", column])
        logps.update(zip(table["id"].to_pylist(), list_arrays(table[column])))
    return logps, sets


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


# -- rows -> examples ---------------------------------------------------------------------------


def checked_rows(shard_sets: list[ShardSet], rule: ResponseTokenizer, slots, counts: Counter, extra_columns=()):
    """The rows of `slots` of every set, each re-tokenized with the strong tokenizer and checked
    against its stored ids (`_check_retokenized`).

    Yields (shard set, row dict, prompt ids, stored response ids, {extra column: array}); counts
    the rows read per slot into `counts`. The same (messages, response) in two shard sets would
    be trained on twice, so it is an error; within one set it is the dataset's own duplicate.
    """
    columns = ["id", "example_id", "slot", "messages", "response", "token_ids", "truncated", *extra_columns]
    seen: dict[str, Path] = {}
    for shard_set in shard_sets:
        table = shard_set.read_table(columns=columns)
        for slot, n in Counter(table["slot"].to_pylist()).items():
            counts[f"rows_{slot}"] += n
        table = table.filter(pc.is_in(table["slot"], value_set=pa.array(list(slots))))
        arrays = {c: list_arrays(table[c]) for c in ("token_ids", *extra_columns)}
        for k, row in enumerate(table.select(["id", "example_id", "slot", "messages", "response", "truncated"]).to_pylist()):
            if seen.get(row["id"], shard_set.root) != shard_set.root:
                raise DataError(f"row {row['id']} (example {row['example_id']}) is in both {seen[row['id']]} and {shard_set.root}")
            seen[row["id"]] = shard_set.root
            stored = arrays["token_ids"][k].tolist()
            prompt = checked_prompt(row, stored, rule, counts, shard_set.root)
            if prompt is not None:
                yield shard_set, row, prompt, stored, {c: arrays[c][k] for c in extra_columns}


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


def load_examples(
    shard_sets: list[ShardSet], rule: ResponseTokenizer, with_rewards: bool, reference: dict[str, np.ndarray] | None = None,
    project: bool = False,
) -> tuple[list[Example], Counter]:
    """Chosen rows of every set, re-tokenized with the strong tokenizer and checked against the shards.

    `reference`: row id -> strong-reference log-probs (see `reference_logps`), attached to each row.
    `project`: the strong tokenizer differs; rewards are projected onto chunks (`project_row`).

    Returns the examples and counts: rows read per slot, rows skipped by reason, responses cut
    further than phase one cut them.
    """
    if project:
        if reference is not None:
            raise DataError("reference log-probs from shards are per token of the shards' tokenizer; with reward projection use --reference_logps model")
        columns = ["id", "example_id", "slot", "messages", "response", "token_ids", "truncated", "token_start", "token_end"]
        return _load_projected(shard_sets, rule, columns + (["reward"] if with_rewards else []))
    examples, counts = [], Counter()
    extra = ("reward",) if with_rewards else ()
    for shard_set, row, prompt, stored, arrays in checked_rows(shard_sets, rule, TRAIN_SLOTS, counts, extra):
        ref = None
        if reference is not None:
            ref = reference.get(row["id"])
            if ref is None:
                raise DataError(f"row {row['id']} (example {row['example_id']}) of {shard_set.root} has no logp_strong_ref in the reference shards")
        example = token_example(row, prompt, stored, arrays.get("reward"), ref, rule, counts, shard_set.root)
        if example is not None:
            example.index = len(examples)
            examples.append(example)
    return examples, counts


def token_example(row: dict, prompt: list[int], stored: list[int], reward: np.ndarray | None, ref: np.ndarray | None,
                  rule: ResponseTokenizer, counts: Counter, root: Path) -> Example | None:
    """One checked row (same tokenizer as the shards) cut to the training max_length; None (counted)
    when no response token fits."""
    if reward is not None and len(reward) != len(stored):
        raise DataError(f"row {row['id']} of {root}: {len(reward)} rewards for {len(stored)} tokens")
    # Phase one may have cut the response (truncated); a shorter training max_length cuts
    # it further, and the rewards of the cut tokens go with it.
    keep = min(len(stored), rule.max_length - len(prompt))
    if ref is not None:
        keep = min(keep, len(ref))  # scored under a shorter max_length: cut like a truncation
    if keep <= 0:
        counts["skipped_prompt_too_long"] += 1
        return None
    if keep < len(stored):
        counts["cut_to_max_length"] += 1
    return Example(
        index=0,
        row_id=row["id"],
        example_id=row["example_id"],
        input_ids=prompt + stored[:keep],
        prompt_length=len(prompt),
        rewards=None if reward is None else np.asarray(reward[:keep], dtype=np.float32),
        ref_logps=None if ref is None else np.asarray(ref[:keep], dtype=np.float32),
    )


def _load_projected(shard_sets: list[ShardSet], rule: ResponseTokenizer, columns: list[str]) -> tuple[list[Example], Counter]:
    """Chosen rows re-tokenized with a different strong tokenizer, rewards summed per chunk."""
    examples, counts = [], Counter()
    for shard_set in shard_sets:
        # Identical vocabularies (a forced projection, as in the exactness test) may use token ids
        # as pieces: then every chunk is one token of each side.
        same_vocab = rule.matches(shard_set.tokenizer)
        table = shard_set.read_table(columns=columns)
        for slot, n in Counter(table["slot"].to_pylist()).items():
            counts[f"rows_{slot}"] += n
        table = table.filter(pc.is_in(table["slot"], value_set=pa.array(TRAIN_SLOTS)))
        weak = {c: list_arrays(table[c]) for c in ("token_ids", "token_start", "token_end", "reward") if c in columns}
        for k, row in enumerate(table.select(["id", "example_id", "messages", "response", "truncated"]).to_pylist()):
            example = project_row(row, rule, {c: v[k] for c, v in weak.items()}, same_vocab, counts)
            if example is not None:
                example.index = len(examples)
                examples.append(example)
    return examples, counts


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
    keep = min(len(ids), rule.max_length - len(prompt))
    if keep <= 0:
        counts["skipped_prompt_too_long"] += 1
        return None
    if keep < len(ids):
        counts["cut_to_max_length"] += 1
    if "reward" not in weak:  # sft: the strong ids are all it needs
        return Example(index=0, row_id=row["id"], example_id=row["example_id"], input_ids=prompt + ids[:keep],
                       prompt_length=len(prompt), rewards=None)
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
    return Example(
        index=0,
        row_id=row["id"],
        example_id=row["example_id"],
        input_ids=prompt + ids[:included],
        prompt_length=len(prompt),
        rewards=chunk_rewards(chunking, weak["reward"]).astype(np.float32),
        token_segments=chunking.strong_chunk[:included].astype(np.int64),
    )


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


# -- held-out split -----------------------------------------------------------------------------


def is_eval_example(example_id: str, eval_fraction: float) -> bool:
    """A stable pseudo-random choice per example: every response of one example lands on one side."""
    bucket = int(hashlib.sha256(example_id.encode()).hexdigest()[:8], 16) / 2**32
    return bucket < eval_fraction


def split_examples(examples: list[Example], eval_fraction: float) -> tuple[list[Example], list[Example]]:
    train, held_out = [], []
    for example in examples:
        (held_out if is_eval_example(example.example_id, eval_fraction) else train).append(example)
    for side in (train, held_out):
        for i, example in enumerate(side):
            example.index = i
    return train, held_out


# -- batches ------------------------------------------------------------------------------------


def sequence_batch(sequences: list[list[int]], prompt_lengths: list[int], pad_token_id: int,
                   packing_max_length: int | None = None, packing_row_length: int | None = None,
                   ) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The model inputs of a list of sequences, and the order (sequence indices) in which their
    response positions come, row-major: right-padded rows (input_ids, attention_mask,
    target_mask; in order), or with `packing_max_length` packed rows (input_ids, position_ids,
    target_mask; see packing.py)."""
    if packing_max_length is None:
        input_ids, attention_mask, target_mask = right_pad(sequences, prompt_lengths, pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}, list(range(len(sequences)))
    input_ids, position_ids, target_mask, order = pack_sequences(sequences, prompt_lengths, packing_max_length, pad_token_id,
                                                               packing_row_length)
    return {"input_ids": input_ids, "position_ids": position_ids, "target_mask": target_mask}, order


def token_order_ids(order: list[int], n_response: list[int]) -> torch.Tensor:
    """The sequence of each response position, positions in `order` (sequence_batch)."""
    return torch.repeat_interleave(torch.tensor(order), torch.tensor([n_response[i] for i in order]))


class Collator:
    """Right-pads a list of examples into one batch (or packs them: `packing_max_length`).

    input_ids, attention_mask, target_mask: [batch, length]; target_mask marks response tokens.
    Packed: input_ids, position_ids, target_mask [packed rows, length], no attention_mask.
    rewards, seq_ids (and ref_logps): [response tokens of the batch], row-major (row 0 first), the order in which
    `response_logprobs` returns log-probs (packed: the packing's order of sequences; seq_ids keeps naming
    each token's sequence by its place in `examples`). row_index: [batch] dataset positions (for logs/tests).
    """

    def __init__(self, pad_token_id: int, packing_max_length: int | None = None, packing_row_length: int | None = None):
        self.pad_token_id = pad_token_id
        self.packing_max_length = packing_max_length
        self.packing_row_length = packing_row_length

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        batch, order = sequence_batch([e.input_ids for e in examples], [e.prompt_length for e in examples],
                                      self.pad_token_id, self.packing_max_length,
                                      self.packing_row_length)
        # Per-token values follow the order of the response positions (packing reorders sequences).
        in_order = [examples[i] for i in order]
        batch["seq_ids"] = token_order_ids(order, [len(e.input_ids) - e.prompt_length for e in examples])
        batch["row_index"] = torch.tensor([e.index for e in examples])
        if examples[0].token_segments is not None:
            # Projection: one reward per chunk, chunks numbered over the batch in sequence order;
            # token_segments: the chunk of each token (token order); segment_seq_ids: the sequence of each chunk.
            n_chunks = [len(e.rewards) for e in examples]
            offsets = np.cumsum([0] + n_chunks[:-1])
            batch["rewards"] = torch.from_numpy(np.concatenate([e.rewards for e in examples]))
            batch["token_segments"] = torch.from_numpy(np.concatenate([examples[i].token_segments + offsets[i] for i in order]))
            batch["segment_seq_ids"] = torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(n_chunks))
        elif examples[0].rewards is not None:
            batch["rewards"] = torch.from_numpy(np.concatenate([e.rewards for e in in_order]))
        if examples[0].ref_logps is not None:
            batch["ref_logps"] = torch.from_numpy(np.concatenate([e.ref_logps for e in in_order]))
        if examples[0].topk_ids is not None:  # kd: [response tokens, K], in token order
            batch["topk_ids"] = torch.from_numpy(np.concatenate([e.topk_ids for e in in_order]))
            batch["teacher_topk_logps"] = torch.from_numpy(np.concatenate([e.topk_logps for e in in_order]))
        return batch


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

