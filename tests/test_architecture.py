"""The package's structure, read from its source with `ast` (nothing is imported, no process starts).

- Layers: every import (module-level or inside a function) goes to the importer's own layer or one below it.
- No import circles between subpackages.
- Nothing outside `backends/` branches on the backend's name: it asks the `Backend` object.
- No third-party module is patched at import time, and every patch of one at run time (always scoped: a context
  manager puts the original back) is listed, with its reason, in `SEAMS`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "sft_dist"

# Bottom to top; a module may import from its own layer and the layers below. The key is the subpackage or the
# top-level module ("" is the package root, which holds only __version__).
LAYERS: dict[str, int] = {
    # parse and check the config; leaf utilities
    "": 0, "config": 0, "errors": 0, "redact": 0, "quiet": 0, "sizes": 0, "digest": 0,
    # the pieces of a run; the strategies (Backend objects), which plan asks for their memory model
    "distributed": 1, "data": 1, "model": 1, "metrics": 1, "plan": 1, "rundir": 1, "generate": 1, "compare": 1,
    "hub": 1,
    "backends": 1,
    # the checkpoints, and the config checks that need the layers above config
    "checkpoint": 2, "validate": 2,
    # the training run (and its Trainer glue); the offline exporter, which reads checkpoints
    "train": 3, "export": 3,
    "cli": 4, "__main__": 4,
}

# Modules filed under a subpackage below the layer they work at: module -> (the area they count as, why).
MISFILED: dict[str, tuple[str, str]] = {
    "sft_dist.distributed.ray_train": ("cli", (
        "the Ray launcher: its worker function calls train.run.run and reports through train.ray_report, and the "
        "driver holds the run lock (rundir). A launcher, like cli's local launch; it leaves distributed/ with the "
        "Ray launch work")),
    "sft_dist.distributed.ray_trainer": ("cli", "ray_train's TorchTrainer: the same launcher"),
}

# Every place sft_dist swaps an attribute of a third-party module, and why. Each is scoped (restored on exit).
SEAMS: dict[tuple[str, str], str] = {
    ("sft_dist.train.hooks", "transformers.trainer.skip_first_batches"): (
        "during Trainer.train only: a resumed run's data loader starts at its cursor instead of HF replaying the "
        "sampler up to the resume point"),
    ("sft_dist.train.hooks", "transformers.trainer.deepspeed_load_checkpoint"): (
        "during Trainer.train only: sft_dist loads DeepSpeed's state itself, with a weights-only reader"),
    ("sft_dist.model.build", "transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref"): (
        "without_zero3_init: a random-init model is built whole, not under deepspeed.zero.Init, so its seeded "
        "weights are DDP's"),
    ("sft_dist.distributed.ray_train", "ray._private.parameter.RayParams"): (
        "_agent_on_any_port, around the embedded cluster's ray.init: its dashboard agent takes any free HTTP port "
        "instead of a fixed 52365, which another Ray node on the machine holds (ray.init waited ~3.5 s for it)"),
    ("sft_dist.plan.memory", "torch.is_autocast_enabled"): (
        "_meta_autocast, around the meta-device memory estimate: torch has no autocast for meta tensors; the "
        "step's code sees the run's"),
    ("sft_dist.plan.memory", "torch.get_autocast_dtype"): "_meta_autocast: the same, for the autocast dtype",
    ("sft_dist.plan.memory", "torch.autocast"): "_meta_autocast: the same, for peft's torch.autocast(meta)",
    ("sft_dist.plan.memory", "transformers.masking_utils.find_packed_sequence_indices"): (
        "_meta_autocast: a data-dependent check meta tensors cannot answer (the profile's rows are unpacked)"),
    **{("sft_dist.plan.memory", f"trl.kernels.chunked_logprob.{name}"): (
        "_device_loss_kernels, planning for a GPU: TRL's Triton loss tiles allocate nothing, unlike the torch "
        "fallback a CPU (and meta) run takes") for name in ("_forward_tile", "_backward_tile", "_addmm_fp32")},
}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return out


MODULES = _modules()


def _area(module: str) -> str:
    if module in MISFILED:
        return MISFILED[module][0]
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(module: str, tree: ast.Module) -> list[tuple[str, int]]:
    """(imported sft_dist module, line) for every import in `module`, at any depth."""
    is_package = (PACKAGE / Path(*module.split(".")[1:]) / "__init__.py").is_file()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((name, node.lineno))
    return [(name, line) for name, line in out if name == "sft_dist" or name.startswith("sft_dist.")]


def _arrows() -> list[tuple[str, str, int]]:
    return [(module, target, line) for module, tree in MODULES.items() for target, line in _imports(module, tree)
            if _area(module) != _area(target)]


def test_every_module_has_a_layer():
    assert sorted({_area(m) for m in MODULES} - set(LAYERS)) == []


def test_imports_point_down_the_layers():
    upward = [f"{module}:{line} imports {target} ({_area(module)}, layer {LAYERS[_area(module)]} -> "
              f"{_area(target)}, layer {LAYERS[_area(target)]})"
              for module, target, line in _arrows() if LAYERS[_area(target)] > LAYERS[_area(module)]]
    assert upward == []


def test_misfiled_modules_are_still_there():
    """A module that has moved (or gone) is taken off MISFILED."""
    assert sorted(set(MISFILED) - set(MODULES)) == []


def test_no_import_circles_between_subpackages():
    graph: dict[str, set[str]] = {}
    for module, target, _ in _arrows():
        graph.setdefault(_area(module), set()).add(_area(target))
    circles, done = [], set()

    def visit(area: str, path: list[str]) -> None:
        if area in path:
            circles.append(" -> ".join(path[path.index(area):] + [area]))
            return
        if area in done:
            return
        for nxt in sorted(graph.get(area, ())):
            visit(nxt, path + [area])
        done.add(area)

    for area in sorted(graph):
        visit(area, [])
    assert circles == []


# --- the backend is an object ----------------------------------------------------------------------------------

# Where the backend's name may still be compared with a string: the package that defines the strategies, and the
# plan's rules and setup line, which read `Facts` (plain values a test sets freely; `plan/facts.py` fills them
# from the Backend object).
NAME_TESTS_ALLOWED = ("sft_dist.backends", "sft_dist.plan.rules", "sft_dist.plan")
PROCESS_GROUP_BACKENDS = {"gloo", "nccl", "mpi"}


def _names_the_backend(node: ast.expr) -> bool:
    """`cfg.backend.type`, `backend.type`, a variable `backend`/`backend_type`, or an attribute `.backend`."""
    if isinstance(node, ast.Attribute) and node.attr == "type":
        node = node.value
        return isinstance(node, ast.Attribute) and node.attr == "backend" or isinstance(node, ast.Name) and node.id in (
            "backend", "b")
    if isinstance(node, ast.Name):
        return node.id in ("backend", "backend_type")
    return isinstance(node, ast.Attribute) and node.attr == "backend"


def _backend_name_tests(tree: ast.Module) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        strings = [s for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)
                   or isinstance(s, (ast.Tuple, ast.List, ast.Set)) and any(
                       isinstance(e, ast.Constant) and isinstance(e.value, str) for e in s.elts)]
        values = {e.value for s in strings for e in ([s] if isinstance(s, ast.Constant) else s.elts)
                  if isinstance(e, ast.Constant)}
        if values <= PROCESS_GROUP_BACKENDS:
            continue  # torch.distributed's backend (gloo / nccl), not the sharding strategy
        if strings and any(_names_the_backend(s) for s in sides):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_nothing_outside_backends_branches_on_the_backend_name():
    found = [f"{module}:{line}: {text}" for module, tree in MODULES.items()
             if module not in NAME_TESTS_ALLOWED and not module.startswith("sft_dist.backends.")
             for line, text in _backend_name_tests(tree)]
    assert found == []


def test_the_name_test_finds_what_it_looks_for():
    """The check above is not vacuous: the patterns it exists for are found."""
    tree = ast.parse("if cfg.backend.type == 'fsdp': pass\nx = backend in ('ddp', 'fsdp')\n"
                     "y = self.backend != 'deepspeed'\nz = b.type == 'ddp'\nok = backend.shard_format == 'dcp'\n")
    assert [line for line, _ in _backend_name_tests(tree)] == [1, 2, 3, 4]


# --- patches of third-party modules ---------------------------------------------------------------------------

SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _is_third_party(name: str) -> bool:
    top = name.split(".")[0]
    return bool(top) and top not in ("sft_dist", "__future__") and top not in sys.stdlib_module_names


def _own_nodes(scope: ast.AST):
    """The nodes of a module's or function's own code: nested functions are yielded, not entered."""
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, SCOPES):
            stack.extend(ast.iter_child_nodes(node))


def _bindings(scope: ast.AST) -> dict[str, str]:
    """Names the scope's own imports bind to third-party modules or objects, by dotted path."""
    out = {}
    for node in _own_nodes(scope):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _is_third_party(a.name):
                    out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_third_party(node.module or ""):
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.expr, bound: dict[str, str]) -> str | None:
    """`torch.autocast` -> "torch.autocast" when the chain starts at a third-party name, else None."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if attrs and isinstance(node, ast.Name) and node.id in bound:
        return ".".join([bound[node.id], *reversed(attrs)])
    return None


def _targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, (ast.Assign, ast.Delete)):
        raw = node.targets
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        raw = [node.target]
    else:
        return []
    return [e for t in raw for e in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t])]


def _setattr_helpers(tree: ast.Module) -> dict[str, int]:
    """Functions of a module that setattr on one of their parameters: name -> that parameter's position."""
    out = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = [a.arg for a in fn.args.args]
            for call in ast.walk(fn):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "setattr"
                        and call.args and isinstance(call.args[0], ast.Name) and call.args[0].id in params):
                    out[fn.name] = params.index(call.args[0].id)
    return out


