"""Reward projection across tokenizers (DESIGN section 5): the chunk rule, its edge cases, and
`wspo-shards project`.

Property tests run every pair of tokenizer families (byte-level BPE, SentencePiece with a real
Mistral vocabulary, WordPiece; two vocabularies of the first two; identical tokenizers) over text
mixing CJK, emoji with skin tones and ZWJ sequences, combining accents, code and whitespace runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_families import build_families

from wspo.shards.cli import main as shards_main
from wspo.shards.projection import EXCLUDED, chunk_rewards, chunk_sums, chunk_tokens, roundtrip_ok
from wspo.shards.tokenization import ResponseTokenizer

# -- generated text -----------------------------------------------------------------------------

ASCII_WORDS = ["the", "Hello", "world", "don't", "x", "42", "3.14", "foo_bar", ",", ".", "!?", "(", ")", "\"quoted\""]
CJK = "日本語中文字漢字한국어の文章です。，！"
EMOJI = ["😀", "🇯🇵", "🏳️\u200d🌈", "👨\u200d👩\u200d👧\u200d👦", "👩🏾\u200d💻", "🧑🏻\u200d🤝\u200d🧑🏿"]
SKIN_TONES = ["", "\U0001F3FB", "\U0001F3FC", "\U0001F3FD", "\U0001F3FE", "\U0001F3FF"]
CODE = ["def f(x):\n    return x\n", "\tif (a) {\n\t\tb();\n\t}\n", "    # comment\n", "x = [1, 2,  3]\n"]

fragments = st.one_of(
    st.sampled_from(ASCII_WORDS),
    st.text(alphabet=CJK, min_size=1, max_size=5),
    st.sampled_from(EMOJI),
    st.builds(str.__add__, st.sampled_from(["👍", "👋", "🧑", "✌️"]), st.sampled_from(SKIN_TONES)),
    st.builds(str.__add__, st.sampled_from("aeonAE"), st.sampled_from(["\u0301", "\u0300", "\u0308", "\u0301\u0323"])),
    st.sampled_from(CODE),
    st.text(alphabet=" \t\n", min_size=1, max_size=6),
    st.text(max_size=3),  # anything else
)
texts = st.lists(fragments, max_size=14).map("".join)

# -- tokenizers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (folder, ResponseTokenizer) for every family of tests/tokenizer_families.py."""
    root = tmp_path_factory.mktemp("families")
    return {name: (root / name, ResponseTokenizer(tok, max_length=10**9, max_prompt_length=1))
            for name, tok in build_families(root).items()}


FAMILY_NAMES = ["bpe_512", "bpe_1500", "sp_mistral_v2", "sp_mistral_v1", "wordpiece_400"]
PAIRS = [(w, s) for w in FAMILY_NAMES for s in FAMILY_NAMES]


def tokenize(rule: ResponseTokenizer, text: str, keep: int | None = None):
    """(ids, starts, ends, has_end_of_turn); `keep` tokens only (a truncated row) when given."""
    ids, starts, ends = rule.response_tokens(text)
    if keep is None:
        return ids, starts, ends, True
    return ids[:keep], starts[:keep], ends[:keep], False


def chunk(text, weak, strong, pieces: bool = False):
    return chunk_tokens(
        len(text), weak[1], weak[2], strong[1], strong[2],
        weak_has_end_of_turn=weak[3], strong_has_end_of_turn=strong[3],
        weak_pieces=weak[0] if pieces else None, strong_pieces=strong[0] if pieces else None,
    )


