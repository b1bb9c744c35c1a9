"""One writer per worker of a shard set: a lock file in `output_dir` naming its holder.

Two `wspo-precompute` runs of the same worker on the same `output_dir` at once would write the
same part files; the second is refused, naming the first (host, pid, start time). A lock left by a
process that died (same host, pid gone) is taken over, saying so. A launcher that retries its own
dead tasks (Ray) passes an `owner` id: a task with the same owner takes the lock over wherever the
previous attempt ran, since the launcher only retries a task whose attempt is dead.

On an object store (`output_dir` a URL) the lock is an object created with a conditional write
(`If-None-Match: *` on S3): of two workers creating it at once exactly one succeeds. Where the
store has no conditional write, fsspec checks then writes, and the lock is read back after
writing: a narrow window remains in which both could start (docs/cluster.md).

`wspo-train` holds the same lock on its own output_dir (wspo.train.identity), so it lives here,
beside the storage it writes to, not in either phase.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import datetime, timezone

from wspo.errors import WspoError
from .storage import AnyPath, create_exclusive


class LockError(WspoError):
    """Another run holds this worker's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    def __init__(self, out: AnyPath, worker_index: int, owner: str | None = None, command: str = "wspo-precompute",
                 name: str | None = None):
        self.path = out / (name or f".lock-{worker_index:05d}")
        self.owner = owner
        self.command = command
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "owner": owner,
                       "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def _try_create(self) -> bool:
        return create_exclusive(self.path, json.dumps(self.holder).encode())

    def __enter__(self) -> "OutputLock":
        if self._try_create():
            return self
        try:
            other = json.loads(self.path.read_text())
        except (OSError, ValueError):
            other = {}
        same_launch = self.owner is not None and other.get("owner") == self.owner
        dead_here = other.get("host") == self.holder["host"] and isinstance(other.get("pid"), int) and not _alive(other["pid"])
        # This very process left it: an earlier run in it could not remove it (a read-only remount,
        # a full disk). No other run can hold our pid on our host.
        left_here = other.get("host") == self.holder["host"] and other.get("pid") == os.getpid()
        if not (same_launch or dead_here or left_here):
            raise LockError(
                f"{self.path} is held by another {self.command} (pid {other.get('pid', '?')} on host "
                f"{other.get('host', '?')}, since {other.get('since', '?')}): two runs cannot write the same "
                "output_dir (or worker of a shard set) at once. Wait for it to finish; if that process is gone, delete the lock file."
            )
        print(f"{self.path}: taking over the lock of a run that is gone (pid {other.get('pid')} on "
              f"{other.get('host')}, since {other.get('since')})", file=sys.stderr)
        self.path.unlink(missing_ok=True)
        if not self._try_create():
            raise LockError(f"{self.path} was taken by another run at the same moment; try again")
        return self

    def __exit__(self, *exc) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError, WspoError):  # a store that fails now must not hide the run's own error
            pass
