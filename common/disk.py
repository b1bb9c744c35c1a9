"""A full disk, a used-up quota, a read-only file system or a file-size limit, named (DESIGN section 7).

Every command writes its files under a temporary name and renames them when whole (checkpoints:
`trainer_state.json` last), so a write that fails half-way leaves nothing that looks complete and
a rerun resumes from what was finished. What remains is to say so instead of a traceback from
pyarrow, torch or safetensors, which report the same errno in different ways: an `OSError`
(Python, pyarrow), a Rust `(os error 28)` (safetensors, tokenizers), only the errno's text inside
another exception, or nothing at all: `torch.save` on a full disk raises
`RuntimeError: [enforce fail at inline_container.cc] . unexpected pos ...`. `disk_message` finds
the errno wherever it is; for a failed write that names none, it looks at the output's file
system (read-only, nearly no space left, a file-size limit set). It names the path, what
happened and what to do; each CLI prints it as its one-line error.
"""

from __future__ import annotations

import errno
import os
import re
import resource
from pathlib import Path

from wspo.errors import WspoError

# errno -> (what happened, what to do)
DISK_ERRNOS = {
    errno.ENOSPC: ("the disk is full", "free space there or choose an output folder on another disk"),
    errno.EDQUOT: ("the disk quota is used up", "free space within your quota, ask for a larger one, or write elsewhere"),
    errno.EROFS: ("the file system is read-only (mounted or remounted read-only)",
                  "remount it read-write or choose an output folder elsewhere"),
    errno.EFBIG: ("the file would exceed this process's file-size limit (ulimit -f)",
                  "raise the limit (ulimit -f unlimited) or write where files may be larger"),
}
_TEXTS = {os.strerror(n): n for n in DISK_ERRNOS}  # "No space left on device", ...
_CODE = re.compile(r"(?:os error|code:|errno)\s*(\d+)", re.IGNORECASE)
# A failed write whose exception names no errno (torch's stream writer, C++ iostreams).
_WRITE_FAILURE = re.compile(r"inline_container|PytorchStreamWriter|iostream error|file write failed", re.IGNORECASE)
LOW_SPACE_BYTES = 64 * 2**20  # less free space than this after a failed write: the disk is full


class DiskError(WspoError, OSError):
    """Writing failed for want of space, quota, a writable file system or a larger file limit."""


def disk_errno(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, path or None) when `exc`, or an exception it came from, is one of DISK_ERRNOS."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return exc.errno, exc.filename
        text = str(exc)
        for code in _CODE.findall(text):
            if int(code) in DISK_ERRNOS:
                return int(code), None
        for words, code in _TEXTS.items():
            if words in text:
                return code, None
        exc = exc.__cause__ or exc.__context__
    return None


def filesystem_errno(where) -> int | None:
    """Why a write under `where` may have failed without saying so: its file system is read-only,
    (nearly) full, or this process has a file-size limit. None when none of these holds."""
    if where is None:
        return None
    path = Path(str(where)).expanduser().absolute()
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None:
        return None
    stats = os.statvfs(existing)
    if stats.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if stats.f_bavail * stats.f_frsize < LOW_SPACE_BYTES:
        return errno.ENOSPC
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return errno.EFBIG
    return None


def disk_message(exc: BaseException, where, then: str) -> str | None:
    """The one-line message for a disk fault while writing under `where` (None for any other
    failure). `then` says what the rerun does with what was already written."""
    found = disk_errno(exc)
    if found is None and any(_WRITE_FAILURE.search(str(e)) for e in (exc, exc.__context__, exc.__cause__) if e):
        code = filesystem_errno(where)
        found = (code, None) if code is not None else None
    if found is None:
        return None
    code, path = found
    what, todo = DISK_ERRNOS[code]
    return f"cannot write {path or where}: {what} ({errno.errorcode[code]}). {todo[0].upper()}{todo[1:]}, then {then}"


def error_text(exc: BaseException, known: tuple, where, then: str) -> str:
    """A CLI's one-line error for `exc`: a disk fault as `disk_message` names it, a `known`
    (user-facing) error as it is; anything else is a bug and is raised again."""
    if isinstance(exc, DiskError):  # already named where it happened
        return str(exc)
    message = disk_message(exc, where, then)
    if message is not None:
        return message
    if isinstance(exc, known):
        return str(exc)
    raise exc
