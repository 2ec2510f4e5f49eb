"""Warm worker start for the local launcher: a template process that has already imported torch, transformers,
peft, TRL and DeepSpeed forks each worker, so a worker starts in a fraction of a second instead of paying ~8 s of
imports (2-core CPU) on every `sft-dist train`. For the edit-run loop on a laptop and for test suites.

    sft-dist warm &                          # prints the socket; stays in the foreground
    export SFT_DIST_WARM=/run/user/1000/sft-dist-warm.sock
    sft-dist train CONFIG                    # launcher.type=local: workers forked warm

What a forked worker shares with the template is imports only: the template never runs a tensor op (no OpenMP
pool), never initialises CUDA, has one Python thread, and its environment equals the worker's except for the
per-worker keys the launcher sets. Anything else and the launcher starts its workers cold (`python -m sft_dist`)
and says why: an environment variable a library read at import time may differ (HF_HOME, a token, ...), or code
changed on disk since the template imported it (then the template exits: start it again). The worker then runs
the same `sft_dist.cli.main` as a cold one; its loss curve and weights are bitwise those of a cold start.

The socket is a Unix socket in a directory only its owner can enter, and a connection from another user is
refused (SO_PEERCRED): it runs `sft-dist` commands as the user who started it, nothing else.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import runpy
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("sft_dist")

ENV_VAR = "SFT_DIST_WARM"
TEMPLATE_ENV = "SFT_DIST_WARM_TEMPLATE"  # in a forked worker: the template's pid
# What a worker imports on its way to the first step (a cold worker's `python -X importtime` of train/run, the
# trainer, the export and the report); deepspeed only where installed.
PRELOAD = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "deepspeed",
           "sft_dist.cli", "sft_dist.train.run", "sft_dist.train.trainer", "sft_dist.export.run",
           "sft_dist.metrics.report")
# Set by the local launcher for each worker, or read by sft_dist at run time (never at import): may differ from the
# template's environment. PATH only steers subprocess lookups.
PER_WORKER = frozenset({"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "OMP_NUM_THREADS", "PYTHONUNBUFFERED", "PATH"})
PER_WORKER_PREFIX = "SFT_DIST_"
# What the shell the command came from sets for itself: differs between two terminals, read by no library here.
SHELL_NOISE = frozenset({"SHLVL", "PWD", "OLDPWD", "_", "COLUMNS", "LINES", "PS1", "PS2", "PROMPT_COMMAND",
                         "LS_COLORS", "HISTFILE", "HISTSIZE", "HISTFILESIZE", "WINDOWID", "STY", "TERM_SESSION_ID"})
SHELL_NOISE_PREFIXES = ("SSH_", "TMUX", "TERM", "XDG_SESSION", "GPG_TTY")
# What libraries set for themselves when imported, in each process its own (in the launcher, the template, a cold
# worker): a launcher that imported tensorboardX (report_to tensorboard) passes its key on; mlflow names its
# telemetry session per process. Any value is accepted.
SET_BY_IMPORTS = frozenset({"CRC32C_SW_MODE", "PYTORCH_NVML_BASED_CUDA_CHECK", "TORCHINDUCTOR_CACHE_DIR",
                            "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK", "_MLFLOW_TELEMETRY_SESSION_ID"})
# Native threads known to survive fork (jemalloc re-creates its background thread in the child: pyarrow's).
FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd"})
_HEADER = struct.Struct("!I")
# The sft_dist this code is: a launcher or a Ray worker whose own sft_dist is another copy (an uploaded working
# directory, another checkout) is not served from this one's imports.
PACKAGE = str(Path(__file__).resolve().parents[1])
# Ray's worker processes are served two ways. A run's own template (`serve(ray="job")`, distributed/ray_warm.py) imports
# Ray and the Ray Train modules the controller and the training workers load at the first Ray worker's request,
# because Ray reads its per-process flags (RAY_INTERNAL_FLAGS: the job, the raylet) once, when it is imported: it then
# serves that job's workers only. `sft-dist warm` (`serve(ray="any")`) never imports Ray: each Ray worker it forks
# imports Ray itself (~0.5 s), with its own job's flags, so one template kept on a node serves every job there.
RAY_PRELOAD = ("ray", "ray.train.torch", "ray._private.workers.default_worker",
               "ray.train.v2._internal.execution.controller.controller",
               "ray.train.v2._internal.execution.worker_group.worker",
               "sft_dist.distributed.ray_train", "sft_dist.distributed.ray_trainer", "sft_dist.train.ray_report")
# Set by the raylet for each worker process it starts or by its runtime env. A run's template imports Ray under the
# first Ray worker's values of all of them (the job's: what its Python modules read at import); the workers of one
# job differ only in values Ray reads per process again (`Config.initialize`) or at call time, except
# RAY_INTERNAL_FLAGS, which must equal those Ray was imported with.
# SPT_NOENV: how setproctitle may rename the process (the template sets Ray's value before it imports setproctitle).
# PYTHONBREAKPOINT: Ray's debugger hook in its workers, read by each breakpoint() call.
RAY_PER_WORKER_PREFIX = "RAY_"
RAY_PER_WORKER = frozenset({"SPT_NOENV", "PYTHONBREAKPOINT"})
# How long a stopped template leaves the Ray workers it forked to the raylet before it kills them.
RAY_STOP_GRACE_S = 3.0
RAY_INTERNAL_FLAGS = ("RAY_JOB_ID", "RAY_RAYLET_PID", "RAY_OVERRIDE_NODE_ID_FOR_TESTING")


class WarmUnavailable(Exception):
    """The template cannot start this worker; the launcher starts it cold. The message says why."""


def default_socket() -> Path:
    """$XDG_RUNTIME_DIR/sft-dist-warm.sock, else a per-user directory under the temp dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and Path(runtime).is_dir() else Path("/tmp") / f"sft-dist-{os.getuid()}"
    return base / "sft-dist-warm.sock"


