"""A worker process's life around training: it dies with its launcher, and SIGTERM before training is a clean stop.

- A worker whose launcher is gone (the local launcher or torchrun's agent killed with -9) would keep training
  and checkpointing into an output_dir nobody watches, and the user's next run would meet it there. Workers
  get SIGKILL when their parent dies (Linux `PR_SET_PDEATHSIG`), and a watchdog thread checks the parent
  anyway (other systems; a parent that died before the call).
- SIGTERM during start-up (process group, data, model) has nothing to checkpoint: the worker stops there and
  exits 0, as it does after the checkpoint SIGTERM asks for during training (train/stop.py). After
  training it is the default again (the final save is not interrupted half-way by a handler of ours).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading

log = logging.getLogger("sft_dist")

PR_SET_PDEATHSIG = 1
WATCH_S = 0.5


class StoppedDuringStartup(BaseException):  # noqa: N818 - not an error: the worker was asked to stop
    """SIGTERM arrived before training started."""


def die_with_parent(*, sig: int = signal.SIGKILL, watchdog: bool = True) -> None:
    """End this process (`sig`) as soon as the process that started it is gone. `watchdog=False`: Linux's
    parent-death signal only, no thread (a process that forks must have none)."""
    parent = os.getppid()
    if parent <= 1:
        return
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # died before prctl took effect
        os._exit(137)
    if not watchdog:
        return

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(WATCH_S)
        os._exit(137)

    threading.Thread(target=watch, name="sft-dist-parent-watch", daemon=True).start()


# The signal's name once SIGTERM arrived during start-up. The handler's exception alone is not enough: raised while
# the interpreter runs a finalizer (a __del__ during garbage collection, a weakref callback), it is printed as
# "Exception ignored in ..." and lost, and start-up would go on into training (seen under load: the launcher
# waited on a rank that had swallowed it). `check_startup_stop` raises it again at the next phase boundary.
_pending: list[str] = []


def _stop_now(signum, _frame) -> None:
    name = signal.Signals(signum).name
    if not _pending:
        _pending.append(name)
    raise StoppedDuringStartup(name)


def startup_stop_pending() -> str | None:
    """The signal that asked this worker to stop during start-up, or None."""
    return _pending[0] if _pending else None


def check_startup_stop() -> None:
    """Raise StoppedDuringStartup again where the handler's one was swallowed (see `_pending`): called between
    the phases of start-up, and last before training takes SIGTERM over."""
    if _pending:
        raise StoppedDuringStartup(_pending[0])


def stop_on_sigterm_during_startup() -> bool:
    """Until training starts, SIGTERM raises StoppedDuringStartup. False where signals cannot be handled (not
    the main thread: Ray's training function)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _stop_now)
    return True


def default_sigterm() -> None:
    """SIGTERM back to the default, after training (the trainer's own handler is gone by then)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _stop_now:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie, exited but not yet reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
