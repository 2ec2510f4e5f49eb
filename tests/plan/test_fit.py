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


def test_plan_checks_the_peak_against_the_gpu_memory_it_is_given(capsys):
    """`sft-dist plan --gpu-memory SIZE`: before any GPU is at hand, whether the estimated peak fits a GPU of that
    size (exit 0, said), is close to it (exit 0, said) or over it (exit 1, with the out-of-memory warning)."""
    import json

    from sft_dist.cli import main
    from sft_dist.sizes import format_bytes
    from tests.conftest import QUICKSTART

    assert main(["plan", str(QUICKSTART), "--json", "--gpu-memory", "80GB"]) == 0
    plan = json.loads(capsys.readouterr().out)
    peak = plan["memory_per_rank"]["detail"]["peak"]
    assert plan["memory_per_rank"]["detail"]["device"] == "cuda"  # a GPU size plans for cuda
    assert plan["gpu_fit"] == {"gpu_bytes": 80 * 10**9, "fits": True, "message": (
        f"fits: the estimated peak, {format_bytes(peak)} per rank, is {peak / (80 * 10**9):.0%} of the GPU's "
        f"74.51 GiB (--gpu-memory 80GB)")}
    close = int(peak / 0.95)  # 95% of it: over the 92% a run's preflight calls close
    assert main(["plan", str(QUICKSTART), "--gpu-memory", str(close)]) == 0
    assert "is close to the GPU's" in capsys.readouterr().out.splitlines()[-1]
    assert main(["plan", str(QUICKSTART), "--gpu-memory", str(peak - 1)]) == 1
    assert capsys.readouterr().out.splitlines()[-1].endswith("expect an out-of-memory error")
    assert main(["plan", str(QUICKSTART), "--gpu-memory", "lots"]) != 0
    assert "--gpu-memory: 'lots' is not a size" in capsys.readouterr().err
    assert main(["plan", str(QUICKSTART), "--gpu-memory", "80GB", "--device", "cpu"]) != 0
    assert "drop --device cpu" in capsys.readouterr().err


def test_fits_text_names_the_gpu_it_was_given():
    from sft_dist.plan.fit import fits_text

    assert fits_text(12 * GIB, gpu=24 * 10**9, label="24GB", hinted=False) == (
        True, "fits: the estimated peak, 12.00 GiB per rank, is 54% of the GPU's 22.35 GiB (--gpu-memory 24GB)")
    fits, line = fits_text(30 * GIB, gpu=24 * GIB, label="24GiB", hinted=True)
    assert not fits and line == ("the estimated peak, 30.00 GiB per rank, is over the GPU's 24.00 GiB (--gpu-memory "
                                 "24GiB): expect an out-of-memory error; the plan's hints above say what lowers it")