def env_difference(before: dict[str, str], after: dict[str, str], worker: dict[str, str], *,
                   ray_free: bool = False) -> list[str]:
    """The keys (names only: values may be secrets) on which a worker's environment differs from the template's,
    other than the per-worker ones. `before`/`after`: the template's environment before and after its imports (which
    set keys of their own, as they do in the launcher and in a cold worker): a worker may have either value.
    `ray_free`: Ray's keys may differ too (the template has not imported Ray, or Ray reads them again in the worker)."""
    keys = set(before) | set(after) | set(worker)
    if ray_free:
        keys = {k for k in keys if k not in RAY_PER_WORKER and not k.startswith(RAY_PER_WORKER_PREFIX)}
    return sorted(k for k in keys if k not in PER_WORKER and k not in SHELL_NOISE
                  and not k.startswith((PER_WORKER_PREFIX, *SHELL_NOISE_PREFIXES))
                  and k not in SET_BY_IMPORTS and worker.get(k) not in {before.get(k), after.get(k)})


def worker_environ(before: dict[str, str], after: dict[str, str], worker: dict[str, str]) -> dict[str, str]:
    """The worker's environment, plus what the template's imports set that it lacks: what a cold worker's own
    imports would have set."""
    added = {k: v for k, v in after.items() if k not in before and k not in worker}
    return {**worker, **added}


# ---- the launcher's side -------------------------------------------------------------------------------------


class WarmWorker:
    """A worker forked by the template, driven like `subprocess.Popen` (poll, wait, send_signal, kill, returncode).
    Its exit status comes over the connection; the template kills it if this process goes away."""

    def __init__(self, path: str | os.PathLike, argv: list[str], env: dict[str, str], *, cwd: str | None = None,
                 ray_worker: bool = False):
        self.returncode: int | None = None
        self.args = argv
        # ray_worker: argv is Ray's default_worker.py and its arguments (a Ray worker process), else `sft-dist` argv
        request = json.dumps({"argv": argv, "env": env, "cwd": cwd or os.getcwd(), "python": sys.executable,
                              "package": PACKAGE, "launcher_pid": os.getpid(), "ray_worker": ray_worker}).encode()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(30)
            self._sock.connect(os.fspath(path))
            socket.send_fds(self._sock, [_HEADER.pack(len(request))], [0, 1, 2])
            self._sock.sendall(request)
            reply = self._read_line()
        except OSError as e:
            self._sock.close()
            raise WarmUnavailable(f"no warm template at {path} ({e.strerror or e})") from e
        if "refused" in reply:
            self._sock.close()
            raise WarmUnavailable(reply["refused"])
        self.pid = int(reply["pid"])
        self._sock.setblocking(False)

    def _read_line(self) -> dict:
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = self._sock.recv(4096)
            if not chunk:
                raise ConnectionError("the warm template closed the connection")
            buf += chunk
        return json.loads(buf)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                data = self._sock.recv(4096)
            except BlockingIOError:
                return None
            except OSError:
                data = b""
            # The template gone before it could report: the worker is gone with it (killed, see _serve_child)
            self.returncode = json.loads(data)["exit"] if data else -signal.SIGKILL
            self._sock.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# Signals a user or a scheduler sends the command: passed on to the forked process, which handles them as a cold
