"""The store's one writer lock: a lease object, `locks/writer.json`, that works on a local disk and on
an object store alike.

    acquire:  read the lease ── held by someone else and not expired? ──> StoreLocked (names the holder)
                 │ free, expired, or its local process is gone
                 v
              write our lease (owner id, purpose, host, pid, expiry) ── wait SETTLE_S ── read it back
                 │ still ours: held                         │ someone else's: they won the race -> StoreLocked
                 v
              renew every TTL/3 in a daemon thread; delete at release (only if still ours)

Object stores give read-after-write consistency but no compare-and-swap through pyarrow, so two
writers racing for a free lease both write and the later write wins; each reads back after a settle
time longer than any write takes, so only the winner goes on. On a local disk the read-and-write is
serialised by `flock` on the store's directory instead (no file is created for it), so there is no
race to settle and no wait. A killed holder's lease expires after TTL_S; on the holder's own host a
dead pid frees it at once.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from imoe_ray.store.store import Store, StoreError

LOCK = ("locks", "writer.json")
TTL_S = 60.0
SETTLE_S = 0.5


class StoreLocked(StoreError):
    """Another writer holds the store."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """`with StoreLock(store, "imoe build"):` — see the module's docstring."""

    def __init__(self, store: Store, purpose: str, wait_s: float = 0.0, ttl_s: float = TTL_S):
        self.store, self.purpose, self.wait_s, self.ttl_s = store, purpose, wait_s, ttl_s
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _lease(self) -> dict:
        return {"owner": self.owner, "purpose": self.purpose, "host": socket.gethostname(), "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "expires": time.time() + self.ttl_s}

    def _current(self) -> dict | None:
        try:
            return self.store.read_json(*LOCK) if self.store.is_file(*LOCK) else None
        except (StoreError, ValueError):
            return None  # half-visible or garbled: treat as free, the read-back decides

    def _is_free(self, lease: dict | None) -> bool:
        if lease is None or lease.get("owner") == self.owner:
            return True
        if float(lease.get("expires", 0)) < time.time():
            return True
        return lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", -1)))

    def _refusal(self, lease: dict) -> StoreLocked:
        left = max(0, int(float(lease.get("expires", 0)) - time.time()))
        return StoreLocked(f"the store {self.store.uri} is locked by {lease.get('purpose', 'another writer')!r} "
                           f"(pid {lease.get('pid')} on {lease.get('host')}, since {lease.get('since')}); "
                           f"try again when it is done (a lease whose holder died expires within {left}s)")

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """On a local disk: one process at a time between reading the lease and writing its own."""
        if not self.store.is_local:
            yield
            return
        fd = os.open(self.store.local_path(), os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _try_take(self) -> dict | None:
        """Write our lease if the current one is free; returns the lease that holds the store after."""
        with self._exclusive():
            lease = self._current()
            if not self._is_free(lease):
                return lease
            self.store.write_json(self._lease(), *LOCK)
        if not self.store.is_local:
            time.sleep(SETTLE_S)  # a racing writer's lease may still land: the last write wins
        return self._current()

    def acquire(self) -> None:
        deadline = time.time() + self.wait_s
        while True:
            lease = self._try_take()
            if lease and lease.get("owner") == self.owner:
                break
            if time.time() >= deadline:
                raise self._refusal(lease or {})
            time.sleep(min(1.0, max(0.0, deadline - time.time())))
        self._renewer = threading.Thread(target=self._renew, name="imoe-store-lock", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            lease = self._current()
            if lease and lease.get("owner") == self.owner:
                self.store.write_json(self._lease() | {"since": lease.get("since")}, *LOCK)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        lease = self._current()
        if lease and lease.get("owner") == self.owner:
            self.store.remove(*LOCK)

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
