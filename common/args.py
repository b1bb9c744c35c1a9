"""`wspo-* [CONFIG.yaml] [--key value ...]`: YAML recipe first, command-line keys override it."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser


def parse_config(dataclass_types, argv: list[str] | None = None, description: str | None = None):
    """Parse `[CONFIG.yaml] [--key value ...]` into instances of `dataclass_types`.

    The YAML file's keys become the parser's defaults, so any key given on the command line wins
    and `--help` lists every key. An unknown key in the YAML file is an error naming it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types, description=description)
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        path = Path(argv.pop(0))
        if not path.is_file():
            parser.error(f"config file {path} does not exist")
        recipe = yaml.safe_load(path.read_text()) or {}
        if not isinstance(recipe, dict):
            parser.error(f"config file {path} must hold a mapping of key: value")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(recipe) - known)
        if unknown:
            parser.error(f"config file {path}: unknown key(s) {', '.join(unknown)}")
        parser.set_defaults(**recipe)
        # A key the recipe sets is no longer required on the command line.
        for action in parser._actions:
            if action.dest in recipe:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
