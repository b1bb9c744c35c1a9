"""Reward projection across tokenizers (DESIGN section 5): cut two tokenizations into chunks.

The shard (weak) tokenization and the strong model's tokenization of one response are both given
as token character spans, the way shards store them: `starts[i]`, `ends[i]` are offsets into the
response; byte-level pieces of one character share that character's span; the end-of-turn token
is last, with span (len, len), unless the row was truncated.

The rule, in order:

1. A *cut* is a character position p where no token of either side crosses: a token crosses p
   iff start < p < end. Cuts split the text into raw chunks; a token belongs to the raw chunk that
   holds its start. Pieces sharing a span cross nothing between them, so they always share a chunk.
2. Truncation. A side without its end-of-turn token was cut to fit `max_length`; its last token may
   be the first piece of a character whose other pieces were cut off, so that side is usable only
   up to the start of its last token. The usable text is the common prefix of both sides, moved
   back to the nearest cut; tokens beyond it get chunk index -1 (excluded), and so does the
   end-of-turn token of a side whose partner has none.
3. Gaps. A character covered by no token of a side (whitespace dropped by WordPiece, an accent a
   normaliser strips) needs nothing special: it lies inside some chunk and carries no log-prob on
   that side, just as that side's model never scored it.
4. Every chunk must hold at least one token of EACH side, or its loss term compares a sum with
   nothing. Walking left to right, raw chunks are merged until both sides are present; a stretch
   with tokens of one side only therefore joins the next chunk, and a leftover at the end of the
   text joins the previous one. If a side has no usable text token at all, the other side's text
   tokens join the end-of-turn chunk (or are excluded when there is none).
5. Optional refinement, `weak_pieces`/`strong_pieces`: values that identify each token's bytes
   (token ids when both sides use ONE vocabulary, or the tokens' bytes). A chunk whose tokens are
   identical on both sides, piece for piece, is split into one chunk per token: identical pieces
   have identical byte boundaries. With the same tokenizer on both sides this makes every chunk
   exactly one token of each side, so the chunk loss is the token loss term for term.
6. The end-of-turn tokens of both sides form the last chunk (when both sides have one).

Sums are conserved: a row's chunk rewards add up to the sum of its included token rewards, which
is `reward_sum` when nothing is excluded (no truncation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wspo.errors import InputError

EXCLUDED = -1  # chunk index of a token outside the usable text (truncation)


@dataclass
class Chunking:
    """The chunks of one response: chunk index per token (EXCLUDED = -1) and per-chunk spans."""

    weak_chunk: np.ndarray  # int64, one per weak token, non-decreasing over included tokens
    strong_chunk: np.ndarray  # int64, one per strong token
    num_chunks: int
    chunk_start: np.ndarray  # int64 per chunk: smallest start of its tokens (both sides)
    chunk_end: np.ndarray  # int64 per chunk: largest end of its tokens (both sides)
    has_end_of_turn_chunk: bool  # the last chunk is the two end-of-turn tokens

    def weak_counts(self) -> np.ndarray:
        """Weak tokens per chunk."""
        return np.bincount(self.weak_chunk[self.weak_chunk >= 0], minlength=self.num_chunks)

    def strong_counts(self) -> np.ndarray:
        """Strong tokens per chunk."""
        return np.bincount(self.strong_chunk[self.strong_chunk >= 0], minlength=self.num_chunks)


def chunk_sums(token_chunk, token_values, num_chunks: int) -> np.ndarray:
    """Sum per-token values (weak rewards) into their chunks, in float64; excluded tokens drop out."""
    token_chunk = np.asarray(token_chunk, dtype=np.int64)
    token_values = np.asarray(token_values, dtype=np.float64)
    if token_chunk.shape != token_values.shape:
        raise InputError(f"{token_chunk.shape[0]} chunk indices but {token_values.shape[0]} token values")
    included = token_chunk >= 0
    sums = np.bincount(token_chunk[included], weights=token_values[included], minlength=num_chunks)
    return sums.astype(np.float64)  # bincount of nothing is int64, even with weights


def chunk_rewards(chunking: Chunking, weak_rewards) -> np.ndarray:
    """Each chunk's weak reward: the sum of its weak tokens' rewards (float64)."""
    return chunk_sums(chunking.weak_chunk, weak_rewards, chunking.num_chunks)


# -- validation ---------------------------------------------------------------------------------


def _spans(name: str, starts, ends, text_length: int, has_end_of_turn: bool) -> tuple[np.ndarray, np.ndarray]:
    """The spans as int64 arrays, or a ValueError that says what is wrong with them."""
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    ends = np.asarray(ends, dtype=np.int64).reshape(-1)
    if starts.shape != ends.shape:
        raise InputError(f"{name}: {starts.size} starts but {ends.size} ends")
    bad = np.flatnonzero((starts < 0) | (ends < starts) | (ends > text_length))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{name}: token {i} has span ({starts[i]}, {ends[i]}), "
                         f"not 0 <= start <= end <= len(response) = {text_length}")
    for what, values in (("starts", starts), ("ends", ends)):
        down = np.flatnonzero(np.diff(values) < 0)
        if down.size:
            i = int(down[0]) + 1
            raise InputError(f"{name}: {what} decrease at token {i} ({values[i - 1]} -> {values[i]}); "
                             "spans must be in text order")
    if has_end_of_turn:
        if starts.size == 0 or starts[-1] != text_length or ends[-1] != text_length:
            last = (int(starts[-1]), int(ends[-1])) if starts.size else None
            raise InputError(f"{name}: says it ends with its end-of-turn token, but the last span is {last}, "
                             f"not ({text_length}, {text_length})")
    return starts, ends


# -- the rule -----------------------------------------------------------------------------------


def _usable_end(starts: np.ndarray, num_text_tokens: int, text_length: int, has_end_of_turn: bool) -> int:
    """Where a side's trustworthy coverage of the text ends (rule 2)."""
    if has_end_of_turn:
        return text_length
    if num_text_tokens == 0:
        return 0
    return int(starts[num_text_tokens - 1])


