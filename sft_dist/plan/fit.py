"""Whether the memory estimate fits the GPU a run is about to load onto: checked by the preflight of every run
on CUDA, before the weights load, so a run headed for an out-of-memory error says so (and what would lower the
peak) before it spends minutes loading and compiling."""

from __future__ import annotations

from sft_dist.sizes import format_bytes

# Above this share of the free memory the caching allocator's fragmentation alone may tip the run over.
TIGHT = 0.92


def gpu_fit(peak: int, *, free: int, total: int, hinted: bool, where: str | None = None) -> tuple[str, str] | None:
    """(level, message) when the estimated per-rank `peak` is over or close to this GPU's `free` memory, else
    None. `hinted`: the plan logged its own ways to lower the peak (its `hint:` lines). `where`: how to name the
    memory (default: free on this GPU)."""
    if peak <= TIGHT * free:
        return None
    where = where or f"{format_bytes(free)} free on this GPU ({format_bytes(total)} in all)"
    fixes = "; the plan's hints above say what lowers it" if hinted else ""
    if peak > free:
        return "warning", (f"the estimated peak, {format_bytes(peak)} per rank, is over the {where}: expect an "
                           f"out-of-memory error{fixes}")
    return "info", (f"the estimated peak, {format_bytes(peak)} per rank, is close to the {where} "
                    f"({peak / free:.0%} of it){fixes}")


def fits_text(peak: int, *, gpu: int, label: str, hinted: bool) -> tuple[bool, str]:
    """`sft-dist plan --gpu-memory`: (fits, the line to print) for a GPU of `gpu` bytes named `label`, before
    any GPU is at hand. Over it: does not fit; close to it: fits, said so."""
    where = f"GPU's {format_bytes(gpu)} (--gpu-memory {label})"
    fit = gpu_fit(peak, free=gpu, total=gpu, hinted=hinted, where=where)
    if fit is None:
        return True, f"fits: the estimated peak, {format_bytes(peak)} per rank, is {peak / gpu:.0%} of the {where}"
    return fit[0] != "warning", fit[1]
