"""output_dir/report.html: what a person opens instead of reading logs — loss and eval-loss curves,
throughput, memory and learning rate over the run, and the run summary (setup, batch geometry, backend,
time, data, checkpoints, config). One self-contained file (charts are embedded PNGs); the charts are
also written as output_dir/report/*.png. Built from metrics.jsonl, run_summary.json, plan.json and
config.yaml, so `sft-dist report OUTPUT_DIR` can rebuild it for any run, a stopped one included.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

from sft_dist.sizes import GIB

log = logging.getLogger("sft_dist")

# (file, title, y label, [(metrics key, legend, style)])
CHARTS = [
    ("loss", "Loss", "loss", [("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")]),
    ("throughput", "Throughput", "loss-carrying tokens/s (all ranks)", [("tokens_per_s", "tokens/s", "-")]),
    ("memory", "Peak memory per rank (max over ranks)", "GiB", [("peak_mem_bytes", "peak memory", "-")]),
    ("mfu", "Model FLOPs utilisation", "MFU", [("mfu", "MFU", "-")]),
    ("learning_rate", "Learning rate", "lr", [("learning_rate", "learning rate", "-")]),
    ("eval_answers", "Eval rows answered (metrics.generate_eval_rows)", "score against the reference",
     [("eval_exact_match", "exact match", "o-"), ("eval_token_f1", "token F1", "o-"),
      ("eval_rouge_l", "ROUGE-L", "o-")]),
]
SCALE = {"peak_mem_bytes": 1 / GIB}
STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:64em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}"
         "pre{background:#f6f6f6;padding:1em;overflow:auto}img{max-width:100%}")


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def set_losses(rows: list[dict]) -> list[str]:
    """The named eval sets' loss keys (eval_<name>_loss), in the order they were first logged."""
    return list(dict.fromkeys(k for r in rows for k in r if k.startswith("eval_") and k.endswith("_loss")
                              and k != "eval_loss"))


def render_charts(rows: list[dict]) -> dict[str, bytes]:
    """PNG bytes per chart that has data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = {}
    for name, title, ylabel, series in CHARTS:
        if name == "loss":  # and each named eval set's (data.eval_files: {name: files})
            series = series + [(k, f"eval loss: {k[5:-5]}", "o--") for k in set_losses(rows)]
        lines = [(key, label, style, [(r["step"], r[key] * SCALE.get(key, 1)) for r in rows
                                      if isinstance(r.get(key), (int, float))])
                 for key, label, style in series]
        lines = [x for x in lines if x[3]]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=100)
        for _, label, style, points in lines:
            xs, ys = zip(*points)
            ax.plot(xs, ys, style, label=label, linewidth=1.6, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        charts[name] = buf.getvalue()
    return charts


def _stopped_early(s: dict) -> str:
    """run_summary.json's `stopped_early` (train/early_stop.py) in words."""
    best = f"{s['best']:.4f}" if isinstance(s.get("best"), (int, float)) else "?"
    by = f" by more than {s['threshold']:g}" if s.get("threshold") else ""
    return (f"at step {s['step']} of {s['max_steps']}: {s['metric']} not improved on {best} (step {s['best_step']}){by} "
            f"for {s['patience']} evaluations (training.early_stopping_patience)")


