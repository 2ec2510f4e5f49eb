"""Packed rows on this device: every attention implementation that runs here, fed packed rows the way sft_dist's
PackedCollator feeds them (position_ids restarting per document, no attention_mask; flash attention and
varlen_attention: the micro-batch flattened into one row, with cu_seq_lens), gives each document the logits sdpa
gives it alone; Gemma 2 (soft-capped attention, no sdpa) and gpt-oss (learned sinks) on flex attention and flash
attention against eager,
with what `auto` picks for it on this device. bench/gpu.py's `isolation` step; the CPU suite checks eager, sdpa,
flex_attention and varlen_attention's CPU path in fp32 (tests/data/test_packing.py, tests/model/test_varlen.py).

Each case also reports `leak`: the same rows with position_ids running on across documents (what a batch that
lets documents see each other gives), the size a broken isolation would show.

    python bench/gpu/isolation.py --out FILE [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from timing import write_json


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    import torch
    from datasets import Dataset
    from transformers import AutoConfig
    from transformers.utils import import_utils

    from sft_dist.data.packing import pack_dataset
    from sft_dist.model import varlen
    from sft_dist.model.attention import causal_lm_class, choose

    varlen.register()

    cuda = a.device == "cuda"
    if cuda:  # fp32 means fp32 here: TF32 matmuls would differ between the packed and the single-document shapes
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:  # transformers compiles flex attention; on a CPU that is minutes of C++ builds, and the mask is the same
        import transformers.integrations.flex_attention as flex
        import transformers.masking_utils as masking
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex.WrappedFlexAttention.__call__ = lambda self: flex_attention
        masking.create_block_mask = lambda *x, **k: create_block_mask(*x, **{**k, "_compile": False})
    row = 1024 if cuda else 128
    rng = random.Random(0)
    docs = [[rng.randrange(3, 1024) for _ in range(rng.randint(8, row // 2))] for _ in range(24)]
    packed = pack_dataset(Dataset.from_dict({"input_ids": docs, "labels": docs, "sample_id": list(range(len(docs)))}),
                          row)
    rows = sorted(packed, key=lambda r: -len(r["seq_lengths"]))[:4]
    flash = [fa for fa, ok in (("flash_attention_2", import_utils.is_flash_attn_2_available()),
                               ("flash_attention_3", import_utils.is_flash_attn_3_available())) if ok and cuda]
    shape = dict(hidden_size=256 if cuda else 64, intermediate_size=512 if cuda else 128,
                 num_hidden_layers=4 if cuda else 2, num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
                 max_position_embeddings=2 * row)
    # Llama against sdpa; Gemma 2 (logit soft-capping, which sdpa cannot do; its own head dim of 256 on a GPU)
    # against eager, with what `auto` picks for it here (on a GPU: flex attention once its kernel ran right)
    # (bf16 only on a GPU: the dtype it trains in, and the one auto's probe checks)
    archs = [("llama", AutoConfig.for_model("llama", **shape), "sdpa",
              ["eager", "sdpa", "flex_attention", varlen.NAME, *flash], [torch.float32, torch.bfloat16]),
             ("gemma2", AutoConfig.for_model("gemma2", **shape, head_dim=256 if cuda else 16), "eager",
              ["flex_attention", *flash], [torch.bfloat16]),
             # gpt-oss: learned sinks, sliding and full layers, and a decoder that does not hand its mask builders
             # the position_ids (sft_dist's model/packed_positions.py does, as in training)
             ("gpt_oss", AutoConfig.for_model("gpt_oss", **shape, head_dim=64 if cuda else 16, num_local_experts=4,
                                              num_experts_per_tok=2, sliding_window=row // 4,
                                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
              "eager", ["eager", *(["flex_attention"] if cuda else []), *flash],  # flex: no sinks on a CPU
              [torch.bfloat16])]
    cases, autos = [], {}

    def write() -> None:  # after every case: a step killed at its timeout still leaves what it checked
        write_json(Path(a.out), {"device": a.device, "row": row, "rows": len(rows), "auto": autos,
                                           "documents": sum(len(r["seq_lengths"]) for r in rows), "cases": cases})

    for arch, config, ref_impl, impls, dtypes in archs:
        auto = choose("auto", causal_lm_class(config), model_type=arch, device=a.device, dtype=torch.bfloat16,
                      config=config)
        autos[arch] = {"name": auto.name, "reason": auto.reason}
        print(json.dumps({"arch": arch, "auto": autos[arch]}), flush=True)
        write()
        _cases(a.device, arch, config, ref_impl, impls, rows, docs, auto=auto.name,
               dtypes=dtypes if cuda else [torch.float32], cases=cases, write=write)
    return 0 if all(c["ok"] for c in cases) else 1


def _cases(device: str, arch: str, config, ref_impl: str, impls: list[str], rows, docs, *, auto: str,
           dtypes, cases: list[dict], write) -> None:
    """Each implementation's packed logits against `ref_impl` on each document alone, in each of `dtypes`: each
    case appended to `cases`, then `write()`."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sft_dist.data.packing import PackedCollator
    from sft_dist.model import packed_positions, varlen

    cuda = device == "cuda"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation=ref_impl, dtype=torch.float32)
    state = base.state_dict()
    for dtype in dtypes:
        reference = AutoModelForCausalLM.from_config(config, attn_implementation=ref_impl, dtype=dtype)
        reference.load_state_dict(state)
        reference.to(device).eval()
        for impl in impls:
            if (impl.startswith("flash") or impl == varlen.NAME and cuda) and dtype == torch.float32:
                continue  # flash attention computes in 16 bit only (torch's varlen kernel too)
            case = {"arch": arch, "attn": impl, "auto": impl == auto, "dtype": str(dtype).removeprefix("torch.")}
            try:
                model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=dtype)
                model.load_state_dict(state)
                model.to(device).eval()
                packed_positions.enable(model)  # as the trainer does for packed rows
                collate = PackedCollator(DataCollatorForLanguageModeling(pad_token_id=0), attn_implementation=impl)
                keys = ("input_ids", "labels", "position_ids", "seq_lengths")
                batch = collate([{k: r[k] for k in keys} for r in rows])
                case["layout"] = "flattened" if collate.flatten else "rows"
                batch.pop("labels")
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                # the control: position_ids running on and no boundaries given, so documents see each other
                joined = {k: v for k, v in batch.items() if not k.startswith(("cu_seq_lens", "max_length"))}
                joined["position_ids"] = torch.arange(batch["input_ids"].shape[1], device=device).expand_as(
                    batch["input_ids"])
                with torch.no_grad():
                    logits = model(**batch).logits.float()
                    joined = model(**joined).logits.float()
                worst = leak = scale = 0.0
                for r, packed_row in enumerate(rows):
                    i, start = (0, sum(len(x["input_ids"]) for x in rows[:r])) if collate.flatten else (r, 0)
                    for n, sid in zip(packed_row["seq_lengths"], packed_row["sample_ids"]):
                        with torch.no_grad():
                            alone = reference(torch.tensor([docs[sid]], device=device),
                                              use_cache=False).logits[0].float()
                        worst = max(worst, float((logits[i, start:start + n] - alone).abs().max()))
                        leak = max(leak, float((joined[i, start:start + n] - alone).abs().max()))
                        scale = max(scale, float(alone.abs().max()))
                        start += n
                tol = 1e-4 if dtype == torch.float32 else 3e-2 * max(scale, 1e-6)
                case.update(max_abs_diff=worst, leak=leak, max_abs_logit=scale, tol=tol,
                            ok=worst <= tol and worst < leak / 5)
            except Exception as e:  # noqa: BLE001 - one implementation failing is a result, not the end
                case.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            cases.append(case)
            write()
            print(json.dumps(case), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
