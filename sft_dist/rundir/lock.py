"""One run per output directory: `output_dir/.sft-dist.lock`, held for the whole run.

Two runs writing the same output_dir interleave their metrics and overwrite each other's checkpoints, and
both exit 0. The lock is a small JSON file created with O_CREAT|O_EXCL (atomic on local file systems and on
NFSv3+/CephFS/Lustre/EFS), naming its holder: host, pid, start time and a run token. While held, a thread
refreshes its mtime every HEARTBEAT_S seconds.

A lock is stale, and is taken over with a line saying so, when its holder is gone:
- on the same host, its pid no longer runs (or runs another program);
- on another host, its mtime is older than STALE_S (no heartbeat: the holder died or lost the volume).
Attempts of the same run (Ray retries a worker group, torchrun restarts its workers, the local launcher's
workers) carry the holder's token (SFT_DIST_LOCK_TOKEN) and adopt the lock instead of being refused.
Takeover renames the stale file away first: of two runs racing for it, one rename wins.

The lock covers output_dir, where every run writes its config, metrics and (by default) checkpoints. With
`checkpoint.dir` on an object store (s3://, gs://), a second run with another output_dir but the same
checkpoint.dir is not locked out: object stores have no atomic create through fsspec.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sft_dist.distributed.lifecycle import pid_alive
from sft_dist.errors import SftDistError

log = logging.getLogger("sft_dist")

LOCK = ".sft-dist.lock"
TOKEN_ENV = "SFT_DIST_LOCK_TOKEN"
HEARTBEAT_S = 10.0
STALE_S = 60.0


class RunDirBusy(SftDistError):
    """Another live run holds the output directory."""


@dataclass
class Holder:
    host: str
    pid: int
    started: str
    token: str
    command: str = ""

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}" + (f" ({self.command})" if self.command else "")


class RunLock:
    """The lock on one output directory. `acquire()` raises RunDirBusy naming the holder; `release()` removes
    it only if it is still ours."""

    def __init__(self, output_dir: str | Path, *, token: str | None = None, command: str = ""):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK
        self.token = token or os.environ.get(TOKEN_ENV) or uuid.uuid4().hex
        self.command = command
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def acquire(self) -> RunLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        me = Holder(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%dT%H:%M:%S%z"), self.token,
                    self.command)
        for _ in range(5):
            if self._create(me):
                break
            other = self._read()
            if other is None:  # removed, or half-written by a holder that just started: look again
                time.sleep(0.2)
                continue
            if other.token == self.token:  # this same run: its launcher, or an earlier attempt
                if other.host == me.host and pid_alive(other.pid):
                    return self  # the launcher that started this process holds it (and keeps it fresh)
                self._write(me)  # an earlier attempt that is gone (Ray / torchrun restarts): ours now
                break
            why = self._stale(other)
            if why is None:
                raise RunDirBusy(
                    f"output_dir {self.dir} is in use by another run ({other.describe()}). Two runs in one "
                    "output_dir would interleave their metrics and overwrite each other's checkpoints: wait for "
                    f"it, stop it, or give this run another output_dir. (If that run is gone, remove {self.path}.)")
            self._move_aside()
            log.warning("output_dir %s: taking over the lock of a run that is gone (%s: %s)", self.dir,
                        other.describe(), why)
        else:
            raise RunDirBusy(f"output_dir {self.dir}: could not take {self.path} (another run is starting there); "
                             "try again, or give this run another output_dir")
        self.held = True
        self._thread = threading.Thread(target=self._heartbeat, name="sft-dist-lock", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if not self.held:
            return
        self.held = False
        other = self._read()
        if other is not None and (other.token, other.host, other.pid) == (self.token, socket.gethostname(),
                                                                          os.getpid()):
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self, me: Holder) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(vars(me), f)
        return True

    def _write(self, me: Holder) -> None:
        tmp = self.path.with_name(f"{LOCK}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(vars(me)), encoding="utf-8")
        tmp.replace(self.path)

    def _read(self) -> Holder | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return Holder(**{k: data[k] for k in ("host", "pid", "started", "token")},
                          command=str(data.get("command", "")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            # Unreadable: age decides (a holder writes it whole within microseconds of creating it).
            if self._age() > 5.0:
                return Holder("?", -1, "?", "unreadable")
            return None

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _stale(self, other: Holder) -> str | None:
        if other.token == "unreadable":
            return "unreadable lock file"
        if other.host == socket.gethostname():
            if not pid_alive(other.pid):
                return f"pid {other.pid} is not running"
            return None
        age = self._age()
        if age > STALE_S:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _move_aside(self) -> None:
        """Rename the stale lock away (of two runs doing this, one rename wins; the loser's next O_EXCL create
        then finds the winner's lock)."""
        aside = self.path.with_name(f"{LOCK}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass
