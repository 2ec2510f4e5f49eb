"""Reading `torch.distributed.checkpoint` (DCP) shards without running code from the checkpoint.

torch's `FileSystemReader` reads a checkpoint's `.metadata` with `pickle.load`, and `DefaultLoadPlanner`
reads every non-tensor item (optimizer hyper-parameters) with `torch.load(weights_only=False)`: whoever can
write to `checkpoint.dir` (a shared volume, a bucket) could run code on every rank that resumes or exports.
Here the metadata is unpickled by an allow-list that can only build DCP's own metadata records (plain
dataclasses, torch sizes and dtypes), the result is checked for the expected shape (every storage file a
plain name inside the checkpoint), and non-tensor items are read with `weights_only=True`. Anything else is
an `UntrustedCheckpoint`: the checkpoint is skipped or refused, never executed.
"""

from __future__ import annotations

import io
import pickle
from pathlib import PurePosixPath

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as md
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo

from sft_dist.errors import SftDistError

METADATA = ".metadata"

# Exactly the globals torch 2.x writes into a DCP `.metadata` (seen with pickletools on DDP and FSDP2
# checkpoints). Each builds inert data from plain values: no callable here runs user-chosen code.
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
              "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class UntrustedCheckpoint(SftDistError):
    """A checkpoint file that is not of the form sft_dist writes: never loaded."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UntrustedCheckpoint(f"{module}.{name} is not a DCP metadata type")


def parse_metadata(data: bytes, *, where: str = METADATA) -> md.Metadata:
    """A DCP `Metadata` from the bytes of a `.metadata` file, or UntrustedCheckpoint naming what is wrong."""
    try:
        meta = _MetadataUnpickler(io.BytesIO(data)).load()
    except UntrustedCheckpoint as e:
        raise UntrustedCheckpoint(f"{where}: refused to unpickle {e} (the file could run code)") from None
    except Exception as e:  # noqa: BLE001 - any malformed pickle is the same verdict
        raise UntrustedCheckpoint(f"{where}: not a DCP metadata file ({type(e).__name__}: {e})") from None
    _check_shape(meta, where)
    return meta


def _check_shape(meta, where: str) -> None:
    def bad(what: str):
        return UntrustedCheckpoint(f"{where}: unexpected metadata ({what})")

    if type(meta) is not md.Metadata:
        raise bad(f"a {type(meta).__name__}, not a Metadata")
    if not isinstance(meta.state_dict_metadata, dict):
        raise bad("state_dict_metadata is not a dict")
    for key, item in meta.state_dict_metadata.items():
        if not isinstance(key, str) or type(item) not in (md.TensorStorageMetadata, md.BytesStorageMetadata):
            raise bad(f"entry {key!r} is a {type(item).__name__}")
        if type(item) is md.TensorStorageMetadata and not isinstance(item.properties.dtype, torch.dtype):
            raise bad(f"entry {key!r} has no tensor dtype")
    if not isinstance(meta.storage_data, dict):
        raise bad("storage_data is not a dict")
    for index, info in meta.storage_data.items():
        if type(index) is not md.MetadataIndex or type(info) is not _StorageInfo:
            raise bad(f"storage entry {index!r}")
        path = info.relative_path
        if not isinstance(path, str) or "\\" in path or len(PurePosixPath(path).parts) != 1 or path in (".", ".."):
            raise bad(f"storage file {path!r} is not a file name inside the checkpoint")
        if not all(isinstance(d, str) for d in (info.transform_descriptors or ())):
            raise bad(f"storage file {path!r} has non-string transforms")


class SafeReader(dcp.FileSystemReader):
    """`FileSystemReader` whose metadata goes through `parse_metadata` (read once, then reused: `dcp.load`
    asks for it on every call)."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self._metadata: md.Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> md.Metadata:
        if self._metadata is None:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                meta = parse_metadata(f.read(), where=str(path))
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = md.StorageMeta()
            self._metadata = meta
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` that reads non-tensor items with `weights_only=True`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UntrustedCheckpoint(f"checkpoint item {read_item.dest_index.fqn}: refused to unpickle "
                                      f"({str(e).splitlines()[0]})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load(state: dict, path, *, no_dist: bool) -> None:
    """`dcp.load` of `state` from the shards at `path`, with nothing in the checkpoint able to run code.
    Raises UntrustedCheckpoint (one line, the same on every rank) for a checkpoint that is not of our form."""
    reader = SafeReader(str(path))
    reader.read_metadata()  # every rank reads the same file: all refuse it here, before any collective
    try:
        load_with(state, reader, no_dist=no_dist)
    except CheckpointException as e:
        raise first_untrusted(e) or e from None


def load_with(state: dict, reader: SafeReader, *, no_dist: bool = True) -> None:
    dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=no_dist)


def first_untrusted(e: CheckpointException) -> UntrustedCheckpoint | None:
    """DCP wraps each rank's failure with its traceback; an untrusted item is one line, not a traceback per rank."""
    for failure in e.failures.values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, UntrustedCheckpoint):
            return exc
    return None
