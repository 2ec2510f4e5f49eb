"""What the bench scripts share: the machine line, one `sft-dist train` of a config dict, the result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine() -> str:
    """This machine in one line: cores, RAM, GPU (or none), torch version."""
    import torch

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
           else "no GPU")
    return f"{os.cpu_count()} CPU cores, {ram:.0f} GiB RAM, {gpu}, torch {torch.__version__.split('+')[0]}"


def run_sft_dist(cfg: dict, path: Path, what: str) -> str:
    """Write `cfg` to `path` and run `sft-dist train` on it from this checkout (local launcher); its stderr.
    A failed run ends the bench with the run's last lines."""
    path.write_text(json.dumps(cfg))
    # not inside another launcher; OMP_NUM_THREADS would override the launcher's per-worker default
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    r = subprocess.run([sys.executable, "-m", "sft_dist", "train", str(path)], capture_output=True, text=True,
                       check=False, env=env)
    if r.returncode:
        raise SystemExit(f"{what} failed:\n{r.stderr[-3000:]}")
    return r.stderr


def write_results(name: str, data: dict, markdown: str) -> None:
    """bench/results/<name>.json (what bench/suite.py reads) and <name>.md (the printed table)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown)


def run_concurrently(fn, items: list, jobs: int) -> list:
    """`[fn(x) for x in items]`, `jobs` at a time (threads: each `fn` waits on its own `sft-dist` processes), in
    the items' order. The first failure cancels what has not started and is raised once the running ones end."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(fn, x) for x in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
