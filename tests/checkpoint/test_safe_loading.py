"""Checkpoint files are never unpickled: every torch.load in sft_dist passes weights_only=True."""

from __future__ import annotations

import ast

from tests.conftest import ROOT


def test_every_torch_load_is_weights_only():
    calls = []
    for path in (ROOT / "sft_dist").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func.value, "id", None) == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", ok))
    assert calls, "expected the checkpoint readers to call torch.load"
    assert [c for c, ok in calls if not ok] == []
