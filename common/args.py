"""`wspo-* [CONFIG.yaml] [--key value ...]`: YAML recipe first, command-line keys override it.

Parsing rules (docs/ecosystem.md):
- keys are matched exactly: `--gamm` is an unknown key, never an abbreviation of `--gamma`;
- an unknown key, on the command line or in the recipe, is a usage error (exit status 2) that
  names the nearest known key when one is close ("did you mean --gamma?");
- the Python API (wspo.api) passes its keywords through the same parser (`parse_keys`), where a
  usage error raises ConfigError instead of exiting;
- a recipe that is not valid YAML names the file and line; a recipe value of the wrong type names
  the file and key (exit status 2, like any other usage error).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from wspo.errors import ConfigError


def nearest_key(name: str, known) -> str | None:
    """The known key closest to a mistyped one (`gama` -> `gamma`), or None when none is close."""
    matches = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return matches[0] if matches else None


class SuggestingParser(argparse.ArgumentParser):
    """An ArgumentParser whose "unrecognized arguments" error names the nearest known option.

    argparse's message is kept as it is; "(did you mean --gamma?)" is appended for each unknown
    `--key` that is close to a real one, including the options of a sub-command (wspo-shards).
    With `raise_errors`, a usage error raises ConfigError instead of printing and exiting (the
    Python API).
    """

    raise_errors = False

    def _option_strings(self) -> list[str]:
        options = [o for action in self._actions for o in action.option_strings]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    options += [o for a in sub._actions for o in a.option_strings]
        return [o for o in options if o.startswith("--")]

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            known = self._option_strings()
            hints = []
            for word in message[len(prefix):].split():
                if word.startswith("--"):
                    close = nearest_key(word.split("=", 1)[0], known)
                    if close:
                        hints.append(f"{word.split('=', 1)[0]}: did you mean {close}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        if self.raise_errors:
            raise ConfigError(message)
        super().error(message)


class KeyParser(SuggestingParser, HfArgumentParser):
    """HfArgumentParser (dataclasses -> keys) with the suggestions and API mode of SuggestingParser."""


def unknown_keys_message(unknown, known, where: str) -> str:
    """`where: unknown key(s) gama (did you mean gamma?)`."""
    hints = [f"{key}: did you mean {close}?" for key in unknown if (close := nearest_key(key, known))]
    return f"{where}unknown key(s) {', '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")


def _recipe_value(parser: argparse.ArgumentParser, where: str, key: str, value, action: argparse.Action):
    """`value` from a recipe (or a Python keyword) converted by the key's command-line type; a usage
    error naming `where` and the key if it does not fit.

    argparse only converts string defaults, so without this check `gamma: [0.5]` would reach the
    dataclass as a list and `max_steps: "ten"` would fail later without naming the recipe.
    """
    if value is None:
        return None
    takes_list = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if takes_list and not isinstance(value, (list, tuple)):
        value = [value]
    items = list(value) if takes_list else [value]
    converted = []
    for item in items:
        if isinstance(item, (list, tuple, dict)):
            parser.error(f"{where}key {key}: expected a single value, got {item!r}")
        if action.type is None:
            converted.append(item)
            continue
        try:
            # YAML has already typed the value; its text form goes through the same conversion as
            # the command line (so `5` is fine for a float, `0.5` is not an int, `"ten"` is neither).
            item = action.type(item if isinstance(item, str) else str(item))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            type_name = getattr(action.type, "__name__", str(action.type))
            parser.error(f"{where}key {key}: invalid {type_name} value {value!r}")
        if action.choices is not None and item not in action.choices:
            parser.error(f"{where}key {key}: {value!r} is not one of {list(action.choices)}")
        converted.append(item)
    return converted if takes_list else converted[0]


def _read_recipe(parser: argparse.ArgumentParser, path: Path) -> dict:
    if not path.is_file():
        parser.error(f"config file {path} does not exist")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        parser.error(f"config file {path}{line}: {problem}")
    if not isinstance(recipe, dict):
        parser.error(f"config file {path} must hold a mapping of key: value")
    return recipe


def _set_keys(parser: argparse.ArgumentParser, values: dict, where: str) -> None:
    """Make `values` (a recipe, or the Python API's keywords) the parser's defaults, checked and
    converted like the command line; a key they set is no longer required on the command line."""
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    unknown = sorted(str(key) for key in set(values) - set(actions))
    if unknown:
        parser.error(unknown_keys_message(unknown, actions, where))
    values = {key: _recipe_value(parser, where, key, value, actions[key]) for key, value in values.items()}
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values:
            action.required = False


def _dataclasses(parser: HfArgumentParser, argv: list[str]) -> tuple:
    # HfArgumentParser reports leftover keys with a ValueError after building (and validating) the
    # dataclasses; an unknown key is a usage error first, so argparse sees the command line alone.
    parser.parse_args(argv)
    try:
        return tuple(parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False))
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own check (ours or TrainingArguments'): a key's value
        raise ConfigError(str(e)) from e


def is_recipe(value) -> bool:
    return isinstance(value, (str, Path)) and not str(value).startswith("-") and str(value).endswith((".yaml", ".yml"))


def parse_config(dataclass_types, argv: list[str] | None = None, description: str | None = None,
                 prog: str | None = None):
    """Parse `[CONFIG.yaml] [--key value ...]` into instances of `dataclass_types`.

    The YAML file's keys become the parser's defaults, so any key given on the command line wins
    and `--help` lists every key. An unknown key (file or command line) or a recipe value of the
    wrong type is a usage error naming it, and the nearest known key (exit status 2). A value the
    dataclasses refuse is a ConfigError (the CLIs print it and exit 1).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = KeyParser(dataclass_types, description=description, prog=prog, allow_abbrev=False)
    if argv and is_recipe(argv[0]):
        path = Path(argv.pop(0))
        _set_keys(parser, _read_recipe(parser, path), f"config file {path}: ")
    return _dataclasses(parser, argv)


def parse_keys(dataclass_types, recipe: str | Path | None = None, keys: dict | None = None, prog: str | None = None):
    """The Python API's twin of `parse_config`: `recipe` (a YAML path, or None) and then `keys`
    (Python values, which win over the recipe) go through the same parser, conversions and checks
    as the command line. Every usage error raises ConfigError with the command line's message."""
    parser = KeyParser(dataclass_types, prog=prog, allow_abbrev=False)
    parser.raise_errors = True
    if recipe is not None:
        path = Path(recipe)
        _set_keys(parser, _read_recipe(parser, path), f"config file {path}: ")
    _set_keys(parser, dict(keys or {}), "")
    return _dataclasses(parser, [])
