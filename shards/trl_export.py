"""Shard sets that TRL's DPOTrainer trains on (docs/shard-format.md "Training with TRL").

`to_trl_dpo(shards)` pairs the `chosen` and `rejected` rows of each example and gives TRL's
conversational preference layout (`prompt`, `chosen`, `rejected` as message lists) with the
reference log-prob sum of each response in `ref_chosen_logps` and `ref_rejected_logps`, the
columns TRL reads for a precomputed reference. Target: TRL 1.16.0 (the `test` extra pins it).

How TRL 1.16 uses those columns (trl/trainer/dpo_trainer.py): with
`DPOConfig(precompute_ref_log_probs=True)` and no `ref_model`, no reference model is created;
`DataCollatorForPreference` stacks the two columns into the batch and `_compute_loss` subtracts
them from the policy's summed completion log-probs. But `DPOTrainer.__init__` also calls
`_precompute_ref_logps`, which always runs the model over the whole set to fill those columns
(and then fails on the duplicate names). `DPOTrainerFromShards` overrides that one method to
keep the columns a dataset already has, so the reference model never runs.

The sums are only right if TRL scores the same tokens the shards did. TRL tokenizes the text
itself: the prompt with the chat template and generation prompt, and the prompt plus the response
rendered by the template, the completion starting where the two diverge; the collator then cuts
prompt + completion at `DPOConfig.max_length` (1024 by default). So every pair is tokenized here
with TRL's own functions and compared with the shards' rule (prompt ids, then response ids with
the end-of-turn token); a difference (text the template adds after the end-of-turn token, tokens
merging across the prompt/response boundary, a response the shards cut at their max_length, a
sequence longer than TRL's max_length) refuses the export, naming the row and what differs.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

import numpy as np

from .schema import list_arrays
from .storage import ShardError
from .tokenization import shards_rule

if TYPE_CHECKING:  # ShardSet.to_trl_dpo calls this module, so it is imported here only for the annotations
    from .store import ShardSet

TRL_VERSION = "1.16.0"
REFERENCE_COLUMN = "logp_ref"  # wspo-precompute --ref_model
PAIR_SLOTS = ("chosen", "rejected")
TRL_DEFAULT_MAX_LENGTH = 1024  # DPOConfig.max_length in TRL 1.16


def _trl_tokenize():
    """TRL's own tokenization helpers (what DPOTrainer._prepare_dataset runs)."""
    try:
        import trl
        from trl.data_utils import _tokenize, common_prefix_length
    except ImportError:
        raise ShardError(f"the trl-dpo export needs TRL: pip install trl=={TRL_VERSION}") from None
    if trl.__version__ != TRL_VERSION:
        raise ShardError(f"the trl-dpo export is checked against TRL {TRL_VERSION}, found {trl.__version__}: "
                         f"pip install trl=={TRL_VERSION}")
    return _tokenize, common_prefix_length


def _token_text(tokenizer, ids) -> str:
    return repr(tokenizer.decode(list(ids)))


def _difference(tokenizer, trl_prompt, trl_completion, prompt, response) -> str | None:
    """What TRL would score differently from the shards' rule, in words; None when identical."""
    if trl_prompt != prompt:
        return (f"TRL's prompt has {len(trl_prompt)} tokens, the shards' {len(prompt)} (the chat template renders the "
                "prompt differently alone and followed by a response, or tokens merge across the boundary)")
    if trl_completion == response:
        return None
    n = len(response)
    if trl_completion[:n] == response:
        extra = trl_completion[n:]
        return (f"TRL's completion has {len(extra)} token(s) after the end-of-turn token that the shards did not score "
                f"({_token_text(tokenizer, extra)}: text the chat template writes after an assistant turn)")
    first = next((i for i, (a, b) in enumerate(zip(trl_completion, response)) if a != b), min(len(trl_completion), n))
    return (f"TRL's completion ({len(trl_completion)} tokens) differs from the shards' ({n} tokens) from token {first}: "
            f"TRL {_token_text(tokenizer, trl_completion[first:first + 3])}, shards {_token_text(tokenizer, response[first:first + 3])}")


