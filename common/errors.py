"""The one exception base of the toolkit, and its kinds.

Every failure the toolkit reports to a user (bad input, a shard set that does not verify, a
non-finite loss, a held lock, ...) is a `WspoError` carrying a message that names the file, row,
key or option and what to do. The CLIs print it as one line and exit non-zero; Python callers
catch `wspo.WspoError` (or one of its subclasses) without knowing which module raised it.

The kinds below are shared by every command; each phase adds its own (`ShardError` in
wspo.shards.store, `PrecomputeError`, `DataError`, `CheckpointError`, `EvalError`, `LockError`,
`OutputPathError`, ...). Kinds that replace a built-in exception also subclass it, so code
written against the built-in (`except ValueError`) keeps working.
"""

from __future__ import annotations


class WspoError(Exception):
    """A failure with a message for the user; never a library traceback."""


class ConfigError(WspoError, ValueError):
    """A key or option whose value cannot be used (unknown key, wrong type, out of range, contradiction)."""


class InputPathError(WspoError, FileNotFoundError):
    """A path given by a key (model, dataset, adapter, recipe) is missing or is not what the key needs."""


class InputError(WspoError, ValueError):
    """An input file exists but cannot be read as what it should be (corrupt weights, invalid JSON, ...)."""


class NonFiniteError(WspoError):
    """NaN or inf where the toolkit needs finite numbers (scores, a loss, a gradient norm, weights)."""


class OutputExistsError(WspoError, FileExistsError):
    """An output that already exists and would be replaced without the command's --overwrite."""
