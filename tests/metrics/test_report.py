"""report.html: self-contained, well-formed, and its charts hold the curves (pixels of each series' colour)."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest

from sft_dist.metrics.report import write_report

BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two series colours


def pixels(png: bytes) -> np.ndarray:
    import matplotlib.image

    return (matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3] * 255).round().astype(int)


def share_of(img: np.ndarray, rgb) -> float:
    return float((np.abs(img - np.array(rgb)).sum(-1) < 30).mean())


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: dict[str, bytes] = {}
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images[a["alt"]] = base64.b64decode(a["src"].split(",", 1)[1])
        elif tag not in ("meta", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, f"unbalanced </{tag}>"


def check_report(out) -> dict[str, np.ndarray]:
    """Parse out/report.html; return its charts as RGB arrays after checking they are not blank."""
    page = (out / "report.html").read_text(encoding="utf-8")
    parser = Images()
    parser.feed(page)
    assert parser.open == []
    charts = {}
    for name, png in parser.images.items():
        assert (out / "report" / f"{name}.png").read_bytes() == png
        img = pixels(png)
        assert img.shape[0] >= 300 and img.shape[1] >= 600
        assert share_of(img, (255, 255, 255)) < 0.97  # axes, labels and a curve, not an empty canvas
        charts[name] = img
    return charts


@pytest.fixture
def run(tmp_path):
    rows = [{"step": s, "loss": 7 - s * 0.2, "learning_rate": 1e-3, "tokens_per_s": 500 + s,
             "peak_mem_bytes": 2**30 + s} for s in range(1, 21)]
    rows += [{"step": 10, "eval_loss": 5.5, "eval_perplexity": 244.7}, {"step": 20, "eval_loss": 4.0,
                                                                         "eval_perplexity": 54.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run_summary.json").write_text(json.dumps({"world_size": 2, "global_step": 20, "train_seconds": 3.5,
                                                           "checkpoints": ["checkpoint-10", "checkpoint-20"]}))
    (tmp_path / "config.yaml").write_text("model:\n  name_or_path: x\n")
    (tmp_path / "samples.jsonl").write_text(json.dumps({"step": 20, "prompt": "Diga <oi>", "completion": "oi & tchau"})
                                            + "\n")
    return tmp_path


def test_report_shows_the_curves_and_the_summary(run):
    write_report(run)
    charts = check_report(run)
    assert set(charts) == {"loss", "throughput", "memory", "learning_rate"}  # no MFU logged: no MFU chart
    assert share_of(charts["loss"], BLUE) > 0.002 and share_of(charts["loss"], ORANGE) > 0.0005  # train + eval
    page = (run / "report.html").read_text()
    for text in ("6.8000 → 3.0000", "4.0000 (perplexity 54.60)", "checkpoint-20", "3.5 s", "name_or_path: x",
                 "<td>Diga &lt;oi&gt;</td><td>oi &amp; tchau</td>"):
        assert text in page


def test_a_stopped_run_without_summary_still_gets_a_report(run):
    (run / "run_summary.json").unlink()
    write_report(run)
    assert "no run_summary.json (stopped or still running)" in (run / "report.html").read_text()
    assert check_report(run)


def test_scored_eval_answers_get_their_chart_and_summary_line(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r, (em, f1, rl) in zip((r for r in rows if "eval_loss" in r), ((0.0, 0.1, 0.1), (0.25, 0.5, 0.4))):
        r.update(eval_generated=4, eval_exact_match=em, eval_token_f1=f1, eval_rouge_l=rl)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(run)
    charts = check_report(run)
    assert share_of(charts["eval_answers"], BLUE) > 0.0005 and share_of(charts["eval_answers"], ORANGE) > 0.0005
    assert "exact match 0.250, token F1 0.500, ROUGE-L 0.400 over 4 rows at step 20" in (run / "report.html").read_text()


def test_named_eval_sets_get_their_curves_and_an_early_stop_its_line(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r, (pt, en) in zip((r for r in rows if "eval_loss" in r), ((5.0, 6.0), (3.5, 4.5))):
        r.update(eval_pt_loss=pt, eval_en_loss=en)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((run / "run_summary.json").read_text())
    summary["stopped_early"] = {"step": 20, "max_steps": 100, "metric": "eval_pt_loss", "best": 3.25, "best_step": 10,
                                "last": 3.5, "patience": 1, "threshold": 0.0}
    (run / "run_summary.json").write_text(json.dumps(summary))
    write_report(run)
    charts = check_report(run)
    green = (0x2C, 0xA0, 0x2C)  # matplotlib's third series colour: the first named set's eval loss
    assert share_of(charts["loss"], green) > 0.0005
    page = (run / "report.html").read_text()
    assert "<th>eval loss: pt</th><td>5.0000 → 3.5000</td>" in page and "eval loss: en" in page
    assert ("at step 20 of 100: eval_pt_loss not improved on 3.2500 (step 10) for 1 evaluations "
            "(training.early_stopping_patience)") in page
