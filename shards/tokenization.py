"""The tokenization rule both phases share (DESIGN section 3).

    prompt ids   = chat template over the messages before the response, generation prompt added
    response ids = the response text tokenized alone (no special tokens), with character
                   offsets, then the end-of-turn token
    sequence     = prompt ids + response ids; only response positions are scored and trained

The end-of-turn token is the one the chat template closes an assistant turn with, found by
rendering the template around a marker response (`<|im_end|>` for ChatML/Qwen2, `<|eot_id|>` for
Llama 3, `<end_of_turn>` for Gemma, `<|end|>` for Phi-3, `</s>` for Mistral); the tokenizer's
eos only when the template shows none; `end_of_turn_token` overrides both. Rule version 1 (sets
written before this) defaulted to eos: such sets record their token and version and are used as
written.

Phase one stores `token_ids`; phase two re-tokenizes each row with the same function and, when the
tokenizer fingerprints match, must get exactly the stored ids.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources

from wspo.errors import ConfigError, InputError

RULE_VERSION = 2  # 2: end-of-turn token read from the chat template (1: the tokenizer's eos)
# 2: the backend's own serialization hashed as it is (1: re-dumped as sorted-key JSON; sets
# written then carry no `fingerprint_version` and are compared under it: `matches`)
FINGERPRINT_VERSION = 2

# A response no template alters: rendering it shows what the template writes after a response.
_MARKER = "wspoResponseMarker7f3a"


def fallback_chat_template() -> str:
    """The plain template for tokenizers that ship none (configs/fallback_chat_template.jinja)."""
    return resources.files("wspo.configs").joinpath("fallback_chat_template.jinja").read_text()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def same_tokenizer_files(model_dir, other) -> bool:
    """Whether `model_dir` ships exactly the tokenizer files of the folder `other` (byte for byte)."""
    from pathlib import Path

    a, b = Path(model_dir), Path(str(other))
    if not b.is_dir() or not (a / "tokenizer.json").exists():
        return False
    if a.resolve() == b.resolve():
        return True
    return all((a / n).exists() == (b / n).exists() and (not (a / n).exists() or (a / n).read_bytes() == (b / n).read_bytes())
               for n in _TOKENIZER_FILES)


@dataclass
class TokenizedResponse:
    prompt_ids: list[int]
    token_ids: list[int]  # response ids, end-of-turn included unless truncated
    token_start: list[int]
    token_end: list[int]
    truncated: bool

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.token_ids


class Skip(Exception):
    """A row the rule cannot turn into a sequence; `reason` is the manifest's counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def template_end_of_turn(tokenizer, chat_template: str) -> str | None:
    """The special token the chat template writes right after an assistant response, or None.

    Renders a two-turn conversation whose answer is a marker, tokenizes what follows the marker
    and returns the first special (added) token there, so whitespace or text a template writes
    before its end token does not matter.
    """
    conversation = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": _MARKER}]
    try:
        text = tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this shows no end token
        return None
    if not isinstance(text, str) or _MARKER not in text:
        return None
    after = text[text.index(_MARKER) + len(_MARKER):]
    special = {t.content for t in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens)
    for piece in tokenizer.convert_ids_to_tokens(tokenizer(after, add_special_tokens=False)["input_ids"]):
        if piece in special:
            return piece
    return None