def check_chunking(text, weak, strong, chunking, rewards, pieces: bool = False):
    """The properties every chunking must have (see shards/projection.py).

    `pieces`: the chunking was refined with identical pieces (rule 5), so pieces sharing one
    character's span may sit in consecutive one-to-one chunks.
    """
    n = chunking.num_chunks
    sides = [(weak, chunking.weak_chunk), (strong, chunking.strong_chunk)]
    for (ids, starts, ends, has_eot), chunk_index in sides:
        assert chunk_index.shape == (len(ids),)
        included = chunk_index[chunk_index != EXCLUDED]
        # Chunks cover the included tokens in order, start at 0, and each is on both sides.
        assert np.all(np.diff(included) >= 0)
        assert sorted(set(included.tolist())) == list(range(n))
        # Excluded tokens (truncation) are a suffix of the side, apart from its end-of-turn token.
        text_index = chunk_index[: len(ids) - 1] if has_eot else chunk_index
        excluded = np.flatnonzero(text_index == EXCLUDED)
        assert excluded.size == 0 or excluded[0] + excluded.size == text_index.size
    # No token crosses a chunk boundary: chunk c's tokens (both sides) end where chunk c+1's start.
    last_end = np.full(n, -1)
    first_start = np.full(n, len(text) + 1)
    for (_, starts, ends, _), chunk_index in sides:
        for c, a, b in zip(chunk_index, starts, ends):
            if c >= 0:
                last_end[c] = max(last_end[c], b)
                first_start[c] = min(first_start[c], a)
    apart = last_end[:-1] <= first_start[1:]
    if pieces:
        one_to_one = (chunking.weak_counts() == 1) & (chunking.strong_counts() == 1)
        apart |= one_to_one[:-1] & one_to_one[1:]
    assert np.all(apart)
    # End-of-turn tokens form the last chunk (alone, unless one side has no text token to pair).
    if weak[3] and strong[3]:
        assert chunking.has_end_of_turn_chunk
        assert chunking.weak_chunk[-1] == chunking.strong_chunk[-1] == n - 1
        if n >= 2:
            assert (chunking.weak_chunk == n - 1).sum() == (chunking.strong_chunk == n - 1).sum() == 1
    else:
        assert not chunking.has_end_of_turn_chunk
    # Sums are conserved over the included tokens (= reward_sum when nothing is excluded).
    sums = chunk_rewards(chunking, rewards)
    included = chunking.weak_chunk != EXCLUDED
    assert sums.dtype == np.float64 and sums.shape == (n,)
    assert abs(sums.sum() - rewards[included].astype(np.float64).sum()) < 1e-5
    if included.all():
        assert abs(sums.sum() - rewards.astype(np.float64).sum()) < 1e-5


def random_rewards(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=n).astype(np.float32)


# -- properties ---------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(text=texts, pair=st.sampled_from(PAIRS), seed=st.integers(0, 2**16))
def test_chunking_properties_over_family_pairs(families, text, pair, seed):
    weak = tokenize(families[pair[0]][1], text)
    strong = tokenize(families[pair[1]][1], text)
    chunking = chunk(text, weak, strong)
    check_chunking(text, weak, strong, chunking, random_rewards(len(weak[0]), seed))
    assert chunking.has_end_of_turn_chunk
    assert (chunking.weak_chunk != EXCLUDED).all() and (chunking.strong_chunk != EXCLUDED).all()


@settings(max_examples=60, deadline=None)
@given(text=texts, pair=st.sampled_from(PAIRS), seed=st.integers(0, 2**16), data=st.data())
def test_truncated_rows_use_the_common_prefix(families, text, pair, seed, data):
    full_weak = tokenize(families[pair[0]][1], text)
    full_strong = tokenize(families[pair[1]][1], text)
    # Each side is cut (no end-of-turn), or not; at least one of them is cut.
    weak_keep, strong_keep = data.draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    weak = tokenize(families[pair[0]][1], text, data.draw(st.integers(0, len(full_weak[0]) - 1))) if weak_keep else full_weak
    strong = tokenize(families[pair[1]][1], text, data.draw(st.integers(0, len(full_strong[0]) - 1))) if strong_keep else full_strong
    chunking = chunk(text, weak, strong)
    check_chunking(text, weak, strong, chunking, random_rewards(len(weak[0]), seed))
    # A full side's end-of-turn token has no partner: excluded.
    for (ids, _, _, has_eot), chunk_index in ((weak, chunking.weak_chunk), (strong, chunking.strong_chunk)):
        if has_eot:
            assert chunk_index[-1] == EXCLUDED


@settings(max_examples=60, deadline=None)
@given(text=texts, name=st.sampled_from(FAMILY_NAMES), seed=st.integers(0, 2**16), cut=st.integers(0, 10**6))
def test_identical_tokenizers_give_one_token_per_chunk(families, text, name, seed, cut):
    weak = strong = tokenize(families[name][1], text)
    # From spans alone, pieces sharing one character's span must share a chunk: equal counts and
    # identical spans on both sides, more than one token only where the pieces overlap.
    by_spans = chunk(text, weak, strong)
    check_chunking(text, weak, strong, by_spans, random_rewards(len(weak[0]), seed))
    assert np.array_equal(by_spans.weak_chunk, by_spans.strong_chunk)
    spans = list(zip(weak[1], weak[2]))
    for c in np.flatnonzero(by_spans.weak_counts() > 1):
        members = np.flatnonzero(by_spans.weak_chunk == c)
        assert all(spans[i + 1][0] < spans[i][1] or spans[i + 1][0] == spans[i][0] for i in members[:-1])
    # Given the pieces (ids of one vocabulary), every chunk is exactly one token of each side:
    # the chunk loss is the token loss term for term.
    by_pieces = chunk(text, weak, strong, pieces=True)
    check_chunking(text, weak, strong, by_pieces, random_rewards(len(weak[0]), seed), pieces=True)
    assert by_pieces.num_chunks == len(weak[0])
    assert np.array_equal(by_pieces.weak_chunk, np.arange(len(weak[0])))
    assert np.array_equal(by_pieces.strong_chunk, np.arange(len(weak[0])))
    rewards = random_rewards(len(weak[0]), seed)
    assert np.array_equal(chunk_rewards(by_pieces, rewards), rewards.astype(np.float64))
    # Truncated on one side: still one to one on the common prefix.
    truncated = tokenize(families[name][1], text, cut % len(weak[0]))
    one_side = chunk(text, truncated, strong, pieces=True)
    check_chunking(text, truncated, strong, one_side, random_rewards(len(truncated[0]), seed), pieces=True)
    assert (one_side.weak_counts() == 1).all() and (one_side.strong_counts() == 1).all()


@settings(max_examples=60, deadline=None)
@given(text=texts)
def test_byte_level_bpe_round_trips_everything(families, text):
    assert roundtrip_ok(families["bpe_512"][1].tokenizer, text)


def test_round_trip_rule(families):
    sp = families["sp_mistral_v2"][1].tokenizer
    wordpiece = families["wordpiece_400"][1].tokenizer
    bpe = families["bpe_1500"][1].tokenizer
    # SentencePiece: the dummy prefix its decoder strips is its own, so plain text round-trips...
    assert roundtrip_ok(sp, "Hello world\n\n  x = 1 👍🏽 中文")
    # ...but a leading space is absorbed into that prefix: its ids are those of "Hello".
    assert sp(" Hello", add_special_tokens=False)["input_ids"] == sp("Hello", add_special_tokens=False)["input_ids"]
    assert not roundtrip_ok(sp, " Hello")
    assert roundtrip_ok(bpe, " Hello  ,world .")  # no clean-up of spaces before punctuation
    assert not roundtrip_ok(wordpiece, "Hello  world")  # lower-cased, whitespace dropped


# -- hand-written spans -------------------------------------------------------------------------


def spans_chunk(length, weak, strong, weak_eot=True, strong_eot=True, **kw):
    """weak/strong: lists of (start, end) text spans; the end-of-turn span is appended when set."""
    w = weak + ([(length, length)] if weak_eot else [])
    s = strong + ([(length, length)] if strong_eot else [])
    return chunk_tokens(length, [a for a, _ in w], [b for _, b in w], [a for a, _ in s], [b for _, b in s],
                        weak_has_end_of_turn=weak_eot, strong_has_end_of_turn=strong_eot, **kw)


def test_one_sided_stretch_joins_the_next_chunk():
    # "a  b": byte-level 'a' ' ' ' b' against WordPiece 'a' 'b' (whitespace covered by no token).
    c = spans_chunk(4, [(0, 1), (1, 2), (2, 4)], [(0, 1), (3, 4)])
    assert c.weak_chunk.tolist() == [0, 1, 1, 2] and c.strong_chunk.tolist() == [0, 1, 2]
    assert chunk_rewards(c, [1.0, 2.0, 3.0, 4.0]).tolist() == [1.0, 5.0, 4.0]
    assert (c.chunk_start.tolist(), c.chunk_end.tolist()) == ([0, 1, 4], [1, 4, 4])


