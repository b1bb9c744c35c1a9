"""The one exception base of the toolkit.

Every failure the toolkit reports to a user (bad input, a shard set that does not verify, a
non-finite loss, a held lock, ...) is a `WspoError` carrying a message that names the file, row,
key or option and what to do. The CLIs print it as one line and exit non-zero; Python callers
catch `wspo.WspoError` (or one of its subclasses) without knowing which module raised it.
"""

from __future__ import annotations


class WspoError(Exception):
    """A failure with a message for the user; never a library traceback."""
