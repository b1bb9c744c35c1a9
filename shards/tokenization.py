"""The tokenization rule both phases share (DESIGN section 3).

    prompt ids   = chat template over the messages before the response, generation prompt added
    response ids = the response text tokenized alone (no special tokens), with character
                   offsets, then the end-of-turn token
    sequence     = prompt ids + response ids; only response positions are scored and trained

Phase one stores `token_ids`; phase two re-tokenizes each row with the same function and, when the
tokenizer fingerprints match, must get exactly the stored ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources

RULE_VERSION = 1


def fallback_chat_template() -> str:
    """The plain template for tokenizers that ship none (configs/fallback_chat_template.jinja)."""
    return resources.files("wspo.configs").joinpath("fallback_chat_template.jinja").read_text()


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


class ResponseTokenizer:
    """Applies the rule with one Hugging Face (fast) tokenizer.

    `end_of_turn_token` defaults to the tokenizer's eos token. `max_prompt_length` bounds the
    prompt (longer prompts are skipped); `max_length` bounds prompt + response (responses are cut
    and flagged truncated).
    """

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int, end_of_turn_token: str | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer; the rule needs "
                "character offsets (install `tokenizers` and load with use_fast=True)"
            )
        if max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.chat_template = tokenizer.chat_template or fallback_chat_template()
        self.uses_fallback_template = tokenizer.chat_template is None
        eot = end_of_turn_token or tokenizer.eos_token
        if eot is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no eos token: set end_of_turn_token"
            )
        eot_id = tokenizer.convert_tokens_to_ids(eot)
        if eot_id is None or eot_id == tokenizer.unk_token_id:
            raise ValueError(f"end_of_turn_token {eot!r} is not in the vocabulary of {tokenizer.name_or_path!r}")
        self.end_of_turn_token = eot
        self.end_of_turn_id = int(eot_id)

    # -- identity -----------------------------------------------------------------------------

    def settings(self) -> dict:
        """What decides the token ids of a row, besides the text (part of the fingerprint)."""
        return {
            "rule_version": RULE_VERSION,
            "end_of_turn_token": self.end_of_turn_token,
            "end_of_turn_id": self.end_of_turn_id,
            "fallback_chat_template": self.uses_fallback_template,
        }

    @property
    def chat_template_hash(self) -> str:
        return hashlib.sha256(self.chat_template.encode()).hexdigest()

    @property
    def fingerprint(self) -> str:
        """sha256 of vocabulary + normalisation/pre-tokenisation + chat template + rule settings.

        Truncation and padding settings of the tokenizer file are left out: they do not change
        the ids this rule produces, and two copies of one tokenizer often differ there.
        """
        backend = json.loads(self.tokenizer.backend_tokenizer.to_str())
        backend.pop("truncation", None)
        backend.pop("padding", None)
        blob = json.dumps(
            {"tokenizer": backend, "chat_template": self.chat_template, "rule": self.settings()},
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe(self) -> dict:
        return {
            "name": self.tokenizer.name_or_path,
            "fingerprint": self.fingerprint,
            "chat_template_hash": self.chat_template_hash,
            "vocab_size": len(self.tokenizer),
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
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
            raise ValueError(f"model {model_dir} has {vocab} embeddings but the tokenizer has {len(self.tokenizer)} tokens")
        if (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer_config.json").exists():
            theirs = ResponseTokenizer(AutoTokenizer.from_pretrained(str(model_dir)), self.max_length,
                                       self.max_prompt_length, self.end_of_turn_token)
            if theirs.fingerprint != self.fingerprint:
                raise ValueError(f"the tokenizer of {model_dir} differs from the one applied ({self.tokenizer.name_or_path})")

    # -- the rule -----------------------------------------------------------------------------

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        from jinja2.exceptions import TemplateError

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
        prompt = self.prompt_ids(messages)
        if len(prompt) > self.max_prompt_length:
            raise Skip("prompt_too_long", f"{len(prompt)} prompt tokens > max_prompt_length {self.max_prompt_length}")
        ids, starts, ends = self.response_tokens(response)
        room = self.max_length - len(prompt)
        truncated = len(ids) > room
        if truncated:
            ids, starts, ends = ids[:room], starts[:room], ends[:room]
        return TokenizedResponse(prompt, ids, starts, ends, truncated)