def to_trl_dpo(shards: ShardSet, tokenizer=None, max_length: int | None = TRL_DEFAULT_MAX_LENGTH):
    """The set's (chosen, rejected) pairs as a `datasets.Dataset` for TRL 1.16's DPOTrainer.

    `tokenizer`: the tokenizer TRL will be given (a folder, a hub name or a loaded tokenizer;
    default: the shards' own, from the manifest); it must have the shards' fingerprint.
    `max_length`: the `DPOConfig.max_length` TRL will run with (None: no truncation); a pair
    whose prompt + response is longer is refused, since TRL would cut it.
    Raises ShardError naming the row and what differs when TRL would score other tokens.
    """
    from datasets import Dataset

    from wspo.models import load_tokenizer

    _tokenize, common_prefix_length = _trl_tokenize()
    if REFERENCE_COLUMN not in [f"logp_{name}" for name in shards.scorer_names]:
        raise ShardError(f"{shards.root}: no {REFERENCE_COLUMN} column (scorers: {', '.join(shards.scorer_names)}); "
                         "the trl-dpo export needs the reference's log-probs: wspo-precompute --ref_model MODEL "
                         "--slots chosen,rejected")
    record = shards.tokenizer
    if tokenizer is None or isinstance(tokenizer, str) or hasattr(tokenizer, "__fspath__"):
        tokenizer = load_tokenizer(tokenizer or record["name"])
    rule = shards_rule(tokenizer, record, record["max_length"], record["max_prompt_length"])
    if rule is None:
        raise ShardError(f"{shards.root}: the tokenizer {tokenizer.name_or_path!r} is not the one the shards were "
                         "scored with (fingerprints differ); give the shards' tokenizer")
    if rule.uses_fallback_template:
        raise ShardError(f"{shards.root}: the shards were tokenized with wspo's fallback chat template (the tokenizer has "
                         "none), which TRL does not apply: set the tokenizer's chat_template before scoring")

    table = shards.read_table(columns=["example_id", "slot", "messages", "response", "token_ids", "truncated",
                                       REFERENCE_COLUMN], slots=list(PAIR_SLOTS))
    sums = [float(a.astype(np.float64).sum()) for a in list_arrays(table[REFERENCE_COLUMN])]
    rows: dict[str, dict] = {}
    for i, (example_id, slot) in enumerate(zip(table["example_id"].to_pylist(), table["slot"].to_pylist())):
        rows.setdefault(example_id, {})[slot] = i
    pairs = [(example_id, slots) for example_id, slots in rows.items() if len(slots) == len(PAIR_SLOTS)]
    if not pairs:
        raise ShardError(f"{shards.root}: no example has both a chosen and a rejected row "
                         "(wspo-precompute --slots chosen,rejected)")

    messages_of, responses = table["messages"].to_pylist(), table["response"].to_pylist()
    token_ids, truncated = table["token_ids"].to_pylist(), table["truncated"].to_pylist()
    out = {"example_id": [], "prompt": [], "chosen": [], "rejected": [], "ref_chosen_logps": [], "ref_rejected_logps": []}
    for example_id, slots in pairs:
        messages = json.loads(messages_of[slots["chosen"]])
        turns = {slot: [{"role": "assistant", "content": responses[slots[slot]]}] for slot in PAIR_SLOTS}
        trl_prompt = _tokenize(tokenizer, messages, add_generation_prompt=True)["input_ids"]
        full = {slot: _tokenize(tokenizer, messages + turns[slot])["input_ids"] for slot in PAIR_SLOTS}
        split = min(common_prefix_length(trl_prompt, ids) for ids in full.values())
        prompt = rule.prompt_ids(messages)
        for slot in PAIR_SLOTS:
            i = slots[slot]
            where = f"{shards.root}: example {example_id} ({slot})"
            if truncated[i]:
                raise ShardError(f"{where}: the shards cut this response at their max_length {record['max_length']} "
                                 "(truncated) but TRL scores the whole text; rescore with a larger --max_length")
            problem = _difference(tokenizer, trl_prompt[:split], full[slot][split:], prompt, token_ids[i])
            if problem:
                raise ShardError(f"{where}: TRL {TRL_VERSION} would score other tokens than the shards did, so the "
                                 f"reference sums would not match: {problem}. Refusing the export.")
            if max_length is not None and len(full[slot]) > max_length:
                raise ShardError(f"{where}: prompt + response is {len(full[slot])} tokens, more than TRL's max_length "
                                 f"{max_length}, which would cut it; export with the max_length you give DPOConfig "
                                 "(None for no truncation)")
        out["example_id"].append(example_id)
        out["prompt"].append(messages)
        out["chosen"].append(turns["chosen"])
        out["rejected"].append(turns["rejected"])
        out["ref_chosen_logps"].append(sums[slots["chosen"]])
        out["ref_rejected_logps"].append(sums[slots["rejected"]])
    return Dataset.from_dict(out)


@functools.cache
def _trainer_class():
    """Defined on first use, so importing this module does not import TRL."""
    from trl import DPOTrainer

    class DPOTrainerFromShards(DPOTrainer):
        """TRL 1.16's `DPOTrainer`, reading the reference sums from a dataset's `ref_chosen_logps`
        and `ref_rejected_logps` columns (from `to_trl_dpo`) instead of computing them; use it with
        `DPOConfig(precompute_ref_log_probs=True)` and no `ref_model`. Same arguments as DPOTrainer."""

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names):
                return dataset  # the shards' reference sums: the reference model never runs
            return super()._precompute_ref_logps(dataset, name, batch_size)

    return DPOTrainerFromShards


def __getattr__(name: str):
    if name == "DPOTrainerFromShards":
        return _trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
