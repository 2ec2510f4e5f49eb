"""DCP checkpoints are read without unpickling anything but DCP's metadata records (no code from a checkpoint)."""

from __future__ import annotations

import io
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from sft_dist.checkpoint import dcp_safe
from sft_dist.checkpoint.dcp_safe import UntrustedCheckpoint, parse_metadata


class RunsCode:
    """Pickles to `os.system(<cmd>)`: what a crafted .metadata holds."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def _save(path, *, bf16: bool = False) -> dict:
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    model = {k: (v.detach().bfloat16() if bf16 else v.detach()) for k, v in m.named_parameters()}
    state = {"model": model, "optim": get_optimizer_state_dict(m, opt)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    return state


def test_a_real_checkpoint_loads_exactly(tmp_path):
    saved = _save(tmp_path / "ck", bf16=True)
    meta = parse_metadata((tmp_path / "ck" / ".metadata").read_bytes())
    assert {"model.weight", "model.bias"} <= set(meta.state_dict_metadata)
    target = {"model": {k: torch.zeros_like(v) for k, v in saved["model"].items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_safe.load(target, tmp_path / "ck", no_dist=True)
    for k, v in saved["model"].items():
        assert torch.equal(target["model"][k], v)
        assert target["model"][k].dtype == torch.bfloat16


def test_optimizer_hyperparameters_load_with_weights_only(tmp_path):
    """Non-tensor items (param_groups: lr, betas, ...) are pickled bytes: read with weights_only=True."""
    saved = _save(tmp_path / "ck")
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=5.0)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    target = {"optim": get_optimizer_state_dict(m, opt)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_safe.load(target, tmp_path / "ck", no_dist=True)
    groups = target["optim"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(1e-3)
    assert groups[0]["betas"] == saved["optim"]["param_groups"][0]["betas"]


def test_crafted_metadata_never_runs(tmp_path):
    _save(tmp_path / "ck")
    marker = tmp_path / "pwned"
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(RunsCode(f"touch {marker}")))
    with pytest.raises(UntrustedCheckpoint, match=r"posix\.system|os\.system|not a DCP metadata type"):
        parse_metadata((tmp_path / "ck" / ".metadata").read_bytes())
    with pytest.raises(UntrustedCheckpoint):
        dcp_safe.load({"model": {"weight": torch.zeros(3, 4)}}, tmp_path / "ck", no_dist=True)
    assert not marker.exists()
    # torch's own reader would have run it: the attack is real.
    pickle.loads((tmp_path / "ck" / ".metadata").read_bytes())
    assert marker.exists()


def test_code_hidden_inside_a_real_metadata_is_refused(tmp_path):
    """A valid Metadata with a payload tucked into one of its fields."""
    _save(tmp_path / "ck")
    meta = pickle.loads((tmp_path / "ck" / ".metadata").read_bytes())
    marker = tmp_path / "pwned"
    meta.planner_data = {"x": RunsCode(f"touch {marker}")}
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(UntrustedCheckpoint, match="refused to unpickle"):
        parse_metadata((tmp_path / "ck" / ".metadata").read_bytes())
    assert not marker.exists()


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "sub/__0_0.distcp"])
def test_storage_paths_outside_the_checkpoint_are_refused(tmp_path, bad):
    _save(tmp_path / "ck")
    meta = pickle.loads((tmp_path / "ck" / ".metadata").read_bytes())
    first = next(iter(meta.storage_data))
    meta.storage_data[first].relative_path = bad
    with pytest.raises(UntrustedCheckpoint, match="not a file name inside the checkpoint"):
        parse_metadata(pickle.dumps(meta))


def test_not_a_metadata_at_all(tmp_path):
    with pytest.raises(UntrustedCheckpoint, match="not a DCP metadata file"):
        parse_metadata(b"garbage")
    with pytest.raises(UntrustedCheckpoint, match="not a Metadata"):
        parse_metadata(pickle.dumps({"state_dict_metadata": {}}))


def test_crafted_bytes_item_never_runs(tmp_path):
    """A non-tensor item (torch.save'd bytes) carrying a payload: weights_only refuses it."""
    saved = _save(tmp_path / "ck")
    meta = parse_metadata((tmp_path / "ck" / ".metadata").read_bytes())
    marker = tmp_path / "pwned"
    # Point one param_groups item at a file of our own holding a code-running torch.save pickle.
    index = next(i for i in meta.state_dict_metadata if i.startswith("optim.param_groups") and i.endswith(".lr"))
    info = next(v for k, v in meta.storage_data.items() if k.fqn == index)
    buf = io.BytesIO()
    torch.save(RunsCode(f"touch {marker}"), buf)
    (tmp_path / "ck" / "evil.distcp").write_bytes(buf.getvalue())
    info.relative_path, info.offset, info.length = "evil.distcp", 0, len(buf.getvalue())
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(meta))
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    target = {"optim": get_optimizer_state_dict(m, opt)}
    with pytest.raises(UntrustedCheckpoint, match="refused to unpickle"):
        dcp_safe.load(target, tmp_path / "ck", no_dist=True)
    assert not marker.exists()
    del saved
