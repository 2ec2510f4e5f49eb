"""The preflight's check of the memory estimate against the GPU's free memory (plan/fit.py)."""

from __future__ import annotations

from sft_dist.plan.fit import gpu_fit

GIB = 2**30


def test_a_peak_over_the_free_memory_is_a_warning_pointing_at_the_fixes():
    level, message = gpu_fit(int(79.28 * GIB), free=int(78.6 * GIB), total=int(79.1 * GIB), hinted=True)
    assert level == "warning"
    assert message == ("the estimated peak, 79.28 GiB per rank, is over the 78.60 GiB free on this GPU (79.10 GiB "
                       "in all): expect an out-of-memory error; the plan's hints above say what lowers it")


def test_a_close_fit_is_said_and_a_comfortable_one_is_not():
    level, message = gpu_fit(75 * GIB, free=78 * GIB, total=80 * GIB, hinted=False)
    assert level == "info" and message.endswith("is close to the 78.00 GiB free on this GPU (80.00 GiB in all) "
                                                "(96% of it)")
    assert gpu_fit(35 * GIB, free=139 * GIB, total=140 * GIB, hinted=True) is None
    assert gpu_fit(int(0.92 * 78 * GIB), free=78 * GIB, total=80 * GIB, hinted=False) is None
