"""Shard format version 3 (versions 1 and 2 stay readable): the row schema (DESIGN section 4) and row identity."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

FORMAT_NAME = "wspo-shards"
FORMAT_VERSION = 3  # the newest version read. 2: parts under data/, a dataset card, manifest checksums; 3: top-k columns
# A set is written with the oldest version that describes it: 3 only when it carries top-k columns,
# so readers of version 2 keep reading sets without them.
PLAIN_FORMAT_VERSION = 2

SLOTS = ("chosen", "rejected", "chosen_source", "chosen_target")

# Column -> meaning; `wspo-shards info` and the README print this table.
COLUMNS = {
    "id": "sha256 of the canonical JSON of (messages, response): stable across runs",
    "example_id": "the source row's id (UltraFeedback prompt_id, else a hash of the row)",
    "slot": "chosen, rejected, chosen_source or chosen_target",
    "messages": "JSON list of {role, content}: the conversation before the response",
    "response": "the response text that was scored",
    "token_ids": "response token ids under the scoring tokenizer, end-of-turn included",
    "token_start": "character offset where each token starts in `response` (end-of-turn: len(response))",
    "token_end": "character offset where each token ends in `response` (end-of-turn: len(response))",
    "logp_<scorer>": "per-token log-prob under each scorer (WSPO: logp_weak_ref, logp_weak_aligned)",
    "reward": "logp_weak_aligned - logp_weak_ref per token, computed in float64 (WSPO shards only)",
    "reward_sum": "sum of reward (WSPO shards only)",
    "n_tokens": "number of response tokens",
    "truncated": "the response was cut to fit max_length",
    "topk_ids_<scorer>": "version 3, --topk K: the scorer's K most likely token ids at each response position (n_tokens x K; encoding in the manifest)",
    "topk_logp_<scorer>": "version 3, --topk K: their log-probs (n_tokens x K; compact: uint16 of -logp * 256, fp32: float32)",
}

_BASE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("example_id", pa.string(), nullable=False),
    pa.field("slot", pa.string(), nullable=False),
    pa.field("messages", pa.string(), nullable=False),
    pa.field("response", pa.string(), nullable=False),
    pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("token_start", pa.list_(pa.int32()), nullable=False),
    pa.field("token_end", pa.list_(pa.int32()), nullable=False),
]
_TAIL_FIELDS = [
    pa.field("n_tokens", pa.int32(), nullable=False),
    pa.field("truncated", pa.bool_(), nullable=False),
]
_REWARD_FIELDS = [
    pa.field("reward", pa.list_(pa.float32()), nullable=False),
    pa.field("reward_sum", pa.float64(), nullable=False),
]


def logp_column(scorer: str) -> str:
    return f"logp_{scorer}"


def has_reward(scorers: list[str]) -> bool:
    """WSPO shards: both weak scorers present, so the reward columns are written."""
    return "weak_ref" in scorers and "weak_aligned" in scorers


def row_schema(scorers: list[str], topk: dict | None = None) -> pa.Schema:
    """The Arrow schema of a shard file scored by `scorers` (in that order); `topk`: the manifest's
    top-k record (shards/topk.py), whose scorers' top-k columns follow the log-prob columns."""
    from .topk import topk_fields

    fields = list(_BASE_FIELDS)
    fields += [pa.field(logp_column(s), pa.list_(pa.float32()), nullable=False) for s in scorers]
    for scorer in (topk or {}).get("scorers", []):
        fields += topk_fields(scorer, topk["encoding"])
    if has_reward(scorers):
        fields += _REWARD_FIELDS
    fields += _TAIL_FIELDS
    return pa.schema(fields)


def byte_stream_split_columns(schema: pa.Schema) -> list[str]:
    """List columns written with byte-stream-split: float lists, and the top-k columns (id gaps and
    uint16 log-probs are small integers whose high bytes are nearly constant)."""
    from .topk import is_topk_column

    return [f.name for f in schema if pa.types.is_list(f.type)
            and (pa.types.is_floating(f.type.value_type) or is_topk_column(f.name))]


def list_arrays(column: pa.ChunkedArray | pa.Array) -> list:
    """A list<float|int> column as one numpy array per row (views, no Python floats)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    offsets = offsets - offsets[0]  # a sliced array's offsets index into its parent's values
    values = column.flatten().to_numpy(zero_copy_only=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def row_id(messages: list[dict], response: str) -> str:
    return hashlib.sha256(canonical_json([messages, response]).encode()).hexdigest()