def _patches(module: str, tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(dotted third-party target, line, at import time) for each attribute of a third-party module or object
    that `module` assigns, deletes or setattr's (directly or through a helper of its own), and for each call
    statement run at import time."""
    helpers = _setattr_helpers(tree)
    found: list[tuple[str, int, bool]] = []

    def scope(node: ast.AST, bound: dict[str, str], at_import: bool) -> None:
        bound = {**bound, **_bindings(node)}
        for n in _own_nodes(node):
            if isinstance(n, SCOPES):
                scope(n, bound, False)
            for target in _targets(n):
                if (dotted := _dotted(target, bound)) is not None:
                    found.append((dotted, n.lineno, at_import))
            if at_import and isinstance(n, ast.Expr) and isinstance(n.value, ast.Call):
                found.append((f"<a call at import time: {ast.unparse(n.value)[:60]}>", n.lineno, True))
            if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)):
                continue
            if n.func.id in ("setattr", "delattr") and len(n.args) >= 2:
                name = n.args[1].value if isinstance(n.args[1], ast.Constant) else "*"
                if (obj := _dotted(n.args[0], bound) or bound.get(getattr(n.args[0], "id", ""))) is not None:
                    found.append((f"{obj}.{name}", n.lineno, at_import))
            elif n.func.id in helpers and len(n.args) > helpers[n.func.id]:
                arg = n.args[helpers[n.func.id]]
                if (obj := _dotted(arg, bound) or bound.get(getattr(arg, "id", ""))) is not None:
                    found.extend((f"{obj}.{k.arg}", n.lineno, at_import) for k in n.keywords if k.arg)

    scope(tree, {}, True)
    return found


def _all_patches() -> list[tuple[str, str, int, bool]]:
    return [(module, target, line, at_import) for module, tree in MODULES.items()
            for target, line, at_import in _patches(module, tree)]


def test_nothing_is_patched_at_import_time():
    """Importing sft_dist changes no other library: no module-level assignment to a third-party module's
    attribute, and no module-level call made for its side effect."""
    assert [f"{m}:{line} {target}" for m, target, line, at_import in _all_patches() if at_import] == []


def test_every_runtime_patch_is_a_listed_seam():
    found = {(module, target) for module, target, _, _ in _all_patches()}
    assert sorted(found - set(SEAMS)) == [], "a new patch of a third-party module: add it to SEAMS, with why"
    assert sorted(set(SEAMS) - found) == [], "a seam is gone: take it off SEAMS"


def test_the_checks_see_a_patch():
    """The detector itself: an import-time assignment and call, a patch inside a function, one through a helper."""
    tree = ast.parse(
        "import torch\nimport transformers.trainer as hf\ntorch.compile = None\n"
        "def _swap(module, **names):\n    for k, v in names.items():\n        setattr(module, k, v)\n"
        "def f():\n    from trl.kernels import chunked_logprob\n    chunked_logprob._tile = 1\n"
        "    _swap(hf, skip_first_batches=2)\n"
        "f()\n")
    assert sorted(_patches("m", tree)) == [
        ("<a call at import time: f()>", 11, True), ("torch.compile", 3, True),
        ("transformers.trainer.skip_first_batches", 10, False), ("trl.kernels.chunked_logprob._tile", 9, False)]
