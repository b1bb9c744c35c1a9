"""The shared tokenization rule (DESIGN section 3)."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoTokenizer

from wspo.shards.tokenization import ResponseTokenizer, Skip, fallback_chat_template

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi in Japanese 🇯🏵"}]
RESPONSE = "こんにちは! Café  crème 👩\u200d💻\n\tdone."


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["weak_ref"])


def test_sequence_is_template_prompt_plus_response_alone_plus_eot(tokenizer):
    rule = ResponseTokenizer(tokenizer, max_length=512, max_prompt_length=256)
    tok = rule(MESSAGES, RESPONSE)
    prompt_text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.prompt_ids == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert tok.token_ids[:-1] == tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    assert tok.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") == rule.end_of_turn_id
    assert tok.input_ids == tok.prompt_ids + tok.token_ids
    assert not tok.truncated
    # Offsets: contiguous character spans covering the response; byte-level pieces of one
    # character share its span; end-of-turn at (len, len).
    spans = list(zip(tok.token_start[:-1], tok.token_end[:-1]))
    assert spans[0][0] == 0 and spans[-1][1] == len(RESPONSE)
    assert all(b == c or (a, b) == (c, d) for (a, b), (c, d) in zip(spans, spans[1:]))
    assert any(a == c for (a, _), (c, _) in zip(spans, spans[1:]))  # the CJK text splits characters
    assert (tok.token_start[-1], tok.token_end[-1]) == (len(RESPONSE), len(RESPONSE))
    assert tokenizer.decode(tok.token_ids[:-1]) == RESPONSE


def test_truncation_and_prompt_limit(tokenizer):
    full = ResponseTokenizer(tokenizer, max_length=512, max_prompt_length=256)(MESSAGES, RESPONSE)
    prompt_len = len(full.prompt_ids)
    cut = ResponseTokenizer(tokenizer, max_length=prompt_len + 3, max_prompt_length=prompt_len)(MESSAGES, RESPONSE)
    assert cut.truncated and cut.token_ids == full.token_ids[:3] and len(cut.input_ids) == prompt_len + 3
    exact = ResponseTokenizer(tokenizer, max_length=len(full.input_ids), max_prompt_length=prompt_len)(MESSAGES, RESPONSE)
    assert not exact.truncated and exact.token_ids == full.token_ids
    with pytest.raises(Skip) as skip:
        ResponseTokenizer(tokenizer, max_length=512, max_prompt_length=prompt_len - 1)(MESSAGES, RESPONSE)
    assert skip.value.reason == "prompt_too_long"
    with pytest.raises(ValueError, match="max_prompt_length"):
        ResponseTokenizer(tokenizer, max_length=100, max_prompt_length=100)


def test_fallback_template_for_tokenizers_without_one(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    plain.chat_template = None
    rule = ResponseTokenizer(plain, max_length=512, max_prompt_length=256)
    assert rule.uses_fallback_template and rule.chat_template == fallback_chat_template()
    text = plain.decode(rule(MESSAGES, RESPONSE).prompt_ids)
    assert text == "System:\nBe brief.\n\nUser:\nSay hi in Japanese 🇯🏵\n\nAssistant:\n"


def test_fingerprint_identifies_vocabulary_template_and_settings(tokenizer, tiny_models, tmp_path):
    base = ResponseTokenizer(tokenizer, 512, 256).fingerprint
    # Another copy of the same tokenizer (the weak model's), other max lengths: same fingerprint.
    copy = AutoTokenizer.from_pretrained(tiny_models["weak_aligned"])
    assert ResponseTokenizer(copy, 1024, 100).fingerprint == base
    # Another end-of-turn token or chat template: different.
    assert ResponseTokenizer(tokenizer, 512, 256, end_of_turn_token="<|endoftext|>").fingerprint != base
    shutil.copytree(tiny_models["weak_ref"], tmp_path / "t")
    other = AutoTokenizer.from_pretrained(tmp_path / "t")
    other.chat_template = other.chat_template.replace("\n", "\n\n")
    assert ResponseTokenizer(other, 512, 256).fingerprint != base


def test_fingerprint_leaves_out_truncation_and_padding_and_keeps_them(tokenizer, tiny_models):
    """Truncation / padding settings do not change the fingerprint, and computing it leaves the
    caller's settings as they were."""
    plain = ResponseTokenizer(AutoTokenizer.from_pretrained(tiny_models["weak_aligned"]), 512, 256)
    configured = AutoTokenizer.from_pretrained(tiny_models["weak_ref"])
    rule = ResponseTokenizer(configured, 512, 256)
    backend = configured.backend_tokenizer
    backend.enable_truncation(100, stride=3)
    backend.enable_padding(pad_id=5, pad_token="x", length=7)
    settings = (backend.truncation, backend.padding)
    assert rule.fingerprint == plain.fingerprint
    assert rule.fingerprint_v1 == plain.fingerprint_v1 and rule.fingerprint_v1 != rule.fingerprint
    assert (backend.truncation, backend.padding) == settings


