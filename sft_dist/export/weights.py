"""The trained weights in a checkpoint, read one tensor at a time on CPU without a process group.

A checkpoint holds only the trainable parameters (the LoRA matrices, modules_to_save, or the whole model
for full fine-tuning), keyed by the names of the model that trained them (`base_model.model....` for peft).
- DCP (DDP, FSDP2): each `model.*` tensor is loaded alone from `shards/`; FSDP2 shards are re-assembled by DCP.
- DeepSpeed ZeRO: the fp32 master weights are rebuilt from the optimizer partitions as DeepSpeed's
  `zero_to_fp32.py` does, but every file is loaded with `weights_only=True` (a pickle never runs code) and
  memory-mapped, so only the bytes of the tensor asked for are read.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch

from sft_dist.checkpoint.shards import DCP_DIR, ds_tag
from sft_dist.errors import SftDistError

Spec = tuple[torch.Size, torch.dtype]


class TrainedWeights:
    """Name -> (shape, dtype) of every trained tensor, and `load(name)` to read one."""

    specs: dict[str, Spec]

    def load(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for s, d in self.specs.values())


def open_trained(local_dir: Path, manifest: dict) -> TrainedWeights:
    fmt = manifest.get("shard_format")
    if fmt == "dcp":
        return DcpWeights(local_dir / DCP_DIR)
    if fmt == "deepspeed":
        return ZeroWeights(local_dir / ds_tag(int(manifest["step"])), stage=int(manifest.get("zero_stage") or 0),
                           world_size=int(manifest["world_size"]))
    raise SftDistError(f"{local_dir}/manifest.json: unknown shard_format {fmt!r} (expected dcp or deepspeed)")


class DcpWeights(TrainedWeights):
    PREFIX = "model."  # the checkpoint is {"model": {...}, "optim": {...}}; optimizer state is not exported

    def __init__(self, shards: Path):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from sft_dist.checkpoint.dcp_safe import SafeReader

        self._reader = SafeReader(str(shards))  # reads .metadata once, without unpickling code
        meta = self._reader.read_metadata().state_dict_metadata
        self.specs = {k[len(self.PREFIX):]: (m.size, m.properties.dtype) for k, m in meta.items()
                      if k.startswith(self.PREFIX) and isinstance(m, TensorStorageMetadata)}

    def load(self, name: str) -> torch.Tensor:
        from torch.distributed.checkpoint.api import CheckpointException

        from sft_dist.checkpoint.dcp_safe import first_untrusted, load_with

        shape, dtype = self.specs[name]
        out = torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # "no process group: assuming a single process" is the point here
            warnings.simplefilter("ignore", UserWarning)
            try:
                load_with({"model": {name: out}}, self._reader)
            except CheckpointException as e:
                raise first_untrusted(e) or e from None
        return out


class ZeroWeights(TrainedWeights):
    """ZeRO-1/2: each rank holds one contiguous slice of every param group's flat fp32 vector
    (`single_partition_of_fp32_groups`); the group vector is the ranks' slices end to end.
    ZeRO-3: each rank holds ceil(numel / world) elements of every parameter, in order, in `fp32_flat_groups`."""

    def __init__(self, ds_dir: Path, *, stage: int, world_size: int):
        if stage not in (1, 2, 3):
            raise SftDistError(f"{ds_dir}: ZeRO stage {stage} checkpoints cannot be exported (stages 1-3 can)")
        if not ds_dir.is_dir():
            raise SftDistError(f"{ds_dir}: missing (the checkpoint's DeepSpeed tag directory)")
        model_file = ds_dir / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3
                               else "mp_rank_00_model_states.pt")
        states = _load(model_file)
        optim_files = sorted(ds_dir.glob("*_optim_states.pt"), key=_rank_of)
        if len(optim_files) != world_size:
            raise SftDistError(f"{ds_dir}: {len(optim_files)} *_optim_states.pt files, but the manifest says "
                               f"{world_size} workers wrote it")
        optim = [_load(f)["optimizer_state_dict"] for f in optim_files]
        found = int(optim[0]["zero_stage"])
        if found != stage:
            raise SftDistError(f"{optim_files[0]}: ZeRO stage {found}, but the manifest says {stage}")
        shapes: list[dict[str, torch.Size]] = states["param_shapes"]
        self._where: dict[str, tuple[list[torch.Tensor] | list[list[torch.Tensor]], int, int]] = {}
        self.specs = {}
        if stage <= 2:
            self._index_zero12(shapes, [o["single_partition_of_fp32_groups"] for o in optim],
                               optim[0].get("param_alignment_paddings"), world_size, ds_dir)
        else:
            self._index_zero3(shapes, [o["fp32_flat_groups"] for o in optim], world_size, ds_dir)
        self._stage, self._world = stage, world_size
        for alias, source in (states.get("shared_params") or {}).items():
            if source in self._where:
                self._where[alias], self.specs[alias] = self._where[source], self.specs[source]

    def _index_zero12(self, shapes, partitions, paddings, world: int, ds_dir: Path) -> None:
        for g, group in enumerate(shapes):
            pieces = [p[g] for p in partitions]  # rank order: the group's vector is these end to end
            offset = 0
            for i, (name, shape) in enumerate(group.items()):
                numel = math.prod(shape)
                self._where[name] = (pieces, offset, numel)
                self.specs[name] = (torch.Size(shape), torch.float32)
                offset += numel + (paddings[g][i] if paddings else 0)
            # DeepSpeed pads each group to a multiple of 2 * world (as zero_to_fp32 checks).
            align = 2 * world
            avail = sum(p.numel() for p in pieces)
            if align * math.ceil(offset / align) != align * math.ceil(avail / align):
                raise SftDistError(f"{ds_dir}: param group {g} holds {avail} elements but its parameters need "
                                   f"{offset}; the checkpoint does not match its model states file")

    def _index_zero3(self, shapes, flat_groups, world: int, ds_dir: Path) -> None:
        offset = 0
        for group in shapes:
            for name, shape in group.items():
                numel = math.prod(shape)
                self._where[name] = (flat_groups, offset, numel)
                self.specs[name] = (torch.Size(shape), torch.float32)
                offset += math.ceil(numel / world)
        avail = sum(t.numel() for t in flat_groups[0])
        if offset != avail:
            raise SftDistError(f"{ds_dir}: each rank holds {avail} elements but the parameters need {offset}; "
                               "the checkpoint does not match its model states file")

    def load(self, name: str) -> torch.Tensor:
        shape = self.specs[name][0]
        src, offset, numel = self._where[name]
        if self._stage <= 2:
            flat = _read(src, offset, numel)
        else:
            per_rank = math.ceil(numel / self._world)
            flat = torch.cat([_read(rank_groups, offset, per_rank) for rank_groups in src])[:numel]
        return flat.clone().view(shape)


def _read(pieces: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """`length` elements from `start` of the vector the pieces form end to end (only those bytes are read)."""
    out, pos = [], 0
    for p in pieces:
        n = p.numel()
        lo, hi = max(start, pos), min(start + length, pos + n)
        if lo < hi:
            out.append(p.view(-1)[lo - pos:hi - pos])
        pos += n
        if pos >= start + length:
            break
    if sum(t.numel() for t in out) != length:
        raise SftDistError(f"a ZeRO partition is shorter than its parameters ({start}+{length} > {pos})")
    return out[0] if len(out) == 1 else torch.cat(out)


def _load(path: Path) -> dict:
    from sft_dist.checkpoint.deepspeed_io import safe_globals

    if not path.is_file():
        raise SftDistError(f"{path}: missing (written by a different ZeRO stage or world size?)")
    with torch.serialization.safe_globals(safe_globals()):
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - an unpickling error names the class that is not allowed
            raise SftDistError(f"{path}: cannot be read safely (weights_only=True): {e}") from None


def _rank_of(path: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(m.group(1)) if m else -1
