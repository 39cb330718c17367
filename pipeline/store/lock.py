"""One writer per run: an exclusive lock file beside the run, naming its holder.

`writing(url)` is held by the process that drives a write (`qkatlas extract`, `reduce`,
`heads`, or the client of `qkatlas run`, whose Dask tasks write under it). A second writer is
refused with the holder's pid, host and start time; a lock whose process is gone (same host)
is taken over. On object stores the lock is best effort (no atomic create there)."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import time

from pipeline.store.layout import RunDir
from pipeline.store.manifest import StoreError


def lock_path(run: RunDir) -> str:
    parent, name = posixpath.split(run.root.rstrip("/"))
    return posixpath.join(parent, f".{name}.qkatlas-lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(run: RunDir, path: str) -> dict | None:
    try:
        with run.fs.open(path, "rb") as handle:
            return json.loads(handle.read() or b"{}")
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}


def _stale(holder: dict) -> bool:
    return holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0)))


def _create_local(path: str, body: bytes) -> bool:
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(body)
    return True


def acquire(run: RunDir, command: str) -> str:
    path = lock_path(run)
    body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                       "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
    run.fs.makedirs(posixpath.dirname(path), exist_ok=True)
    for _ in range(3):
        if run.is_local:
            if _create_local(path, body):
                return path
        elif not run.fs.exists(path):
            run.fs.pipe_file(path, body)
            return path
        holder = _holder(run, path)
        if holder is None:
            continue
        if _stale(holder):
            run.fs.rm(path)  # its writer is gone; what it left uncommitted is never read
            continue
        raise StoreError(f"run {run.url} is being written by pid {holder.get('pid', '?')} on host "
                         f"{holder.get('host', '?')} since {holder.get('since', '?')} ({holder.get('command', '?')}); "
                         f"wait for it, or remove {path} if that process is gone")
    raise StoreError(f"could not take the lock {path}; try again")


def release(run: RunDir, path: str) -> None:
    holder = _holder(run, path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        run.fs.rm(path)


@contextlib.contextmanager
def writing(url: str | os.PathLike | RunDir, command: str = "qkatlas"):
    """Hold the run's write lock for the block; yields the RunDir."""
    run = url if isinstance(url, RunDir) else RunDir(url)
    try:
        path = acquire(run, command)
    except OSError as error:
        raise StoreError(f"cannot write the run at {run.url}: {error.strerror or error}; "
                         "choose a writable --out") from None
    try:
        yield run
    finally:
        release(run, path)
