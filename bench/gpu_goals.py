"""What a bench/gpu.py run says: issue 17's goals met or not, and what each one-change step says about a default.

Read off the steps' results (the dicts bench/gpu.py appends to gpu.jsonl), after the table in gpu.md. A goal whose
step did not run is "unmeasured", never met. A speed feature is read against the step it changes one thing of:
faster or slower by more than NOISE (10 steps on a GPU time within a few percent), and its loss curve's largest
distance from that step's (same weights, data, seed), so that a faster setting that trains differently shows.
"""

from __future__ import annotations

# the goals of issue 17: (step, what, key, at least / at most, threshold, unit)
GOALS = [
    ("sft_dist", "1.5B Llama shape, MFU", "mfu", ">=", 0.40, "%"),
    ("llama8b", "Llama-3-8B shape, MFU", "mfu", ">=", 0.45, "%"),
    ("llama8b", "Llama-3-8B shape from init_config, command to first optimizer step", "first_step_s", "<=", 60.0,
     " s"),
    ("llama8b_qlora", "Llama-3-8B QLoRA 4-bit, loss tokens/s", "tokens_per_s", ">=", 8000.0, ""),
    ("llama8b_qlora", "Llama-3-8B QLoRA 4-bit, peak GPU memory", "peak_gib", "<=", 24.0, " GiB"),
]
NOISE = 0.03

# one-change steps: (step, the step it changes, what it changes; None: the step's note says)
VARIANTS = [
    ("sft_dist_sdpa", "sft_dist", "model.attn_implementation: sdpa (the packed block mask)"),
    ("sft_dist_varlen_attention", "sft_dist", "model.attn_implementation: varlen_attention"),
    ("sft_dist_flex_attention", "sft_dist", "model.attn_implementation: flex_attention"),
    ("sft_dist_flash_attention_2", "sft_dist", "model.attn_implementation: flash_attention_2"),
    ("sft_dist_liger", "sft_dist", None),  # Liger switched the other way from auto's choice: its note says which
    ("sft_dist_peft_lora", "sft_dist", "lora.fused_forward: false (peft's own LoRA forward)"),
    ("paged_adamw_8bit", "sft_dist", "training.optim: paged_adamw_8bit"),
    ("sft_dist_compile", "sft_dist", "training.torch_compile: true"),
    ("lora_dropout_005", "sft_dist", "lora.dropout: 0.05 (sft_dist's default and the presets')"),
    ("llama8b_qlora_ckpt", "llama8b_qlora", "QLoRA at 4 x 2, every decoder layer checkpointed"),
    ("llama8b_qlora_every2", "llama8b_qlora", "QLoRA at 2 x 4, one decoder layer in two checkpointed"),
]


def _fmt(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value * 100:.1f}%"
    return f"{value:,.0f}{unit}" if unit == "" else f"{value:.1f}{unit}"


def goals(results: dict) -> list[str]:
    """One line per goal: met, missed (by how much) or unmeasured (and why)."""
    lines = []
    for step, what, key, op, threshold, unit in GOALS:
        r = results.get(step) or {}
        value = r.get(key) if r.get("status") == "ok" else None
        goal = f"{op} {_fmt(threshold, unit)}"
        if value is None:
            why = r.get("reason") or ("not run" if not r else f"status {r.get('status')}")
            lines.append(f"- {what} {goal}: unmeasured ({step}: {why})"[:300])
            continue
        met = value >= threshold if op == ">=" else value <= threshold
        lines.append(f"- {what} {goal}: {_fmt(value, unit)}, {'met' if met else 'NOT met'}")
    lines.append(_isolation(results.get("isolation") or {}))
    lines.append(_same_curve(results))
    mine, trl = results.get("sft_dist") or {}, results.get("trl_fastest") or {}
    if mine.get("tokens_per_s") and trl.get("tokens_per_s") and trl.get("status") == "ok":
        ratio = mine["tokens_per_s"] / trl["tokens_per_s"]
        lines.append(f"- sft_dist >= 1.0x plain TRL's fastest correct setting: {ratio:.2f}x "
                     f"({'met' if ratio >= 1.0 else 'NOT met'}; TRL: {trl.get('note', '')})"[:300])
    else:
        lines.append("- sft_dist >= 1.0x plain TRL's fastest correct setting: unmeasured")
    return lines


