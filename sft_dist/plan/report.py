"""`sft-dist plan` as text for people (the JSON form is `Plan.as_dict`)."""

from __future__ import annotations

import json
import textwrap

from sft_dist.plan import Plan, setup
from sft_dist.sizes import format_bytes


def render(plan: Plan, *, diff: bool = True) -> str:
    errors, warnings = len(plan.errors), len(plan.findings) - len(plan.errors)
    lines = [f"verdict: {'REFUSED' if errors else 'OK'} ({errors} error(s), {warnings} warning(s))"]
    if diff:
        lines.append("changed from the defaults:" if plan.diff else "changed from the defaults: nothing")
        for key, d in plan.diff.items():
            lines.append(f"  {key:<40} {_short(d['value'])}   (default {_short(d['default'])})")
    s = setup(plan.facts)
    lines.append("setup: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s.items()))
    g = plan.geometry
    sp = g.get("sequence_parallel", 1)
    ranks = f"{g['world_size']} workers" if sp == 1 else (f"{g['world_size'] // sp} data-parallel groups of {sp} "
                                                          "workers")
    lines.append(f"batch: {g['micro_batch']} per device x {g['gradient_accumulation_steps']} accumulation x "
                 f"{ranks} = {g['global_batch']} sequences per optimizer step, up to "
                 f"{g['tokens_per_step_max']:,} tokens (max_length {g['max_length']}"
                 f"{', packed' if g['packing'] else ''})")
    if sp > 1:
        lines.append(f"  sequence parallel: each group's {sp} workers train the same rows, each worker a slice of "
                     f"{-(-g['max_length'] // sp)} tokens of every row; attention trades slices for heads by all-to-all")
    if g["sampling"] == "batch_rebalance":
        lines.append(f"  batch_rebalance: each step's {g['global_batch']} sequences re-divided by length: a micro-batch "
                     f"holds more short rows or fewer long ones, never more padded tokens than "
                     f"{g['micro_batch']} x the longest row")
    lines.append("rules:" if plan.findings else "rules: none fired (compatible)")
    for f in plan.findings:
        lines.append(f"  {f.severity:<7} [{f.rule}] {', '.join(f.keys)}")
        lines += textwrap.wrap(f.message, 110, initial_indent="          ", subsequent_indent="          ")
        lines += textwrap.wrap(f"fix: {f.fix}", 110, initial_indent="          ", subsequent_indent="          ")
    lines += memory_lines(plan)
    return "\n".join(lines)


def memory_lines(plan: Plan) -> list[str]:
    m = plan.memory
    if m is None:
        return [f"memory per rank: not estimated ({plan.memory_error or 'skipped'})"]
    out = [f"memory per rank (estimate, {plan.facts.world_size} worker(s), {plan.facts.device}):",
           f"  weights      {format_bytes(m.weights):>11}   (trainable {format_bytes(m.lora)})",
           f"  gradients    {format_bytes(m.gradients):>11}",
           f"  optimizer    {format_bytes(m.optimizer):>11}",
           f"  activations  {format_bytes(m.activations):>11}   "
           + ("(none kept: evaluation)" if m.detail.get("evaluation") else "(one micro-batch)"),
           f"  total        {format_bytes(m.total):>11}   "
           + ("(evaluation peak)" if m.detail.get("evaluation") else "(training peak)")]
    load_peak = m.detail.get("load_peak") or 0
    if load_peak > m.total:
        out.append(f"  load peak    {format_bytes(load_peak):>11}   (while the model is built, above the training "
                   "peak)")
    out += [f"  - {n}" for n in m.notes]
    for i, hint in enumerate(m.hints):
        out += textwrap.wrap(hint, 110, initial_indent="  hint: " if i == 0 else "    - ",
                             subsequent_indent="        " if i == 0 else "      ")
    return out


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