def invalid_text(text: str) -> bool:
    """Text that cannot be encoded as UTF-8 (a lone surrogate: an emoji cut in half)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class ResponseTokenizer:
    """Applies the rule with one Hugging Face (fast) tokenizer.

    `end_of_turn_token` defaults to the token the chat template closes an assistant turn with
    (else the tokenizer's eos). `max_prompt_length` bounds the prompt (longer prompts are
    skipped); `max_length` bounds prompt + response (responses are cut and flagged truncated).
    `rule_version` reproduces the identity of sets written by an older rule (their ids are the
    same function of template and end-of-turn token; only the default token differed).
    """

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int, end_of_turn_token: str | None = None,
                 rule_version: int = RULE_VERSION):
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer; the rule needs "
                "character offsets (install `tokenizers` and load with use_fast=True)"
            )
        if max_prompt_length >= max_length:
            raise ConfigError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.chat_template = tokenizer.chat_template or fallback_chat_template()
        self.uses_fallback_template = tokenizer.chat_template is None
        self.rule_version = rule_version
        if end_of_turn_token:
            eot, self.end_of_turn_source = end_of_turn_token, "configured"
        elif (found := template_end_of_turn(tokenizer, self.chat_template)) is not None:
            eot, self.end_of_turn_source = found, "chat_template"
        else:
            eot, self.end_of_turn_source = tokenizer.eos_token, "eos"
        if eot is None:
            raise ConfigError(
                f"tokenizer {tokenizer.name_or_path!r}: its chat template shows no end-of-turn token and it has no "
                "eos token: set end_of_turn_token"
            )
        # Look the token up in the vocabulary itself (the backend's map, added tokens included;
        # None when absent), not through convert_tokens_to_ids: some tokenizers map unknown
        # strings to an unk id that is also a real token (Qwen2's <|endoftext|>).
        eot_id = tokenizer.backend_tokenizer.token_to_id(eot)
        if eot_id is None:
            raise ConfigError(f"end_of_turn_token {eot!r} is not in the vocabulary of {tokenizer.name_or_path!r}")
        self.end_of_turn_token = eot
        self.end_of_turn_id = int(eot_id)

    # -- identity -----------------------------------------------------------------------------

    def settings(self) -> dict:
        """What decides the token ids of a row, besides the text (part of the fingerprint)."""
        return {
            "rule_version": self.rule_version,
            "end_of_turn_token": self.end_of_turn_token,
            "end_of_turn_id": self.end_of_turn_id,
            "fallback_chat_template": self.uses_fallback_template,
        }

    @property
    def chat_template_hash(self) -> str:
        return hashlib.sha256(self.chat_template.encode()).hexdigest()

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of vocabulary + normalisation/pre-tokenisation + chat template + rule settings
        (definition `FINGERPRINT_VERSION`).

        Truncation and padding settings of the tokenizer are left out: they do not change the
        ids this rule produces, and two copies of one tokenizer often differ there. The tokenizer
        is hashed as its backend serializes it (fields in a fixed order, vocabulary by id):
        re-parsing and re-dumping that JSON (definition 1) cost about a second per run with a
        150k vocabulary.
        """
        backend = self.tokenizer.backend_tokenizer
        truncation, padding = backend.truncation, backend.padding
        backend.no_truncation()
        backend.no_padding()
        try:
            serialized = backend.to_str()
        finally:  # restore exactly what the caller's tokenizer had
            if truncation is not None:
                backend.enable_truncation(**truncation)
            if padding is not None:
                backend.enable_padding(**padding)
        rule = json.dumps({"chat_template": self.chat_template, "rule": self.settings()}, sort_keys=True, ensure_ascii=False)
        digest = hashlib.sha256(rule.encode())
        digest.update(b"\n")
        digest.update(serialized.encode())
        return digest.hexdigest()

    @functools.cached_property
    def fingerprint_v1(self) -> str:
        """The fingerprint under definition 1 (sets written before `fingerprint_version` was
        recorded): the same content, as one sorted-key JSON document."""
        backend = json.loads(self.tokenizer.backend_tokenizer.to_str())
        backend.pop("truncation", None)
        backend.pop("padding", None)
        blob = json.dumps(
            {"tokenizer": backend, "chat_template": self.chat_template, "rule": self.settings()},
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def matches(self, record: dict) -> bool:
        """Whether a manifest's tokenizer record (`describe()` of the rule that wrote a set) has
        this rule's fingerprint, under the definition the set was written with."""
        version = record.get("fingerprint_version", 1)
        if version not in (1, FINGERPRINT_VERSION):
            raise InputError(f"tokenizer fingerprint version {version} is newer than this toolkit reads; upgrade wspo")
        mine = self.fingerprint if version == FINGERPRINT_VERSION else self.fingerprint_v1
        return record["fingerprint"] == mine

    def describe(self, fingerprint_version: int = FINGERPRINT_VERSION) -> dict:
        """The manifest's tokenizer record; `fingerprint_version` 1 writes it as sets written
        before definition 2 hold it (no `fingerprint_version` key), to resume such a set."""
        if fingerprint_version == FINGERPRINT_VERSION:
            identity = {"fingerprint": self.fingerprint, "fingerprint_version": FINGERPRINT_VERSION}
        else:
            identity = {"fingerprint": self.fingerprint_v1}
        return {
            "name": self.tokenizer.name_or_path,
            **identity,
            "chat_template_hash": self.chat_template_hash,
            "vocab_size": len(self.tokenizer),
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "end_of_turn_source": self.end_of_turn_source,
            **self.settings(),
        }

    def check_model(self, model_dir) -> None:
        """Raise ValueError unless the model in `model_dir` can score this rule's ids: its
        embedding table holds every id, and its own tokenizer (if it ships one) has the same
        fingerprint (same ids mean the same text)."""
        from pathlib import Path

        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        vocab = json.loads((model_dir / "config.json").read_text()).get("vocab_size")
        if vocab is not None and len(self.tokenizer) > vocab:
            raise InputError(f"model {model_dir} has {vocab} embeddings but the tokenizer has {len(self.tokenizer)} tokens")
        if same_tokenizer_files(model_dir, self.tokenizer.name_or_path):
            return  # byte-identical tokenizer files: no need to load and fingerprint them again
        if (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer_config.json").exists():
            theirs = ResponseTokenizer(AutoTokenizer.from_pretrained(str(model_dir)), self.max_length,
                                       self.max_prompt_length, self.end_of_turn_token, self.rule_version)
            if theirs.fingerprint != self.fingerprint:
                raise InputError(f"the tokenizer of {model_dir} differs from the one applied ({self.tokenizer.name_or_path})")

    # -- the rule -----------------------------------------------------------------------------

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        from jinja2.exceptions import TemplateError

        # Tokenizers reject text that is not encodable with a TypeError: name it as a row to skip.
        if any(isinstance(m.get("content"), str) and invalid_text(m["content"]) for m in messages):
            raise Skip("invalid_text", "the conversation holds a lone surrogate (not encodable as UTF-8)")

        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
        except TemplateError as e:  # e.g. a template that refuses a system turn
            raise Skip("template_error", f"the chat template rejects this conversation: {e}") from None
        # The template writes any BOS itself; adding special tokens here would double it.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def response_tokens(self, response: str) -> tuple[list[int], list[int], list[int]]:
        """Response ids with character spans, end-of-turn token last (span = (len, len))."""
        enc = self.tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"]) + [self.end_of_turn_id]
        starts = [int(a) for a, _ in enc["offset_mapping"]] + [len(response)]
        ends = [int(b) for _, b in enc["offset_mapping"]] + [len(response)]
        return ids, starts, ends

    def __call__(self, messages: list[dict], response: str) -> TokenizedResponse:
        if invalid_text(response):
            raise Skip("invalid_text", "the response holds a lone surrogate (not encodable as UTF-8)")
        prompt = self.prompt_ids(messages)
        if len(prompt) > self.max_prompt_length:
            raise Skip("prompt_too_long", f"{len(prompt)} prompt tokens > max_prompt_length {self.max_prompt_length}")
        ids, starts, ends = self.response_tokens(response)
        room = self.max_length - len(prompt)
        truncated = len(ids) > room
        if truncated:
            ids, starts, ends = ids[:room], starts[:room], ends[:room]
        return TokenizedResponse(prompt, ids, starts, ends, truncated)


# -- reading shards under another process's tokenizer (train, eval) -------------------------------


def shards_rule(tokenizer, shard_tokenizer: dict, max_length: int, max_prompt_length: int,
                end_of_turn_token: str | None = None) -> ResponseTokenizer | None:
    """The shards' rule applied by `tokenizer`, or None when that is not the rule they were written
    with (another fingerprint, or their end-of-turn token is not in this vocabulary).

    `shard_tokenizer` is the manifest's record; the rule takes its end-of-turn token (unless one
    is given) and its rule version. With the rule, a reader uses the stored token ids, checked
    with `stored_ids_mismatch`; without it, the reader tokenizes the text itself (or projects)."""
    try:
        rule = ResponseTokenizer(tokenizer, max_length, max_prompt_length,
                                 end_of_turn_token or shard_tokenizer.get("end_of_turn_token"),
                                 rule_version=shard_tokenizer.get("rule_version", 1))
    except ValueError:  # the end-of-turn token is not in this vocabulary
        return None
    return rule if rule.matches(shard_tokenizer) else None


def stored_ids_mismatch(stored: list[int], retokenized: list[int], truncated: bool) -> int | None:
    """None when a row's stored response ids are what re-tokenizing its response under the shards'
    rule gives: all of them, or a prefix when phase one cut the response (`truncated`); else the
    first position where they differ (for the reader's error naming the row)."""
    if retokenized[: len(stored)] == stored and (len(stored) == len(retokenized) or bool(truncated)):
        return None
    return next((i for i, (a, b) in enumerate(zip(retokenized, stored)) if a != b), min(len(retokenized), len(stored)))
