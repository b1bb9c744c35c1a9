"""wspo: weak-to-strong alignment in two phases (see README and DESIGN).

The Python API (docs/api.md) is the command line's twin:

    wspo.precompute(**keys) -> ShardSet     wspo.train(**keys) -> TrainResult
    wspo.extrapolate(**keys)                wspo.evaluate_rewards(**keys) -> dict
    wspo.load_shards(path) -> ShardSet      wspo.WspoError: the base of every error

Names are resolved on first use, so `import wspo` stays light (no torch).
"""

__version__ = "0.1.0"

from wspo.errors import WspoError  # noqa: E402  (the one exception base; see errors.py)

# `precompute`, `train` and `extrapolate` are the callable subpackages (wspo.api.CallableModule).
_SUBPACKAGES = ("precompute", "train", "extrapolate")
_API = ("evaluate_rewards", "load_shards", "TrainResult")

__all__ = ["WspoError", *_SUBPACKAGES, *_API, "ShardSet"]


def __getattr__(name: str):
    import importlib

    if name in _SUBPACKAGES:
        return importlib.import_module(f"wspo.{name}")
    if name in _API:
        return getattr(importlib.import_module("wspo.api"), name)
    if name == "ShardSet":
        return importlib.import_module("wspo.shards.store").ShardSet
    raise AttributeError(f"module 'wspo' has no attribute {name!r}")