def test_sets_written_under_fingerprint_definition_1_still_match(tokenizer):
    """A manifest record without `fingerprint_version` (sets written before it) is compared under
    definition 1; a record of another tokenizer under either definition does not match."""
    rule = ResponseTokenizer(tokenizer, 512, 256)
    record = rule.describe()
    assert record["fingerprint_version"] == 2 and rule.matches(record)
    legacy = {k: v for k, v in record.items() if k != "fingerprint_version"} | {"fingerprint": rule.fingerprint_v1}
    assert rule.matches(legacy)
    assert not rule.matches(legacy | {"fingerprint": rule.fingerprint})  # v2 value read as v1
    assert not rule.matches(record | {"fingerprint": rule.fingerprint_v1})
    with pytest.raises(ValueError, match="fingerprint version 3"):
        rule.matches(record | {"fingerprint_version": 3})


def test_bad_end_of_turn_token_is_named(tokenizer):
    with pytest.raises(ValueError, match="<nope>"):
        ResponseTokenizer(tokenizer, 512, 256, end_of_turn_token="<nope>")


def test_shards_rule_is_the_recorded_rule_or_none(tokenizer):
    """The shards' rule under a tokenizer (train and eval both choose with it): the recorded rule
    when the fingerprint matches; None for another fingerprint or an end-of-turn token the
    vocabulary lacks."""
    from wspo.shards.tokenization import shards_rule

    record = ResponseTokenizer(tokenizer, 512, 256).describe()
    rule = shards_rule(tokenizer, record, 300, 299)
    assert rule is not None and rule.fingerprint == ResponseTokenizer(tokenizer, 300, 299).fingerprint
    assert (rule.max_length, rule.max_prompt_length, rule.end_of_turn_token) == (300, 299, record["end_of_turn_token"])
    assert shards_rule(tokenizer, record | {"fingerprint": "0" * 64}, 300, 299) is None
    assert shards_rule(tokenizer, record, 300, 299, end_of_turn_token="<nope>") is None


@pytest.mark.parametrize("stored, retokenized, truncated, expected", [
    ([5, 6, 7], [5, 6, 7], False, None),  # all of them
    ([5, 6], [5, 6, 7], True, None),  # a prefix of a response phase one cut
    ([5, 6], [5, 6, 7], False, 2),  # a prefix, but the row says it was not cut: differs where it ends
    ([5, 9, 7], [5, 6, 7], False, 1),
    ([5, 6, 7, 8], [5, 6, 7], True, 3),  # more stored ids than the text gives
])
def test_stored_ids_mismatch(stored, retokenized, truncated, expected):
    from wspo.shards.tokenization import stored_ids_mismatch

    assert stored_ids_mismatch(stored, retokenized, truncated) == expected
