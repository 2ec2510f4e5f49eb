"""The tokenized-data cache: built once by all ranks in parallel, published atomically, memory-mapped after.

Layout under the cache directory (`data.cache_dir`):
  <key>/                       a published entry: train/, eval/ (`Dataset.save_to_disk`) and meta.json
  <key>.building-<token>/      one job's build: owner.json, part-r<R>/ + part-r<R>.json per rank > 0,
                               error.json if a rank failed, final/ (renamed to <key>/ to publish)

Protocol (every rank runs `load_or_build`):
  1. Rank 0 computes the key; on a miss it makes the build dir, named by a fresh random token. It shares
     {entry, build dir} with one broadcast (`share`), the only collective: every wait after it polls files,
     so a rank that fails cannot leave its peers stuck in a collective. (A token derived from MASTER_ADDR/PORT
     would need no broadcast, but a restarted job reuses both and would adopt its dead attempt's build dir.)
  2. Every rank reads the raw rows (cheap, and every rank then has the same sample ids), tokenizes its slice
     [r*n/W, (r+1)*n/W) of each split and writes it as part-r<R>/, then part-r<R>.json as its done mark
     (rank 0 keeps its own slice in memory).
  3. Rank 0 polls for every part, concatenates them in rank order (the rows of a single-process build, in
     its order), finalizes (bad-row counts, filters, stats), writes final/ with meta.json, fsyncs, and
     publishes with one os.rename(final, <key>). The other ranks poll for <key>/meta.json.
  4. A rank that fails writes error.json (the first one wins); every waiter polls for it and raises the same
     error, so a bad row found by any rank stops every rank at once, with the message naming file:line.

Only <key>/ is ever trusted, and it appears whole or not at all. A build dir never is: a builder that died
(SIGKILL, node loss) leaves one behind, which a later build of the same key sweeps, and that later build
uses a new token and dir. Two jobs building the same key race harmlessly: the first rename wins, the loser
uses the winner's entry. A published entry is never modified.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, List, Value, concatenate_datasets, load_from_disk

from sft_dist import __version__
from sft_dist.config.schema import DataConfig
from sft_dist.data.build import (
    Datasets,
    SplitStats,
    finalize,
    read_splits,
    row_tokenizer,
    tokenize_rows,
    warn_cut,
)
from sft_dist.data.cache_key import FORMAT, cache_key, default_cache_dir
from sft_dist.distributed.lifecycle import check_startup_stop, pid_alive
from sft_dist.errors import BadRow, ConfigError, DataError, SftDistError

log = logging.getLogger(__name__)

META = "meta.json"
BUILDING = ".building-"
ERROR = "error.json"
POLL_S = 0.05
SHARED_FS_WAIT_S = 10.0  # a network filesystem may show another host's new directory a little late


@dataclass
class CacheInfo:
    path: Path
    hit: bool
    seconds: float  # this process's load or build
    tokenized_rows: int  # rows this process tokenized: 0 on a hit
    meta: dict


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def load_or_build(cfg: DataConfig, tokenizer, *, seed: int, rank: int = 0, world_size: int = 1,
                  share: Callable[[dict], dict] | None = None, timeout_s: float = 600) -> tuple[Datasets, CacheInfo]:
    """The tokenized datasets from the cache, building them first (all ranks in parallel) on a miss.

    Args:
        share: with world_size > 1, a broadcast from rank 0 (called once by every rank).
        timeout_s: how long a rank waits for its peers' parts or the published entry.
    Raises DataError/BadRow as `build_datasets` does, on every rank, whichever rank found the problem."""
    t0 = time.monotonic()
    tok = row_tokenizer(cfg, tokenizer)  # applies data.chat_template, which the tokenizer's digest must see
    plan: dict = {}
    failed: Exception | None = None
    if rank == 0:
        try:
            plan = _plan(cfg, tokenizer, seed=seed, world_size=world_size, timeout_s=timeout_s)
        except Exception as e:  # noqa: BLE001 - the peers wait in the broadcast: they must hear of any failure
            failed, plan = e, {"error": _error_record(e, rank)}
    if world_size > 1:
        assert share is not None, "a parallel build needs `share` (a broadcast from rank 0)"
        plan = share(plan)
    if "error" in plan:
        raise failed or _from_record(plan["error"])
    entry = Path(plan["entry"])
    if plan["build"] is None:
        data, info = _load(entry, t0=t0)
        if rank == 0:
            log.info("data: cache hit %s (%d train rows, built %s)", entry, len(data.train), info.meta["created"])
            for line in info.meta["skipped"]:  # what the build logged
                log.info("%s", line)
            warn_cut(data.stats, cfg)
        return data, info
    build = Path(plan["build"])
    if rank != 0:
        _check_shared(build, rank)
    try:
        splits = read_splits(cfg, seed=seed)
        tokenized, mine = _write_part(cfg, tok, splits, build, rank=rank, world_size=world_size)
        if rank != 0:
            _wait_published(entry, build, timeout_s=timeout_s)
        else:
            parts = _wait_parts(build, splits, mine, world_size=world_size, timeout_s=timeout_s)
            data = finalize(cfg, splits, parts)
            meta = _meta(entry.name, data, plan, splits, world_size=world_size, seconds=time.monotonic() - t0)
            _publish(data, meta, build, entry)
    except BaseException as e:
        _write_error(build, e, rank)
        raise
    data, info = _load(entry, t0=t0)
    info.hit, info.tokenized_rows = False, tokenized
    if rank == 0:
        shutil.rmtree(build, ignore_errors=True)
        rows = sum(len(s.rows) for s in splits)
        log.info("data: tokenized %d rows in %.1f s on %d rank(s); cached at %s", rows, info.meta["build_seconds"],
                 world_size, entry)
        warn_cut(data.stats, cfg)
    return data, info


def _plan(cfg: DataConfig, tokenizer, *, seed: int, world_size: int, timeout_s: float) -> dict:
    root = cache_root(cfg)
    key, identity = cache_key(cfg, tokenizer, seed=seed)
    entry = root / key
    plan = {"entry": str(entry), "build": None, "identity": identity}
    if _complete(entry):
        return plan
    try:
        root.mkdir(parents=True, exist_ok=True)
        # Not complete, so never trusted: a hand-made or damaged directory. (Checked again: another job may have
        # published since, and a published entry is never touched.)
        if entry.exists() and not _complete(entry):
            entry.rename(root / f"{key}{BUILDING}damaged-{uuid.uuid4().hex[:8]}")
        _sweep(root, key, timeout_s=timeout_s)
        build = root / f"{key}{BUILDING}{uuid.uuid4().hex[:12]}"
        build.mkdir()
        _write_json(build / "owner.json", {"host": socket.gethostname(), "pid": os.getpid(),
                                           "world_size": world_size, "started": time.time()})
    except OSError as e:
        raise ConfigError(f"data.cache_dir: cannot write the data cache at {root} ({e.strerror or e}); point "
                          "data.cache_dir (or $SFT_DIST_CACHE) at a writable directory, or set data.cache=false") from None
    plan["build"] = str(build)
    return plan


def _complete(entry: Path) -> bool:
    try:
        meta = json.loads((entry / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("format") == FORMAT and meta.get("key") == entry.name


def _sweep(root: Path, key: str, *, timeout_s: float) -> None:
    """Remove build dirs of this key that no live builder owns: failed ones, ones whose owner process is gone
    (on this host), and ones without progress for longer than the timeout (any host)."""
    for d in root.glob(f"{key}{BUILDING}*"):
        try:
            owner = json.loads((d / "owner.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            owner = {}
        dead = (d / ERROR).exists() or "damaged-" in d.name
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            dead = dead or not pid_alive(owner["pid"])
        try:
            newest = max((p.stat().st_mtime for p in d.rglob("*")), default=d.stat().st_mtime)
        except OSError:
            continue  # removed meanwhile
        if dead or time.time() - newest > timeout_s:
            log.info("data: removing an unfinished cache build %s (its builder is gone)", d)
            shutil.rmtree(d, ignore_errors=True)


def _check_shared(build: Path, rank: int) -> None:
    deadline = time.monotonic() + SHARED_FS_WAIT_S
    while not build.is_dir():
        if time.monotonic() > deadline:
            raise ConfigError(
                f"data.cache_dir: rank {rank} cannot see {build}, which rank 0 created: the cache directory must be "
                "shared by every node of the job; point data.cache_dir at a shared filesystem, or set data.cache=false"
            )
        check_startup_stop()  # asked to stop (its peers too): do not wait for them
        time.sleep(POLL_S)


def _slice(n: int, rank: int, world_size: int) -> range:
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def _write_part(cfg: DataConfig, tok, splits, build: Path, *, rank: int, world_size: int
                ) -> tuple[int, dict[str, Dataset]]:
    """Tokenize this rank's slice of every split. Rank 0 keeps its slices in memory (it finalizes); the others
    write part-r<rank>/<split>/, then their done mark part-r<rank>.json. Returns (rows, rank 0's slices)."""
    t0 = time.monotonic()
    part = build / f"part-r{rank}"
    rows, mine = {}, {}
    for s in splits:
        ds = tokenize_rows(cfg, tok, s, _slice(len(s.rows), rank, world_size))
        rows[s.name] = len(ds)
        if not len(ds):
            continue
        # A slice of skipped rows only has no ids to infer the type from: give it the others'.
        for col in ("input_ids", "labels"):
            if ds.features[col] != List(Value("int64")):
                ds = ds.cast_column(col, List(Value("int64")))
        if rank == 0:
            mine[s.name] = ds
        else:
            # Scratch, not fsynced: a crash abandons the whole build, which only the rename publishes.
            ds.save_to_disk(str(part / s.name))
    if rank != 0:
        _write_json(build / f"part-r{rank}.json", {"rank": rank, "rows": rows, "seconds": time.monotonic() - t0})
    return sum(rows.values()), mine


def _wait_parts(build: Path, splits, mine: dict[str, Dataset], *, world_size: int, timeout_s: float
                ) -> dict[str, Dataset]:
    """Rank 0: its own slices and every other rank's part, concatenated in rank order, per split."""
    deadline = time.monotonic() + timeout_s
    missing = list(range(1, world_size))
    while True:
        _raise_if_failed(build)
        missing = [r for r in missing if not (build / f"part-r{r}.json").exists()]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise SftDistError(
                f"data: rank(s) {missing} did not finish tokenizing their part of the data within "
                f"launcher.timeout_s={timeout_s:g} s (no {build}/part-r{missing[0]}.json); a rank is stuck or "
                "died: see its log, or raise launcher.timeout_s for very large data"
            )
        check_startup_stop()  # asked to stop (its peers too): do not wait for them
        time.sleep(POLL_S)
    out = {}
    for s in splits:
        parts = [mine[s.name]] if s.name in mine else []
        parts += [load_from_disk(str(build / f"part-r{r}" / s.name)) for r in range(1, world_size)
                  if (build / f"part-r{r}" / s.name).is_dir()]
        out[s.name] = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return out


def _wait_published(entry: Path, build: Path, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not _complete(entry):
        _raise_if_failed(build)
        if not build.exists() and not _complete(entry):
            raise SftDistError(f"data: the cache build {build} disappeared before rank 0 published {entry}; "
                               "rank 0 failed (see its message) or something removed the directory")
        if time.monotonic() > deadline:
            raise SftDistError(f"data: rank 0 did not publish the tokenized data at {entry} within "
                               f"launcher.timeout_s={timeout_s:g} s; see rank 0's log, or raise launcher.timeout_s")
        check_startup_stop()  # asked to stop (its peers too): do not wait for them
        time.sleep(POLL_S)


def _raise_if_failed(build: Path) -> None:
    try:
        record = json.loads((build / ERROR).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    raise _from_record(record)


def _error_record(e: BaseException, rank: int) -> dict:
    return {"rank": rank, "type": type(e).__name__, "message": str(e), "kind": getattr(e, "kind", None),
            "problems": getattr(e, "problems", None), "user_error": isinstance(e, SftDistError)}


def _from_record(record: dict) -> SftDistError:
    """The error another rank hit, as this rank's: user errors keep their type (so each is reported once,
    without naming a rank), anything else says which rank failed."""
    if record["type"] == "BadRow":
        return BadRow(record["message"], record.get("kind") or "bad row")
    if record["type"] == "DataError":
        return DataError(record["message"])
    if record["type"] == "ConfigError":
        return ConfigError(record["problems"])
    if record["user_error"]:
        return SftDistError(record["message"])
    return SftDistError(f"data: the cache build failed on rank {record['rank']}: {record['type']}: "
                        f"{record['message']}")


def _write_error(build: Path, e: BaseException, rank: int) -> None:
    """error.json for the waiting ranks; the first failure wins (a link never replaces a file)."""
    if (build / ERROR).exists() or not build.is_dir():
        return
    tmp = build / f".error-r{rank}.json"
    try:
        tmp.write_text(json.dumps(_error_record(e, rank)), encoding="utf-8")
        os.link(tmp, build / ERROR)
    except OSError:
        pass  # another rank's error is there already, or the directory is gone: nothing to add
    finally:
        tmp.unlink(missing_ok=True)


def _meta(key: str, data: Datasets, plan: dict, splits, *, world_size: int, seconds: float) -> dict:
    stats = {name: vars(s) for name, s in data.stats.items()}
    return {
        "format": FORMAT,
        "key": key,
        "rows": {name: len(getattr(data, name)) for name in stats},
        "tokens": {name: s["tokens"] for name, s in stats.items()},
        "stats": stats,
        "skipped": [s.bad.summary(s.name) for s in splits if s.bad.count],
        "build_seconds": round(seconds, 3),
        "built_by_ranks": world_size,
        "sft_dist_version": __version__,
        "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "sources": sorted({s.source for s in splits}),
        "identity": plan["identity"],
    }


def _publish(data: Datasets, meta: dict, build: Path, entry: Path) -> None:
    final = build / "final"
    data.train.save_to_disk(str(final / "train"))
    if data.eval is not None:
        data.eval.save_to_disk(str(final / "eval"))
    _write_json(final / META, meta)
    _fsync_tree(final)
    try:
        os.rename(final, entry)
    except OSError:
        if not _complete(entry):  # not another job's finished entry: a real failure
            raise
        log.info("data: another job published %s first; using it", entry)
    _fsync_dir(entry.parent)


def _load(entry: Path, *, t0: float) -> tuple[Datasets, CacheInfo]:
    """Memory-mapped: every rank of a node shares the page cache of the one copy on disk."""
    meta = json.loads((entry / META).read_text(encoding="utf-8"))
    data = Datasets(train=load_from_disk(str(entry / "train"), keep_in_memory=False), eval=None)
    if (entry / "eval").is_dir():
        data.eval = load_from_disk(str(entry / "eval"), keep_in_memory=False)
    data.stats = {name: SplitStats(**s) for name, s in meta["stats"].items()}
    return data, CacheInfo(entry, hit=True, seconds=time.monotonic() - t0, tokenized_rows=0, meta=meta)


def _write_json(path: Path, value: dict) -> None:
    """Whole or absent: written aside, fsynced, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        else:
            _fsync_dir(p)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
