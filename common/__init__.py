"""wspo: weak-to-strong alignment in two phases (see README and DESIGN)."""

__version__ = "0.1.0"

from wspo.errors import WspoError  # noqa: E402  (the one exception base; see errors.py)
