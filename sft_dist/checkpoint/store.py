"""Where checkpoints live: a local directory or an fsspec URL (s3://, gs://, ...), behind one small API.

Every rank writes its files to a local directory first (the checkpoint directory itself when the root is
local, a staging directory otherwise) and uploads only the files it wrote: no rank gathers another's shard.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class Store:
    def __init__(self, root: str, storage_options: dict | None = None):
        import fsspec

        self.url = root
        self.fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
        self.root = path.rstrip("/")
        self.local = _is_local(self.fs)
        if self.local:
            self.root = str(Path(self.root).resolve())

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def display(self, *parts: str) -> str:
        """The path as users give it (with the URL scheme for remote stores)."""
        if self.local:
            return self.path(*parts)
        scheme = self.url.split("://", 1)[0]
        return f"{scheme}://{self.path(*parts)}"

    def listdir(self) -> list[str]:
        """Names of the entries directly under the root (none if it does not exist)."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_text(self, *parts: str) -> str:
        with self.fs.open(self.path(*parts), "rb") as f:
            return f.read().decode("utf-8")

    def write_text(self, text: str, *parts: str) -> None:
        """Replace a small file atomically (readers see the old or the new content, never a mix)."""
        target = self.path(*parts)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint's files are as readable as the rest
            os.replace(tmp, target)
        else:  # an object PUT is atomic
            with self.fs.open(target, "wb") as f:
                f.write(text.encode("utf-8"))

    def files(self, *parts: str) -> dict[str, int]:
        """Relative path -> size of every file below a directory."""
        base = self.path(*parts)
        found = self.fs.find(base, detail=True)
        return {name[len(base) + 1:]: int(info["size"]) for name, info in found.items()
                if info.get("type") != "directory"}

    def upload(self, local_dir: Path, rel_files: list[str], *parts: str) -> None:
        for rel in rel_files:
            self.fs.put_file(str(local_dir / rel), self.path(*parts, rel))

    def download(self, dest: Path, *parts: str) -> Path:
        """Copy a checkpoint directory to local disk (for backends that read local files)."""
        dest.mkdir(parents=True, exist_ok=True)
        for rel in self.files(*parts):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self.path(*parts, rel), str(target))
        return dest

    def rename(self, src: str, dst: str) -> None:
        if self.local:
            os.replace(self.path(src), self.path(dst))
        else:
            self.fs.mv(self.path(src), self.path(dst), recursive=True)

    def remove(self, *parts: str) -> None:
        target = self.path(*parts)
        if self.local:
            shutil.rmtree(target, ignore_errors=True)
        elif self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def open(self, *parts: str, mode: str = "rb"):
        return self.fs.open(self.path(*parts), mode)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
