"""`wspo-* [CONFIG.yaml] [--key value ...]`: YAML recipe first, command-line keys override it.

Parsing rules (docs/ecosystem.md):
- keys are matched exactly: `--gamm` is an unknown key, never an abbreviation of `--gamma`;
- an unknown key, on the command line or in the recipe, is a usage error (exit status 2);
- a recipe that is not valid YAML names the file and line; a recipe value of the wrong type names
  the file and key (exit status 2, like any other usage error).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser


def _recipe_value(parser: argparse.ArgumentParser, path: Path, key: str, value, action: argparse.Action):
    """`value` from the recipe converted by the key's command-line type; a usage error if it does not fit.

    argparse only converts string defaults, so without this check `gamma: [0.5]` would reach the
    dataclass as a list and `max_steps: "ten"` would fail later without naming the recipe.
    """
    if value is None:
        return None
    takes_list = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if takes_list and not isinstance(value, list):
        value = [value]
    items = value if takes_list else [value]
    converted = []
    for item in items:
        if isinstance(item, (list, dict)):
            parser.error(f"config file {path}: key {key}: expected a single value, got {item!r}")
        if action.type is None:
            converted.append(item)
            continue
        try:
            # YAML has already typed the value; its text form goes through the same conversion as
            # the command line (so `5` is fine for a float, `0.5` is not an int, `"ten"` is neither).
            item = action.type(item if isinstance(item, str) else str(item))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            type_name = getattr(action.type, "__name__", str(action.type))
            parser.error(f"config file {path}: key {key}: invalid {type_name} value {value!r}")
        if action.choices is not None and item not in action.choices:
            parser.error(f"config file {path}: key {key}: {value!r} is not one of {list(action.choices)}")
        converted.append(item)
    return converted if takes_list else converted[0]


def parse_config(dataclass_types, argv: list[str] | None = None, description: str | None = None,
                 prog: str | None = None):
    """Parse `[CONFIG.yaml] [--key value ...]` into instances of `dataclass_types`.

    The YAML file's keys become the parser's defaults, so any key given on the command line wins
    and `--help` lists every key. An unknown key (file or command line) or a recipe value of the
    wrong type is a usage error naming it (exit status 2).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types, description=description, prog=prog, allow_abbrev=False)
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        path = Path(argv.pop(0))
        if not path.is_file():
            parser.error(f"config file {path} does not exist")
        try:
            recipe = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or "not valid YAML"
            parser.error(f"config file {path}{where}: {problem}")
        if not isinstance(recipe, dict):
            parser.error(f"config file {path} must hold a mapping of key: value")
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(str(key) for key in set(recipe) - set(actions))
        if unknown:
            parser.error(f"config file {path}: unknown key(s) {', '.join(unknown)}")
        recipe = {key: _recipe_value(parser, path, key, value, actions[key]) for key, value in recipe.items()}
        parser.set_defaults(**recipe)
        # A key the recipe sets is no longer required on the command line.
        for action in parser._actions:
            if action.dest in recipe:
                action.required = False
    # HfArgumentParser reports leftover keys with a ValueError after building (and validating) the
    # dataclasses; an unknown key is a usage error first, so argparse sees the command line alone.
    parser.parse_args(argv)
    return tuple(parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False))