def test_one_sided_stretch_at_the_end_joins_the_previous_chunk():
    # "ab ": the trailing space exists on the weak side only.
    c = spans_chunk(3, [(0, 1), (1, 2), (2, 3)], [(0, 1), (1, 2)])
    assert c.weak_chunk.tolist() == [0, 1, 1, 2] and c.strong_chunk.tolist() == [0, 1, 2]


def test_characters_no_side_covers_make_no_empty_chunk():
    # "a b" under two WordPiece vocabularies: the space is a cut on both sides, with no token.
    c = spans_chunk(3, [(0, 1), (2, 3)], [(0, 1), (2, 3)])
    assert c.num_chunks == 3 and c.weak_chunk.tolist() == c.strong_chunk.tolist() == [0, 1, 2]


def test_pieces_of_one_character_and_overlaps_share_a_chunk():
    # An emoji of two code points: weak splits it into 3 byte pieces, strong into 2.
    c = spans_chunk(2, [(0, 1), (0, 1), (1, 2)], [(0, 1), (0, 2)])
    assert c.weak_chunk.tolist() == [0, 0, 0, 1] and c.strong_chunk.tolist() == [0, 0, 1]
    # Pieces identical on both sides are paired one to one; different pieces are not.
    same = spans_chunk(1, [(0, 1), (0, 1)], [(0, 1), (0, 1)], weak_pieces=[7, 8, 0], strong_pieces=[7, 8, 0])
    assert same.weak_chunk.tolist() == same.strong_chunk.tolist() == [0, 1, 2]
    other = spans_chunk(1, [(0, 1), (0, 1)], [(0, 1), (0, 1)], weak_pieces=[7, 8, 0], strong_pieces=[8, 7, 0])
    assert other.weak_chunk.tolist() == other.strong_chunk.tolist() == [0, 0, 1]


def test_side_without_text_tokens_joins_the_end_of_turn_chunk():
    # A whitespace-only response: WordPiece has nothing but its end-of-turn token.
    c = spans_chunk(2, [(0, 1), (1, 2)], [])
    assert c.num_chunks == 1 and c.weak_chunk.tolist() == [0, 0, 0] and c.strong_chunk.tolist() == [0]
    assert chunk_rewards(c, [1.0, 2.0, 3.0]).tolist() == [6.0]
    # Without an end-of-turn chunk (truncated) there is nothing to pair them with.
    c = spans_chunk(2, [(0, 1), (1, 2)], [], weak_eot=False)
    assert c.num_chunks == 0 and c.weak_chunk.tolist() == [EXCLUDED, EXCLUDED]
    assert c.strong_chunk.tolist() == [EXCLUDED]
    # The empty response: the two end-of-turn tokens.
    c = spans_chunk(0, [], [])
    assert c.num_chunks == 1 and c.weak_chunk.tolist() == c.strong_chunk.tolist() == [0]


def test_truncation_keeps_the_common_prefix_up_to_a_cut():
    # "hello world": weak cut after 'hello' ' wor' (the last token may be incomplete).
    c = spans_chunk(11, [(0, 5), (5, 9)], [(0, 5), (5, 11)], weak_eot=False)
    assert c.weak_chunk.tolist() == [0, EXCLUDED] and c.strong_chunk.tolist() == [0, EXCLUDED, EXCLUDED]
    assert not c.has_end_of_turn_chunk and c.num_chunks == 1
    # A limit that falls inside a token of the other side moves back to the previous cut.
    c = spans_chunk(11, [(0, 5), (5, 7), (7, 11)], [(0, 5), (5, 11)], weak_eot=False)
    assert c.weak_chunk.tolist() == [0, EXCLUDED, EXCLUDED] and c.strong_chunk.tolist() == [0, EXCLUDED, EXCLUDED]
    # ...possibly all the way to the start: then no chunk at all.
    c = spans_chunk(11, [(0, 3), (3, 7), (7, 11)], [(0, 5), (5, 11)], weak_eot=False)
    assert c.num_chunks == 0 and set(c.weak_chunk.tolist()) == set(c.strong_chunk.tolist()) == {EXCLUDED}