def write_report(out: Path) -> Path:
    out = Path(out)
    rows = read_metrics(out)
    summary = _json(out / "run_summary.json")
    plan = _json(out / "plan.json")
    try:
        charts = render_charts(rows)
        chart_note = ""
    except ImportError:
        charts, chart_note = {}, "matplotlib is not installed: no charts (pip install 'sft-dist[report]')"
    (out / "report").mkdir(exist_ok=True)
    for name, png in charts.items():
        (out / "report" / f"{name}.png").write_bytes(png)
    page = _page(out, rows, summary, plan, charts, chart_note)
    path = out / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _page(out: Path, rows, summary: dict, plan: dict, charts: dict[str, bytes], note: str) -> str:
    e = html.escape
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    answered = [r for r in evals if "eval_rouge_l" in r]
    facts = [
        ("status", "finished" if summary else "no run_summary.json (stopped or still running)"),
        ("workers", (f"{summary.get('world_size', '?')} ({summary.get('launched_by', '?')}), device "
                     f"{summary.get('device', '?')}, backend {summary.get('backend', '?')}"
                     + (f", sequence parallel {summary['sequence_parallel']}"
                        if summary.get("sequence_parallel", 1) > 1 else ""))),
        ("steps", (f"{summary.get('global_step', train[-1]['step'] if train else 0)} of global batch "
                   f"{summary.get('global_batch', '?')}")),
        *([("stopped early", _stopped_early(summary["stopped_early"]))] if summary.get("stopped_early") else []),
        ("train time", f"{summary['train_seconds']:.1f} s" if "train_seconds" in summary else "?"),
        ("train loss", f"{train[0]['loss']:.4f} → {train[-1]['loss']:.4f}" if train else "none logged"),
        ("eval loss", (f"{evals[0]['eval_loss']:.4f} → {evals[-1]['eval_loss']:.4f} (perplexity "
                       f"{evals[-1].get('eval_perplexity', float('nan')):.2f})") if evals else "no eval"),
        *((f"eval loss: {k[5:-5]}", f"{evals[0].get(k, float('nan')):.4f} → {evals[-1].get(k, float('nan')):.4f}")
          for k in set_losses(evals)),
        *([("eval answers", f"exact match {answered[-1]['eval_exact_match']:.3f}, token F1 "
                            f"{answered[-1]['eval_token_f1']:.3f}, ROUGE-L {answered[-1]['eval_rouge_l']:.3f} over "
                            f"{answered[-1]['eval_generated']} rows at step {answered[-1]['step']}")]
          if answered else []),
        ("loss-carrying tokens", f"{summary.get('loss_tokens', '?')}"),
        ("parameters", f"{summary.get('trainable_params', '?')} trainable of {summary.get('total_params', '?')}"),
        ("resumed from", summary.get("resumed_from") or "—"),
        ("final weights", summary.get("final_dir", "—")),
    ]
    tput = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    if tput:
        tail = sorted(tput[len(tput) // 2:])  # second half: past warm-up
        facts.insert(4, ("tokens/s (median, 2nd half)", f"{tail[len(tail) // 2]:.0f} loss-carrying tokens/s"))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sft_dist report: {e(out.name)}</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<h1>sft_dist run: {e(str(out))}</h1>", "<h2>Summary</h2>", _table(facts)]
    if plan.get("geometry"):
        g = plan["geometry"]
        parts += ["<h2>Setup</h2>", _table([(k, v) for k, v in {**g, **plan.get("setup", {})}.items()])]
    parts.append("<h2>Curves</h2>")
    if note:
        parts.append(f"<p>{e(note)}</p>")
    for name, png in charts.items():
        parts.append(f"<p><img alt='{e(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>")
    samples = _samples(out)
    if samples:
        parts += ["<h2>Generation samples (greedy, at each evaluation)</h2>",
                  "<table><tr><th>step</th><th>prompt</th><th>completion</th></tr>"
                  + "".join(f"<tr><td>{s['step']}</td><td>{e(s['prompt'])}</td><td>{e(s['completion'])}</td></tr>"
                            for s in samples) + "</table>"]
    if summary.get("data"):
        parts += ["<h2>Data</h2>", _table([(k, json.dumps(v)) for k, v in summary["data"].items()])]
    if summary.get("checkpoints"):
        parts += ["<h2>Checkpoints</h2>", "<ul>" + "".join(f"<li>{e(str(c))}</li>" for c in summary["checkpoints"])
                  + "</ul>"]
    if summary.get("backend_applied"):
        parts += ["<h2>Backend as applied</h2>", f"<pre>{e(json.dumps(summary['backend_applied'], indent=2))}</pre>"]
    config = out / "config.yaml"
    if config.exists():  # written with secrets redacted
        parts += ["<h2>Config</h2>", f"<pre>{e(config.read_text(encoding='utf-8'))}</pre>"]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _samples(out: Path) -> list[dict]:
    path = out / "samples.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _table(rows) -> str:
    e = html.escape
    return "<table>" + "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in rows) + "</table>"
