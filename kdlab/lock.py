"""One writer per run directory: a `.lock` file naming its owner (host and pid).

On POSIX the owner also holds an exclusive flock on that file for as long as it lives; the kernel
drops it the moment the process dies, however it dies, so a lock left by a killed run is taken
over even when its pid has since been reused by an unrelated process. Without flock (Windows) a
lock is stale once the pid it names is gone. A lock naming another host is never broken: the
process there cannot be checked from here.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from kdlab.errors import KdlabError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".lock"


class BusyError(KdlabError):
    """The directory is locked by a live process on this host."""


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return True


class RunLock:
    """`wait=True`: a directory busy in another process on this host is waited for (a shared teacher
    that another run is training), with one message through `say`, instead of refused."""

    POLL_SECONDS = 2.0

    def __init__(self, run_dir: str | Path, wait: bool = False, say: Callable[[str], None] | None = None):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False
        self.wait, self.say = wait, say
        self._fd: int | None = None

    def owner(self) -> tuple[str, int] | None:
        try:
            host, pid = self.path.read_text().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None

    def _refuse_if_owned_elsewhere(self, flock_free: bool) -> None:
        owner = self.owner()
        if owner is None:
            return
        host, pid = owner
        if host != socket.gethostname():
            raise KdlabError(
                f"{self.path.parent} is locked by {host} pid {pid}; remove {self.path} if that run is gone"
            )
        if not flock_free and pid != os.getpid():
            raise BusyError(
                f"{self.path.parent} is in use by another kdlab process (pid {pid}); wait for it or use another --out"
            )

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KdlabError(f"cannot create the run directory {self.path.parent}: {e.strerror or e}") from None
        if not self.path.parent.is_dir():
            raise KdlabError(f"{self.path.parent} is not a directory")
        told = False
        while True:
            try:
                if fcntl is None:
                    self._acquire_by_pid()
                else:
                    self._acquire_by_flock()
                return
            except BusyError:
                if not self.wait:
                    raise
                if not told and self.say is not None:
                    owner = self.owner()
                    who = f" (pid {owner[1]})" if owner else ""
                    self.say(
                        f"{self.path.parent} is in use by another kdlab process{who} (a shared teacher being trained); "
                        "waiting for it to finish, then its result is used"
                    )
                    told = True
                time.sleep(self.POLL_SECONDS)
            except OSError as e:
                raise KdlabError(f"cannot lock {self.path.parent}: {e.strerror or e}") from None

    def _acquire_by_flock(self) -> None:
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                self._refuse_if_owned_elsewhere(flock_free=False)
                raise BusyError(
                    f"{self.path.parent} is in use by another kdlab process; wait for it or use another --out"
                ) from None
            # the previous holder may have unlinked the file between our open and our flock
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                self._refuse_if_owned_elsewhere(flock_free=True)
                os.ftruncate(fd, 0)
                os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
            except BaseException:
                os.close(fd)
                raise
            self._fd, self.held = fd, True
            return
        raise KdlabError(f"could not lock {self.path.parent} (its lock file keeps changing)")

    def _acquire_by_pid(self) -> None:  # pragma: no cover - Windows
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                self._refuse_if_owned_elsewhere(flock_free=owner is None or not pid_alive(owner[1]))
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return
        raise KdlabError(f"could not lock {self.path.parent}")

    def release(self) -> None:
        if not self.held:
            return
        # unlink while still holding the flock: a waiter that opened the old file sees it vanish and retries
        self.path.unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
