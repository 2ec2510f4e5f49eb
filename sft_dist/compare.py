"""Compare finished runs: per-step loss curves and final weights, as maximum relative deviations.

The numerical-equivalence check behind "one config, any backend": `sft-dist compare REF RUN...`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sft_dist.errors import SftDistError


@dataclass
class Deviation:
    run: str
    steps: int
    loss_max_rel: float  # max over steps of |loss - ref| / |ref|
    weights_rel_l2: float  # ||w - ref|| / ||ref|| over all final tensors (the pass/fail measure)
    weights_max_rel: float  # max over tensors of max|w - ref| / max|ref| (stricter, reported)
    tensors: int
    bitwise: bool = False  # every logged loss and every final tensor identical

    def within(self, tol: float) -> bool:
        return self.loss_max_rel <= tol and self.weights_rel_l2 <= tol


def loss_curve(run_dir: str | Path) -> dict[int, float]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SftDistError(f"{run_dir}: no metrics.jsonl (not a finished sft_dist run)")
    curve = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            curve[row["step"]] = row["loss"]
    return curve


def final_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    files = sorted((run_dir / "adapter").glob("*.safetensors")) or sorted((run_dir / "model").glob("*.safetensors"))
    if not files:
        raise SftDistError(f"{run_dir}: no adapter/ or model/ safetensors")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def compare(ref: str | Path, run: str | Path) -> Deviation:
    a, b = loss_curve(ref), loss_curve(run)
    if a.keys() != b.keys():
        raise SftDistError(f"{run}: logged steps {sorted(b)[:5]}... differ from {ref}'s {sorted(a)[:5]}...")
    loss_dev = max(abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in a)
    wa, wb = final_weights(ref), final_weights(run)
    if wa.keys() != wb.keys():
        missing = sorted(wa.keys() ^ wb.keys())[:3]
        raise SftDistError(f"{run}: saved tensors differ from {ref}'s (e.g. {missing})")
    w_dev, diff_sq, ref_sq = 0.0, 0.0, 0.0
    bitwise = all(a[s] == b[s] for s in a) and all(torch.equal(wa[k], wb[k]) for k in wa)
    for k in wa:
        x, y = wa[k].float(), wb[k].float()
        if x.shape != y.shape:
            raise SftDistError(f"{run}: tensor {k} has shape {tuple(y.shape)}, {ref} has {tuple(x.shape)}")
        diff_sq += (x - y).double().pow(2).sum().item()
        ref_sq += x.double().pow(2).sum().item()
        scale = x.abs().max().item()
        if scale > 0:
            w_dev = max(w_dev, (x - y).abs().max().item() / scale)
    rel_l2 = (diff_sq / ref_sq) ** 0.5 if ref_sq > 0 else (0.0 if diff_sq == 0 else float("inf"))
    return Deviation(str(run), len(a), loss_dev, rel_l2, w_dev, len(wa), bitwise)


def report(ref: str | Path, runs: list[str | Path], *, tol: float) -> tuple[list[Deviation], str]:
    devs = [compare(ref, r) for r in runs]
    lines = [f"reference: {ref}",
             f"{'run':<40} {'steps':>5} {'loss max rel':>13} {'weights rel L2':>15} {'weights max rel':>16}  ok"]
    for d in devs:
        lines.append(f"{d.run[-40:]:<40} {d.steps:>5} {d.loss_max_rel:>13.2e} {d.weights_rel_l2:>15.2e} "
                     f"{d.weights_max_rel:>16.2e}  {'yes' if d.within(tol) else 'NO'}")
    return devs, "\n".join(lines)


def as_json(devs: list[Deviation]) -> str:
    return json.dumps([asdict(d) for d in devs], indent=2)
