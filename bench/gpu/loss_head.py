"""The LM head and its loss alone: forward + backward time and peak memory of the output projection and the
token-level cross entropy over one micro-batch of the 1.5B Llama shape (8 x 2048 tokens, hidden 2048, vocab
128256, bf16, the head frozen as in a LoRA run), per implementation: TRL's fused chunked log-prob head (what
SFTTrainer, and so sft_dist, trains with), Liger's fused linear cross entropy (which sft_dist refuses while TRL's
head is on), and the plain full-logits path. Issue 17 asks for whichever is faster: this is the measurement.
bench/gpu.py's `loss_head` step.

    python bench/gpu/loss_head.py --out FILE [--device cuda] [--iters 10]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from timing import time_steps, write_json


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    import torch

    cuda = a.device == "cuda"
    tokens, hidden, vocab = (8 * 2048, 2048, 128256) if cuda else (512, 64, 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator(device=a.device).manual_seed(0)
    x0 = torch.randn(tokens, hidden, device=a.device, dtype=dtype, generator=gen)
    weight = (torch.randn(vocab, hidden, device=a.device, dtype=dtype, generator=gen) * hidden ** -0.5)
    labels = torch.randint(0, vocab, (tokens,), device=a.device, generator=gen)
    labels[::7] = -100  # prompt positions carry no loss, as in SFT rows

    # built inside each case's try: an import that fails (a Liger built for another torch) is that case's result
    cases = {"trl_chunked": trl_chunked, "plain": plain}
    if cuda and importlib.util.find_spec("liger_kernel") is not None:
        cases["liger_flce"] = liger_flce
    results = []
    for name, make in cases.items():
        case = {"head": name}
        try:
            loss_fn = make()

            def step() -> tuple[float, torch.Tensor]:
                x = x0.detach().requires_grad_(True)
                loss = loss_fn(x, weight, labels)
                loss.backward()
                return loss, x.grad

            loss, grad = step()  # the values compared; Triton compiles here
            ms, base = time_steps(step, a.iters, cuda=cuda)
            case.update(ms_per_step=round(ms, 2), loss=float(loss.detach()),
                        loss_tokens_per_s=round(int(labels.ne(-100).sum()) / ms * 1e3),
                        peak_extra_gib=round((torch.cuda.max_memory_allocated() - base) / 2**30, 2) if cuda else None)
            case["_grad"] = grad.float()
        except Exception as e:  # noqa: BLE001 - one implementation failing is a result
            case["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        results.append(case)
    ref = next((c for c in results if c["head"] == "plain" and "_grad" in c), None)
    ref_grad = ref.pop("_grad") if ref is not None else None  # taken first: every case is compared with it
    for c in results:
        grad = c.pop("_grad", None)
        if ref is not None and grad is not None:
            c["loss_diff_vs_plain"] = abs(c["loss"] - ref["loss"])
            c["grad_max_diff_vs_plain"] = float((grad - ref_grad).abs().max())
        print(json.dumps(c), flush=True)
    fastest = min((c for c in results if "ms_per_step" in c), key=lambda c: c["ms_per_step"], default=None)
    write_json(Path(a.out), {"device": a.device, "tokens": tokens, "hidden": hidden, "vocab": vocab,
                                       "dtype": str(dtype).removeprefix("torch."), "cases": results,
                                       "fastest": fastest["head"] if fastest else None})
    return 0 if all("error" not in c for c in results) else 1


def trl_chunked():
    """TRL's head as SFTTrainer calls it (trl/trainer/utils.py add_fused_lm_head): the loss-carrying positions
    only, with the entropy and top-1 outputs its metrics read."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import utils

    chunk = getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 4096)

    def loss(x, weight, labels):
        mask = labels != -100
        log_probs = ChunkedLogProbFunction.apply(x[mask], weight, None, labels[mask], 1.0, chunk, None, 1.0,
                                                 ("log_probs", "entropy", "is_top1"))[0]
        return -log_probs.sum() / mask.sum()

    return loss


def liger_flce():
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)

    def loss(x, weight, labels):
        return fn(weight, x, labels)

    return loss


def plain():
    import torch

    def loss(x, weight, labels):
        return torch.nn.functional.cross_entropy((x @ weight.T).float(), labels, ignore_index=-100)

    return loss


if __name__ == "__main__":
    raise SystemExit(main())
