"""The random base of an `init_config` run, written to <output_dir>/base_model: what export, generate and
`PeftModel.from_pretrained` load the adapter onto.

Written whole or not at all: into a sibling temp directory, renamed into place once complete, so a run killed
mid-write never leaves a base that loads wrong (a stale temp directory is removed by the next write). With it goes
`sft_dist_base.json` (the config and every tensor's checksum): a resumed or restarted run whose base has the same
fingerprint and tokenizer files keeps the one written before.

In the background where nothing can change it while it is written: a LoRA base (frozen; peft, Liger and the
wrappers add modules and never write into its tensors) held whole on this rank (no ZeRO-3/FSDP2 shards), or the
16-bit host copy a quantized base was made from (model/build.py: quantize_in_memory; training holds only the
quantized one), or the host copy rank 0 gathers of a ZeRO-3 base built partitioned (`gathered_state`). The weights
are written
from a second, meta-built module tree that shares the model's tensors, through transformers' own
`save_pretrained`, so peft wrapping the model meanwhile changes nothing that is read (16 GB for an 8B shape;
the first step no longer waits for it, which on a 2-core CPU gained little since the write competes for the
cores, and is not measured on a GPU host; there its copies to the host run on a CUDA stream of their own, beside
the training kernels). `wait()` joins it before the adapter is saved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from sft_dist.errors import SftDistError

log = logging.getLogger(__name__)


class BaseWrite:
    """A base being written (or written already); `wait()` returns once it is in place, or raises."""

    def __init__(self, path: Path, thread: threading.Thread | None = None):
        self.path, self._thread, self.error, self.seconds = path, thread, None, None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            raise SftDistError(f"writing the random base to {self.path} failed: {self.error}")


def write_base(model, tokenizer, path: Path, *, background: bool, state: dict | None = None) -> BaseWrite:
    """Write `model` (seeded random weights) and `tokenizer` to `path`; in a thread when `background`. `state`:
    the weights to write instead of the model's own (a ZeRO-3 model's, gathered: `gathered_state`). A base already
    at `path` with the same config, tokenizer files and weights (a resumed or restarted run's) is kept as it is."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    for stale in path.parent.glob(f"{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    shadow = _shadow(model, state)
    (tmp / FINGERPRINT).write_text(json.dumps(fingerprint(shadow), sort_keys=True))
    if _same_base(path, tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("model: the random base in %s is this run's already (its config, tokenizer and weights' "
                 "checksums): kept, not written again", path)
        return BaseWrite(path)
    if not background:
        job = BaseWrite(path)
        _write(job, model if state is None else shadow, tmp)
        job.wait()
        return job
    job = BaseWrite(path)
    job._thread = threading.Thread(target=_write, args=(job, shadow, tmp), name="sft-dist-base-write", daemon=False)
    job._thread.start()
    log.info("model: writing the random base to %s in the background", path)
    return job


def gathered_state(model, *, keep: bool) -> dict | None:
    """A ZeRO-3 model's state dict, whole, in host memory on the rank that `keep`s it (rank 0; the others get None):
    each parameter gathered in turn (a collective: every rank calls this), copied to the host, partitioned again.
    The GPU holds one whole parameter at a time beside the partitions; rank 0's host the whole base, which is then
    written from this copy, in the background (nothing changes it)."""
    import deepspeed

    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    state: dict = {}
    for _, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if keep:
                whole = p.detach().to("cpu", copy=True)
                state.update({n: whole for n in names[id(p)]})  # tied names share the one copy
    if not keep:
        return None
    persistent = set(model.state_dict())
    state.update({n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers() if n in persistent})
    return state


FINGERPRINT = "sft_dist_base.json"


def fingerprint(model) -> dict:
    """What identifies a written base: the config as saved and a checksum of every tensor of the state dict (XOR
    of its bits, `torch.hash_tensor`: computed where the tensor lives, no copy)."""
    import torch

    config = json.loads(model.config.to_json_string(use_diff=True))
    config.pop("transformers_version", None)
    weights = {name: [str(t.dtype), list(t.shape), torch.hash_tensor(t.detach()).view(torch.int64).item()]
               for name, t in model.state_dict().items()}
    return {"config": config, "weights": weights}


def _same_base(path: Path, new: Path) -> bool:
    """`path` holds a complete base (written whole, renamed into place) whose fingerprint and tokenizer files are
    the ones in `new`."""
    if not (path / FINGERPRINT).is_file():
        return False
    for f in new.iterdir():
        if not (path / f.name).is_file() or (path / f.name).read_bytes() != f.read_bytes():
            return False
    return True


def _shadow(model, state: dict | None = None):
    """A second module tree of the same class and config whose tensors are the model's own (no copy), or `state`'s."""
    import torch
    from transformers import AutoModelForCausalLM

    from sft_dist.model.build import without_zero3_init

    # a plain tree on rank 0 alone, even under a ZeRO-3 config (zero.Init's partitioning is collective)
    with without_zero3_init(), torch.device("meta"):
        shadow = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
    if state is None:
        state = {k: v.detach() for k, v in model.state_dict().items()}
    shadow.load_state_dict(state, assign=True, strict=True)
    shadow.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        shadow.generation_config = model.generation_config
    return shadow


@contextlib.contextmanager
def _copy_stream(device):
    """On a GPU, the weights' copies to the host run on a stream of their own: on the default stream each copy
    would wait for the training kernels queued before it and hold back those after it. The base is frozen, so
    only its initialisation (on the default stream) must be complete first."""
    if device.type != "cuda":
        yield
        return
    import torch

    torch.cuda.set_device(device)  # a new thread starts on GPU 0: copy from this rank's GPU, touch no other
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.default_stream(device))
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


def _write(job: BaseWrite, model, tmp: Path) -> None:
    t0 = time.perf_counter()
    try:
        with _copy_stream(next(model.parameters()).device):
            model.save_pretrained(tmp)
        if job.path.exists():
            shutil.rmtree(job.path)
        os.replace(tmp, job.path)
        job.seconds = time.perf_counter() - t0
        log.info("model: random base written to %s in %.1f s", job.path, job.seconds)
    except Exception as e:  # noqa: BLE001 - reported by wait(), in the training thread
        job.error = f"{type(e).__name__}: {e}"
        log.error("model: writing the random base to %s failed: %s", job.path, job.error)
        shutil.rmtree(tmp, ignore_errors=True)