def _isolation(r: dict) -> str:
    """Packing isolation on this device's kernels (bench/gpu/isolation.py): every packed document's logits equal
    the document run alone, for each attention implementation, within its dtype's tolerance."""
    cases = r.get("cases") or []
    if not cases:
        return f"- packing isolation (a packed document's logits = the document alone): unmeasured " \
               f"({r.get('reason') or r.get('status') or 'not run'})"
    wrong = [c for c in cases if not c.get("ok")]
    auto = [c for c in wrong if c.get("auto")]
    checked = f"{len(cases)} cases ({', '.join(sorted({c['attn'] for c in cases}))})"
    if not wrong:
        return f"- packing isolation (a packed document's logits = the document alone): {checked}, met"
    names = "; ".join(f"{c.get('arch', 'llama')} {c['attn']} {c['dtype']}: "
                      + (f"{c['max_abs_diff']:.1e}" if "max_abs_diff" in c else c.get("error", "?")) for c in wrong)
    return (f"- packing isolation: {checked}, {len(wrong)} wrong"
            + (" (INCLUDING what auto picks: NOT met)" if auto else " (none of them auto's pick)") + f": {names}")[:400]


def _same_curve(results: dict) -> str:
    """The 1.5B step's loss curve against the 2026-12-04 default's (sdpa with the packed block mask): the goal
    asks for equal curves within bf16 noise."""
    ref = results.get("sft_dist_sdpa") or {}
    if ref.get("status") == "ok" and ref.get("max_dloss") is not None:
        return (f"- 1.5B loss curve against the 2026-12-04 default (sdpa with the packed block mask): largest "
                f"difference {ref['max_dloss']:.4f} over {min(len(ref.get('losses') or []), 99)} steps")
    if "already ran sdpa" in (ref.get("reason") or ""):
        return "- 1.5B loss curve against the 2026-12-04 default: the same run (auto picked sdpa)"
    return "- 1.5B loss curve against the 2026-12-04 default (sdpa with the packed block mask): unmeasured"


def variants(results: dict) -> list[str]:
    """One line per one-change step that trained next to the step it changes: its speed against that step's, its
    peak memory, its largest loss difference, and what that means for the default."""
    lines = []
    for step, base, what in VARIANTS:
        r, b = results.get(step) or {}, results.get(base) or {}
        if r.get("status") != "ok" or b.get("status") != "ok" or not r.get("tokens_per_s") or not b.get("tokens_per_s"):
            continue
        ratio = r["tokens_per_s"] / b["tokens_per_s"]
        verdict = ("no difference" if abs(ratio - 1) <= NOISE else
                   f"{(ratio - 1) * 100:.0f}% faster" if ratio > 1 else f"{(1 - ratio) * 100:.0f}% slower")
        peak = (f", peak {r['peak_gib']:.1f} GiB against {b['peak_gib']:.1f}" if r.get("peak_gib") and b.get("peak_gib")
                else "")
        loss = f", losses within {r['max_dloss']:.4f}" if r.get("max_dloss") is not None else ""
        lines.append(f"- {what or r.get('note') or step}: {ratio:.2f}x {base}'s tokens/s ({verdict}{peak}{loss})")
    return lines


def summary(results: dict) -> str:
    """The text after gpu.md's table."""
    out = ["", "Goals of issue 17:", *goals(results)]
    seen = variants(results)
    if seen:
        out += ["", f"One change at a time (against the step it changes; within {NOISE:.0%} counts as no difference):",
                *seen]
    return "\n".join(out) + "\n"
