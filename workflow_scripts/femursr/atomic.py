"""Write outputs so that none is ever seen half-written: build under a temporary name beside the
target, then rename into place (atomic on one file system). On error the temporary is removed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the folder ``src`` to ``dst``, replacing what was there."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a temporary folder beside ``final``; it becomes ``final`` when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp", dir=final.parent))
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike):
    """Yield a temporary path beside ``final`` (same suffix); it becomes ``final`` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=final.suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_tsv(df, path: str | os.PathLike, **kw) -> None:
    """Write a DataFrame as TSV (no index) atomically; ``sep=","`` for CSV."""
    kw.setdefault("sep", "\t")
    with atomic_file(path) as tmp:
        df.to_csv(tmp, index=False, **kw)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