# one would (SIGTERM: checkpoint and stop; SIGINT: interrupted).
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def run_command(argv: list[str]) -> int | None:
    """A whole `sft-dist` command (export, generate, plan, the launcher of a train), forked from the template at
    $SFT_DIST_WARM: this process only passes signals on and returns the command's exit status. None when there is
    no template to use, or it refused (the reason on stderr): the caller then runs the command itself, cold."""
    path = os.environ.get(ENV_VAR)
    if not path or TEMPLATE_ENV in os.environ:
        return None
    try:
        child = WarmWorker(path, argv, dict(os.environ))
    except WarmUnavailable as e:
        print(f"sft-dist: warm start unavailable ({e}): running cold", file=sys.stderr, flush=True)
        os.environ.pop(ENV_VAR, None)  # its workers would be refused for the same reason: not asked again
        return None
    return relay(child)


def relay(child: WarmWorker) -> int:
    """Stand in for `child` until it exits: signals sent here go to it; its exit status is returned, or, killed by a
    signal, this process ends the same way (a shell, scheduler or raylet sees what a cold process shows)."""
    for s in RELAYED:
        signal.signal(s, lambda signum, _frame: child.send_signal(signum))
    code = child.wait()
    if code < 0:
        for s in RELAYED:
            signal.signal(s, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


# ---- the template ------------------------------------------------------------------------------------------


@dataclass
class _Template:
    listener: socket.socket
    env: dict[str, str]  # before the imports
    env_after: dict[str, str]
    mtimes: dict[str, float]
    children: dict[int, socket.socket] = field(default_factory=dict)  # pid -> its launcher's connection
    ray_worker_script: str | None = None  # Ray's default_worker.py, where this template serves Ray workers
    ray_mode: str | None = None  # "job" or "any" (see RAY_PRELOAD)
    ray_flags: dict[str, str | None] | None = None  # "job": RAY_INTERNAL_FLAGS Ray was imported with (None: not yet)
    stale: str | None = None
    served: int = 0
    refused: int = 0


def preload(extra: tuple[str, ...] = ()) -> list[str]:
    """Import what a worker needs, without running anything: returns the modules not installed."""
    missing = []
    if not _has_cuda_driver():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what run() sets on CPU; else DeepSpeed warns at import
    for name in (*extra, *PRELOAD):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 - the report's charts

    return missing


def _has_cuda_driver() -> bool:
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/proc/driver/nvidia"))


def _loaded_files() -> dict[str, float]:
    files = {}
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__file__", None)
        if path and os.path.isfile(path):
            files[path] = os.stat(path).st_mtime
    return files


def _changed(mtimes: dict[str, float]) -> str | None:
    for path, mtime in mtimes.items():
        try:
            if os.stat(path).st_mtime != mtime:
                return path
        except OSError:
            return path
    return None


def _native_threads() -> list[str]:
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for t in tasks:
        try:
            names.append(Path(f"/proc/self/task/{t}/comm").read_text().strip())
        except OSError:
            pass
    return [n for n in names if n not in FORK_SAFE_THREADS][1:]  # the first is the main thread


def _fork_unsafe() -> str | None:
    import threading

    import torch

    if threading.active_count() > 1:
        return f"the template runs {threading.active_count()} Python threads"
    extra = _native_threads()
    if extra:
        return f"the template runs native threads ({', '.join(extra)})"
    if torch.cuda.is_initialized():  # not is_available(): without NVML it initialises the CUDA driver itself
        return "CUDA is initialised in the template"
    return None


def serve(path: Path, *, ready=None, ray: str | None = "any") -> int:
    """Run the template until SIGTERM/SIGINT or until code it imported changes on disk. Returns the exit code.
    Besides `sft-dist` commands it serves Ray's worker processes (distributed/ray_exec.py): those of one job
    (`ray="job"`, a run's template) or of any job (`"any"`); None: not Ray's."""
    env = dict(os.environ)  # as the user set it: imports add their own keys, as they will in a cold worker
    # A CPU op during an import (DeepSpeed's CPU accelerator) would start OpenMP's pool, whose threads a fork does
    # not copy; each worker sets its own thread count (run() -> torch.set_num_threads)
    own = {"OMP_NUM_THREADS": "1"}
    if ray:
        own["SPT_NOENV"] = "1"  # what the raylet gives its workers, read by setproctitle once
    os.environ.update(own)
    missing = preload()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.parent.stat().st_uid != os.getuid():  # someone else's directory: they could swap the socket
        from sft_dist.errors import ConfigError

        raise ConfigError(f"{path.parent} belongs to another user: give `sft-dist warm --socket` a path in a "
                          "directory of your own")
    os.chmod(path.parent, 0o700)
    if path.exists() or path.is_symlink():
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    gc.collect()
    gc.freeze()  # the imports' objects: never scanned again, in the template or in a worker (and not copied)
    # What the imports set, which a worker gets where it lacks it; not the template's own settings (a forked
    # one-process `train` takes the default thread count, as a cold one does, not the template's 1)
    after = {k: v for k, v in os.environ.items() if k not in own}
    t = _Template(listener, env, after, _loaded_files())
    if ray:
        t.ray_worker_script, t.ray_mode = _ray_worker_script(), ray
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    print(f"sft-dist warm: ready (pid {os.getpid()}, {len(sys.modules)} modules imported"
          + (f"; not installed: {', '.join(missing)}" if missing else "") + f")\nexport {ENV_VAR}={path}",
          flush=True)
    if ready is not None:
        ready()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    try:
        while stop["signal"] is None and not (t.stale and not t.children):
            for key, _ in sel.select(timeout=0.1):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    _accept(t, conn, sel)
                else:  # a launcher's connection: it sends nothing after the request, so this is its end
                    _launcher_gone(t, key.fileobj, sel)
            if t.stale and listener.fileno() != -1:  # no new workers from old code; those running finish
                sel.unregister(listener)
                listener.close()
                path.unlink(missing_ok=True)
            _reap(t, sel)
    finally:  # stopped: the workers it forked stop with it (their launchers see them killed)
        if ray:  # a Ray worker is the raylet's to end (the run's driver ends first): a moment for that
            deadline = time.monotonic() + RAY_STOP_GRACE_S
            while t.children and time.monotonic() < deadline:
                _reap(t, sel)
                time.sleep(0.05)
        for pid in list(t.children):
            _kill(pid)
        _reap(t, sel, wait=True)
        listener.close()
        path.unlink(missing_ok=True)
    print(f"sft-dist warm: stopped; forked {t.served} worker(s), refused {t.refused}", flush=True)
    if t.stale:
        print(f"sft-dist warm: {t.stale} changed on disk since the template imported it: exiting (start "
              f"`sft-dist warm` again to use the new code)", file=sys.stderr, flush=True)
    return 0


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[2]


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    conn.settimeout(10)
    head, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 3)
    (size,) = _HEADER.unpack(head)
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("request cut short")
        body += chunk
    return json.loads(body), fds