def _crossed(text_length: int, spans: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """crossed[p] for p in 0..text_length: some token has start < p < end."""
    opened = np.zeros(text_length + 2, dtype=np.int64)
    for starts, ends in spans:
        wide = ends - starts >= 2
        np.add.at(opened, starts[wide] + 1, 1)  # crossing begins just after the start...
        np.add.at(opened, ends[wide], -1)  # ...and stops at the end
    return np.cumsum(opened)[: text_length + 1] > 0


def _included(starts: np.ndarray, ends: np.ndarray, num_text_tokens: int, usable: int, text_length: int) -> np.ndarray:
    """Text tokens inside [0, usable). A zero-width token at `usable` counts only at the text's end."""
    index = np.arange(starts.size)
    inside = (ends <= usable) & ((starts < usable) | (usable == text_length))
    return (index < num_text_tokens) & inside


def chunk_tokens(
    text_length: int,
    weak_starts,
    weak_ends,
    strong_starts,
    strong_ends,
    *,
    weak_has_end_of_turn: bool,
    strong_has_end_of_turn: bool,
    weak_pieces=None,
    strong_pieces=None,
) -> Chunking:
    """Cut a response's weak and strong tokenizations into chunks (module docstring: the rule).

    `*_has_end_of_turn`: that side's last token is its end-of-turn token (span (len, len));
    False for a truncated row. `*_pieces`: optional, see rule 5 (both or neither).
    Raises ValueError for spans that are not in text order or fall outside the response.
    """
    if (weak_pieces is None) != (strong_pieces is None):
        raise InputError("give weak_pieces and strong_pieces together, or neither")
    weak_starts, weak_ends = _spans("weak spans", weak_starts, weak_ends, text_length, weak_has_end_of_turn)
    strong_starts, strong_ends = _spans("strong spans", strong_starts, strong_ends, text_length, strong_has_end_of_turn)
    weak_text = weak_starts.size - int(weak_has_end_of_turn)  # number of text tokens
    strong_text = strong_starts.size - int(strong_has_end_of_turn)

    # Rule 1: cut positions. Rule 2: the usable text ends at a cut no later than both sides' ends.
    crossed = _crossed(text_length, [(weak_starts[:weak_text], weak_ends[:weak_text]),
                                     (strong_starts[:strong_text], strong_ends[:strong_text])])
    usable = min(_usable_end(weak_starts, weak_text, text_length, weak_has_end_of_turn),
                 _usable_end(strong_starts, strong_text, text_length, strong_has_end_of_turn))
    while crossed[usable]:
        usable -= 1
    cuts = np.flatnonzero(~crossed[:usable])  # start of each raw chunk; raw chunk r is [cuts[r], cuts[r+1])

    weak_in = _included(weak_starts, weak_ends, weak_text, usable, text_length)
    strong_in = _included(strong_starts, strong_ends, strong_text, usable, text_length)
    # Raw chunk of a token: the one holding its start (a zero-width token at the text's end: the
    # last one). Only included tokens' raw chunks are used.
    weak_raw = np.clip(np.searchsorted(cuts, weak_starts, side="right") - 1, 0, None)
    strong_raw = np.clip(np.searchsorted(cuts, strong_starts, side="right") - 1, 0, None)
    weak_raw_count = np.bincount(weak_raw[weak_in], minlength=cuts.size)
    strong_raw_count = np.bincount(strong_raw[strong_in], minlength=cuts.size)

    # Rule 4: merge raw chunks left to right until both sides are present.
    merged = np.empty(cuts.size, dtype=np.int64)  # raw chunk -> merged chunk
    num_merged = 0
    weak_seen = strong_seen = 0
    for r in range(cuts.size):
        merged[r] = num_merged
        weak_seen += weak_raw_count[r]
        strong_seen += strong_raw_count[r]
        if weak_seen and strong_seen:  # this chunk is complete: the next raw chunk opens a new one
            num_merged += 1
            weak_seen = strong_seen = 0
    leftover = merged == num_merged  # raw chunks after the last complete chunk
    if num_merged > 0:
        merged[leftover] = num_merged - 1  # the end of the text joins the previous chunk

    both_end_of_turn = weak_has_end_of_turn and strong_has_end_of_turn
    # Text tokens with no complete chunk to join (one side has no usable text token at all) go to
    # the end-of-turn chunk, index num_merged, or are excluded when there is none.
    orphan_chunk = num_merged if both_end_of_turn else EXCLUDED

    def chunk_per_token(raw: np.ndarray, included: np.ndarray, num_text: int) -> np.ndarray:
        chunk = np.full(raw.size, EXCLUDED, dtype=np.int64)
        if num_merged > 0:
            chunk[included] = merged[raw[included]]
        else:
            chunk[included] = orphan_chunk
        if both_end_of_turn:
            chunk[num_text] = num_merged  # rule 6: the end-of-turn token, last chunk
        return chunk

    weak_chunk = chunk_per_token(weak_raw, weak_in, weak_text)
    strong_chunk = chunk_per_token(strong_raw, strong_in, strong_text)
    num_chunks = num_merged + int(both_end_of_turn)

    if weak_pieces is not None:
        weak_chunk, strong_chunk, num_chunks = _split_identical(
            weak_chunk, strong_chunk, num_chunks, list(weak_pieces), list(strong_pieces))

    chunk_start = np.full(num_chunks, text_length, dtype=np.int64)
    chunk_end = np.zeros(num_chunks, dtype=np.int64)
    for chunk, starts, ends in ((weak_chunk, weak_starts, weak_ends), (strong_chunk, strong_starts, strong_ends)):
        keep = chunk >= 0
        np.minimum.at(chunk_start, chunk[keep], starts[keep])
        np.maximum.at(chunk_end, chunk[keep], ends[keep])
    return Chunking(weak_chunk, strong_chunk, num_chunks, chunk_start, chunk_end, both_end_of_turn)


def _split_identical(weak_chunk, strong_chunk, num_chunks, weak_pieces, strong_pieces):
    """Rule 5: a chunk whose pieces are identical on both sides becomes one chunk per token."""
    if len(weak_pieces) != weak_chunk.size or len(strong_pieces) != strong_chunk.size:
        raise InputError(f"pieces: {len(weak_pieces)} weak and {len(strong_pieces)} strong given for "
                         f"{weak_chunk.size} weak and {strong_chunk.size} strong tokens")
    # Included tokens in order; their chunk indices do not decrease, so chunk c's members are the
    # slice between bounds[c] and bounds[c + 1].
    weak_index = np.flatnonzero(weak_chunk >= 0)
    strong_index = np.flatnonzero(strong_chunk >= 0)
    weak_bounds = np.searchsorted(weak_chunk[weak_index], np.arange(num_chunks + 1))
    strong_bounds = np.searchsorted(strong_chunk[strong_index], np.arange(num_chunks + 1))
    new_weak = weak_chunk.copy()
    new_strong = strong_chunk.copy()
    next_chunk = 0
    for c in range(num_chunks):
        weak_members = weak_index[weak_bounds[c]:weak_bounds[c + 1]]
        strong_members = strong_index[strong_bounds[c]:strong_bounds[c + 1]]
        identical = (weak_members.size == strong_members.size
                     and [weak_pieces[i] for i in weak_members] == [strong_pieces[j] for j in strong_members])
        if identical:
            new_weak[weak_members] = next_chunk + np.arange(weak_members.size)
            new_strong[strong_members] = next_chunk + np.arange(strong_members.size)
            next_chunk += weak_members.size
        else:
            new_weak[weak_members] = next_chunk
            new_strong[strong_members] = next_chunk
            next_chunk += 1
    return new_weak, new_strong, next_chunk


# -- round trip ---------------------------------------------------------------------------------


def roundtrip_ok(tokenizer, text: str) -> bool:
    """Whether `text` round-trips: decoding its response ids gives back exactly `text`.

    The ids are those of the tokenization rule (text alone, no special tokens); decoding keeps
    special tokens and turns off `clean_up_tokenization_spaces`, which would rewrite " ." as ".".
    No stripping on our side: a SentencePiece tokenizer prepends a dummy '▁' and its decoder
    strips exactly one leading space again, so "Hello" round-trips; a text whose own leading space
    was absorbed into that dummy prefix does not, correctly: its ids are those of the text without
    the space. Texts a normaliser rewrites (NFC, lower-casing, stripped accents) or whose
    whitespace the tokenizer drops (WordPiece) do not round-trip either: the ids do not say them.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return decoded == text