@pytest.mark.parametrize("weak, message", [
    ([(1, 0)], "token 0 has span \\(1, 0\\), not 0 <= start <= end"),
    ([(0, 3)], "token 0 has span"),
    ([(-1, 1)], "token 0 has span"),
    ([(1, 2), (0, 2)], "starts decrease at token 1"),
    ([(0, 2), (1, 1)], "ends decrease at token 1"),
])
def test_invalid_spans_raise(weak, message):
    with pytest.raises(ValueError, match=message):
        spans_chunk(2, weak, [(0, 2)])


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="2 starts but 1 ends"):
        chunk_tokens(2, [0, 2], [2], [0, 2], [2, 2], weak_has_end_of_turn=True, strong_has_end_of_turn=True)
    with pytest.raises(ValueError, match="ends decrease at token 1"):
        chunk_tokens(3, [0, 1], [2, 1], [0], [3], weak_has_end_of_turn=False, strong_has_end_of_turn=False)
    with pytest.raises(ValueError, match="end-of-turn token, but the last span is \\(0, 2\\)"):
        chunk_tokens(2, [0], [2], [0, 2], [2, 2], weak_has_end_of_turn=True, strong_has_end_of_turn=True)
    with pytest.raises(ValueError, match="together"):
        spans_chunk(2, [(0, 2)], [(0, 2)], weak_pieces=[1, 2])
    with pytest.raises(ValueError, match="pieces"):
        spans_chunk(2, [(0, 2)], [(0, 2)], weak_pieces=[1], strong_pieces=[1, 2])
    with pytest.raises(ValueError, match="3 chunk indices but 2 token values"):
        chunk_sums([0, 0, 1], [1.0, 2.0], 2)


# -- wspo-shards project --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_dir(tiny_models, tmp_path_factory):
    from wspo.precompute.config import PrecomputeArguments
    from wspo.precompute.pipeline import run

    out = tmp_path_factory.mktemp("projection_shards")
    run(PrecomputeArguments(output_dir=str(out), weak_ref=str(tiny_models["weak_ref"]),
                            weak_aligned=str(tiny_models["weak_aligned"]), max_length=512,
                            max_prompt_length=256, max_samples=20))
    return out


def project(capsys, tokenizer_dir, shard_dir) -> dict:
    assert shards_main(["project", "--tokenizer", str(tokenizer_dir), str(shard_dir)]) == 0
    return json.loads(capsys.readouterr().out)


def test_project_report(capsys, tiny_models, shard_dir, families):
    from wspo.shards.store import ShardSet

    shards = ShardSet.open(shard_dir)
    responses = shards.read_table(columns=["response"])["response"].to_pylist()
    same = project(capsys, tiny_models["weak_ref"], shard_dir)
    assert same["same_tokenizer"] and same["rows"] == shards.num_rows
    assert same["weak_tokens"] == shards.num_tokens
    assert same["one_to_one_strong_share"] == 1.0
    assert same["mean_weak_tokens_per_chunk"] == same["mean_strong_tokens_per_chunk"] == 1.0
    assert same["longest_chunk"]["weak_tokens"] == same["longest_chunk"]["strong_tokens"] == 1
    for name in ("sp_mistral_v2", "wordpiece_400"):
        other = project(capsys, families[name][0], shard_dir)
        assert not other["same_tokenizer"] and other["rows"] == shards.num_rows
        assert other["weak_tokens"] == shards.num_tokens
        included_weak = other["weak_tokens"] - other["excluded_weak_tokens"]
        included_strong = other["strong_tokens"] - other["excluded_strong_tokens"]
        assert other["rows"] <= other["chunks"] <= min(included_weak, included_strong)
        assert 0 < other["one_to_one_strong_share"] < 1
        assert other["mean_weak_tokens_per_chunk"] == round(included_weak / other["chunks"], 4) >= 1
        assert other["mean_strong_tokens_per_chunk"] == round(included_strong / other["chunks"], 4) >= 1
        longest = other["longest_chunk"]
        assert longest["weak_tokens"] + longest["strong_tokens"] > 2
        assert any(longest["text"] in r for r in responses)
        assert 0 <= other["rows_not_round_tripping"] <= other["rows"]
    assert other["rows_not_round_tripping"] > 0  # WordPiece lower-cases and drops whitespace