def _ray_worker_script() -> str | None:
    """Where Ray's default_worker.py is, found without importing Ray (see RAY_PRELOAD)."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    script = Path(list(spec.submodule_search_locations)[0]) / "_private" / "workers" / "default_worker.py"
    return str(script) if script.is_file() else None


def _ray_refusal(t: _Template, req: dict) -> str | None:
    """Why this template cannot fork the Ray worker `req` asks for; else None, Ray imported for it."""
    if not t.ray_worker_script:
        return "this template does not serve Ray workers (Ray is not installed, or `serve(ray=None)`)"
    if not req["argv"] or req["argv"][0] != t.ray_worker_script:
        return f"a Ray worker runs {t.ray_worker_script}, not {req['argv'][:1]}"  # the only script it runs
    if t.ray_mode == "any":  # the worker imports Ray itself (_serve_child)
        return None
    flags = {k: req["env"].get(k) for k in RAY_INTERNAL_FLAGS}
    if t.ray_flags is None:  # the first Ray worker: import Ray under its Ray settings, as its own import reads them
        for k in [k for k in os.environ if k.startswith(RAY_PER_WORKER_PREFIX)]:
            os.environ.pop(k)
        os.environ.update({k: v for k, v in req["env"].items()
                           if k.startswith(RAY_PER_WORKER_PREFIX) or k in RAY_PER_WORKER})
        preload(RAY_PRELOAD)
        t.ray_flags = flags
        t.mtimes.update(_loaded_files())
        gc.collect()
        gc.freeze()
    elif flags != t.ray_flags:
        return (f"Ray imported here for job {t.ray_flags['RAY_JOB_ID']} under raylet {t.ray_flags['RAY_RAYLET_PID']}"
                f", this worker is job {flags['RAY_JOB_ID']}'s under raylet {flags['RAY_RAYLET_PID']}")
    return None


def _refusal(t: _Template, req: dict) -> str | None:
    if req.get("python") != sys.executable:
        return f"the template runs {sys.executable}, this launcher {req.get('python')}"
    if req.get("package") != PACKAGE:
        return f"the template runs sft_dist from {PACKAGE}, this launcher from {req.get('package')}"
    ray_worker = bool(req.get("ray_worker"))
    # Ray's variables are read when Ray is imported: by the forked process itself where the template has not
    diff = env_difference(t.env, t.env_after, req["env"], ray_free=ray_worker or "ray" not in sys.modules)
    if diff:
        return (f"the environment differs from the template's in {', '.join(diff[:8])}"
                + (f" (+{len(diff) - 8} more)" if len(diff) > 8 else "") + " (libraries read it at import)")
    changed = _changed(t.mtimes)
    if changed:
        t.stale = changed
        return f"{changed} changed on disk since the template imported it"
    return (ray_worker and _ray_refusal(t, req)) or _fork_unsafe()


def _accept(t: _Template, conn: socket.socket, sel: selectors.BaseSelector) -> None:
    fds: list[int] = []
    try:
        if hasattr(socket, "SO_PEERCRED") and _peer_uid(conn) != os.getuid():
            conn.close()
            return
        req, fds = _recv_request(conn)
        why = _refusal(t, req) if len(fds) == 3 else "the launcher sent no stdin/stdout/stderr"
        if why:
            if not req.get("ray_worker"):  # a Ray worker's stand-in (ray_exec) says it in the worker's log
                print(f"sft-dist warm: refused a worker: {why}", file=sys.stderr, flush=True)
            t.refused += 1
            conn.sendall(json.dumps({"refused": why}).encode() + b"\n")
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _serve_child(t, sel, conn, req, fds)  # never returns
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        t.children[pid] = conn
        t.served += 1
        sel.register(conn, selectors.EVENT_READ, pid)
    except (OSError, ValueError, KeyError) as e:
        print(f"sft-dist warm: a request failed: {e}", file=sys.stderr, flush=True)
        conn.close()
    finally:
        for fd in fds:
            os.close(fd)


def _launcher_gone(t: _Template, conn, sel: selectors.BaseSelector) -> None:
    """The launcher closed its end (exited, or was killed): its worker must not train on alone."""
    pid = sel.get_key(conn).data
    sel.unregister(conn)
    if pid in t.children:
        _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(t: _Template, sel: selectors.BaseSelector, *, wait: bool = False) -> None:
    while t.children:
        try:
            pid, status = os.waitpid(-1, 0 if wait else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = t.children.pop(pid, None)
        if conn is None:
            continue
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        try:
            conn.sendall(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
        except OSError:
            pass
        conn.close()


def _serve_child(t: _Template, sel: selectors.BaseSelector, conn: socket.socket, req: dict, fds: list[int]) -> None:
    """In the forked worker: become what `python -m sft_dist ARGV` started by the launcher would be (a Ray worker:
    `python default_worker.py ARGS`), run it, exit."""
    rc = 1
    try:
        sel.close()
        t.listener.close()
        conn.close()
        for other in t.children.values():
            other.close()
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        for s in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(worker_environ(t.env, t.env_after, req["env"]))
        os.environ[TEMPLATE_ENV] = str(os.getppid())  # this worker was forked warm (its start-up line says so)
        # sys.stdout/err (and handlers libraries bound to them at import) now write to the launcher's fds
        if req["env"].get("PYTHONUNBUFFERED"):
            sys.stdout.reconfigure(line_buffering=True, write_through=True)
            sys.stderr.reconfigure(line_buffering=True, write_through=True)
        if req.get("ray_worker"):
            # A process group of its own, as the raylet gives each worker it starts: the raylet ends a worker's
            # group when the worker exits (RAY_process_group_cleanup_enabled), which must not be the template's
            os.setpgid(0, 0)
            if t.ray_mode == "job":
                import ray._raylet

                # Ray's C++ settings (RAY_AUTH_MODE, RAY_<option>...) were read from the template's environment when
                # it imported Ray: read them again from this worker's, as a cold worker's import would
                ray._raylet.Config.initialize("")
            sys.argv = list(req["argv"])
            sys.path[0] = os.path.dirname(t.ray_worker_script)  # what `python SCRIPT` puts first
            runpy.run_path(t.ray_worker_script, run_name="__main__")
        else:
            sys.argv = ["-m", *req["argv"]]  # run_module puts the module's path first, as `python -m` does
            sys.path[0] = req["cwd"]  # what `python -m` puts first
            runpy.run_module("sft_dist", run_name="__main__", alter_sys=True)  # sft_dist/__main__.py: SystemExit
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - a worker's crash is its exit code, as in a cold process
        traceback.print_exc()
        rc = 1
    finally:
        try:
            atexit._run_exitfuncs()  # what interpreter shutdown would run (flushes, trackers)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc if isinstance(rc, int) else 1)
