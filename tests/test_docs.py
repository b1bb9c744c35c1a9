"""Every command-line key of every `wspo-*` command is documented somewhere under `docs/`.

The keys are read from each command's own `--help` (so a key added to a dataclass or parser
without a docs entry fails here); `wspo-train`'s inherited `transformers.TrainingArguments` keys
are the Trainer's and documented by transformers, so only the toolkit's own keys are required.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from transformers import TrainingArguments

ROOT = Path(__file__).resolve().parents[1]
DOCS = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md")))

COMMANDS = {
    "wspo-precompute": ("wspo.precompute.cli", []),
    "wspo-train": ("wspo.train.cli", []),
    "wspo-eval rewards": ("wspo.evaluation.cli", ["rewards"]),
    "wspo-eval generate": ("wspo.evaluation.cli", ["generate"]),
    "wspo-extrapolate": ("wspo.extrapolate.cli", []),
    "wspo-export": ("wspo.train.export", []),
    "wspo-shards info": ("wspo.shards.cli", ["info"]),
    "wspo-shards verify": ("wspo.shards.cli", ["verify"]),
    "wspo-shards head": ("wspo.shards.cli", ["head"]),
    "wspo-shards project": ("wspo.shards.cli", ["project"]),
    "wspo-shards export": ("wspo.shards.cli", ["export"]),
}


def help_keys(module: str, prefix: list[str], capsys) -> set[str]:
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit):
        main(prefix + ["--help"])
    text = capsys.readouterr().out
    keys = {m.group(1) for m in re.finditer(r"(?<![\w-])--([A-Za-z][\w-]*)", text)}
    return keys - {"help"}


def documented(key: str) -> bool:
    # `key`, --key, or `key` in a table cell listing several keys ("`lora_r`, `lora_alpha`").
    variants = {key, key.replace("-", "_"), key.replace("_", "-")}
    return any(re.search(rf"(`|--){re.escape(v)}(`|\b)", DOCS) for v in variants)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_cli_key_is_documented(command, capsys):
    module, prefix = COMMANDS[command]
    keys = help_keys(module, prefix, capsys)
    assert f"{command}" in DOCS, f"{command} is not documented under docs/"
    if command == "wspo-train":
        trainer_keys = {f.name for f in dataclasses.fields(TrainingArguments)}
        # `--no_<flag>` is the parser's negation of a TrainingArguments boolean.
        keys = {k for k in keys if k.replace("-", "_").removeprefix("no_") not in trainer_keys}
    missing = sorted(k for k in keys if not documented(k))
    assert not missing, f"{command}: keys missing from docs/*.md: {missing}"
