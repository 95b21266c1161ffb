"""Glue between Snakemake rule scripts and the package: logging, and running scripts by hand."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace


def limit_threads(n: int) -> None:
    """One BLAS/OpenMP thread per declared rule thread, so that parallel jobs do not oversubscribe
    the cores. Call before numpy (or anything that loads BLAS) is imported."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


@contextlib.contextmanager
def script_logging(log_path: str | None):
    """Send this script's logging (and any traceback) to the rule's log file."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", handlers=handlers, force=True)
    try:
        yield logging.getLogger("femursr")
    except Exception:
        logging.getLogger("femursr").error("failed:\n%s", traceback.format_exc())
        raise


@contextlib.contextmanager
def stdout_to_log(log_path: str | None):
    """Append what the block prints (nnU-Net reports by ``print``) to the rule's log file."""
    if not log_path:
        yield
        return
    with open(log_path, "a", buffering=1) as fh, contextlib.redirect_stdout(fh):
        yield


class _Named(list):
    """A list whose items are also attributes, like snakemake's input/output/params."""

    def __init__(self, items: dict):
        super().__init__(items.values())
        for k, v in items.items():
            setattr(self, k, v)

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return super().__getitem__(key)


def mock_snakemake(*, input=None, output=None, params=None, log=None, wildcards=None, threads=1):
    """A stand-in for the ``snakemake`` object, to run a rule script by hand for debugging:

    >>> snakemake = mock_snakemake(output={"truth": "x/truth"}, params={...}, log=["x.log"])
    """
    return SimpleNamespace(
        input=_Named(input or {}),
        output=_Named(output or {}),
        params=_Named(params or {}),
        wildcards=_Named(wildcards or {}),
        log=list(log or [None]),
        threads=threads,
    )
