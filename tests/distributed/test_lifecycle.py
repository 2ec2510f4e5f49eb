"""SIGTERM during a worker's start-up stops it, also where the handler's exception is swallowed by a finalizer."""

import gc
import os
import subprocess
import sys
import textwrap
import time

import pytest

# A child process: the start-up handler installed, then SIGTERM delivered while a __del__ runs (its exception
# is "ignored" by the interpreter), as seen under load during the suite with regex's SetBase.__del__.
CHILD = textwrap.dedent("""
    import gc, os, signal, sys
    from sft_dist.distributed import lifecycle

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # the handler runs here, inside the finalizer

    assert lifecycle.stop_on_sigterm_during_startup()
    try:
        x = Finalized(); x.self = x; del x
        gc.collect()
    except lifecycle.StoppedDuringStartup:
        print("raised where the signal arrived"); sys.exit(3)
    print("start-up went on; pending:", lifecycle.startup_stop_pending(), flush=True)
    try:
        lifecycle.check_startup_stop()
    except lifecycle.StoppedDuringStartup as e:
        print("stopped at the next phase boundary:", e); sys.exit(0)
    sys.exit(4)
""")


def test_a_sigterm_swallowed_by_a_finalizer_still_stops_start_up_at_the_next_boundary():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert "Exception ignored" in r.stderr, r.stderr  # the interpreter did swallow the handler's exception
    assert "start-up went on; pending: SIGTERM" in r.stdout, r.stdout + r.stderr
    assert "stopped at the next phase boundary: SIGTERM" in r.stdout
    assert r.returncode == 0


def test_without_a_signal_the_boundary_check_does_nothing():
    from sft_dist.distributed import lifecycle

    assert lifecycle.startup_stop_pending() is None
    lifecycle.check_startup_stop()  # raises nothing
    gc.collect()


# The rank that swallowed it goes on into a collective its stopped peer never joins, which fails: that failure is
# the stop's consequence, reported as the stop (exit 0), not as a crash of the rank.
PEER_GONE = textwrap.dedent("""
    import gc, os, signal, sys
    import sft_dist.train.run
    from sft_dist import cli

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))

    def run(cfg):
        x = Finalized(); x.self = x; del x
        gc.collect()
        raise RuntimeError("Connection closed by peer [127.0.0.1]:29500")

    sft_dist.train.run.run = run
    sys.exit(cli._worker(None))
""")


def test_a_failure_after_a_swallowed_start_up_sigterm_is_reported_as_the_stop():
    r = subprocess.run([sys.executable, "-c", PEER_GONE], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RANK": "1"})
    assert r.returncode == 0, r.stderr
    assert ("sft-dist: SIGTERM before training started: stopped (nothing to checkpoint yet) (RuntimeError on the "
            "way out: Connection closed by peer") in r.stderr, r.stderr
    assert r.stderr.count("Traceback (most recent call last)") == 1  # only the finalizer's, which was ignored


def test_a_worker_asked_to_stop_does_not_wait_in_the_rendezvous_for_a_peer_that_stopped(monkeypatch):
    """Rank 0 with a (swallowed) start-up SIGTERM, its peer gone: it leaves the named join at its next poll
    instead of waiting launcher.timeout_s for a rank that will never come."""
    from sft_dist.distributed import lifecycle
    from sft_dist.distributed.local import free_port
    from sft_dist.distributed.rendezvous import join

    monkeypatch.setattr(lifecycle, "_pending", ["SIGTERM"])
    t0 = time.monotonic()
    with pytest.raises(lifecycle.StoppedDuringStartup):
        join(rank=0, world_size=2, addr="127.0.0.1", port=free_port("127.0.0.1"), timeout_s=60, agent_store=False,
             prefix="t/")
    assert time.monotonic() - t0 < 10
