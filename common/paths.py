"""Outputs never overwrite inputs (DESIGN section 7).

Every command that writes calls `check_output` before it writes anything: an output folder that
is, contains or lies inside one of the command's input folders (models, adapters, shard sets,
datasets) is refused naming both, as is an output path that is an existing file where a folder
is expected, or one whose nearest existing folder cannot be written. Inputs that are not local
paths (hub names) are left out.
"""

from __future__ import annotations

import os
from pathlib import Path

from wspo.errors import WspoError


class OutputPathError(WspoError, ValueError):
    """An output path that would overwrite an input or cannot be written."""


def _local(value) -> Path | None:
    if not value:
        return None
    path = Path(str(value)).expanduser()
    return path.resolve() if path.exists() else None


def check_output(output, inputs: dict, option: str = "output_dir", is_file: bool = False) -> Path:
    """Refuse `output` (a folder, or a file with `is_file`) that would write into or over an input.

    `inputs` maps option names to a path, a list of paths, or None.
    """
    out = Path(str(output)).expanduser().resolve()
    for name, values in inputs.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            source = _local(value)
            if source is None:
                continue
            if out == source:
                relation = "is"
            elif source in out.parents:
                relation = "lies inside"
            elif out in source.parents and not is_file:
                relation = "contains"
            else:
                continue
            raise OutputPathError(
                f"{option} {out} {relation} the input {name} {source}: writing there would overwrite or mix with "
                f"the input; choose another {option} (nothing was written)"
            )
    if out.exists() and not is_file and not out.is_dir():
        raise OutputPathError(f"{option} {out} is an existing file, not a folder")
    if out.exists() and is_file and out.is_dir():
        raise OutputPathError(f"{option} {out} is a folder, not a file")
    existing = next(p for p in [out, *out.parents] if p.exists())
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {out} cannot be written: {existing} is read-only for this user")
    if existing.is_file() and existing != out:
        raise OutputPathError(f"{option} {out} cannot be created: {existing} is a file")
    return out
