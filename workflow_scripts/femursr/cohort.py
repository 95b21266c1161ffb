"""The cohort: which subjects there are and where their scans are.

Two sources: the synthetic cohort (ids from the config, scans written by the workflow) and a
subjects sheet of real scans. Both are checked before any job starts, and every error names
the sheet, the subject and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "config" / "schemas"
SHEET_COLUMNS = ("subject", "lr", "hr", "split")


class CohortError(ValueError):
    """A problem with the subjects sheet or the cohort settings."""


def synthetic_ids(cfg_synthetic: dict) -> list[str]:
    """Subject ids of the synthetic cohort: ``{prefix}001`` ... in order."""
    n = int(cfg_synthetic["n_subjects"])
    width = max(3, len(str(n)))
    return [f"{cfg_synthetic['id_prefix']}{i:0{width}d}" for i in range(1, n + 1)]


def synthetic_sheet(ids: list[str], root: str = "results/synthetic") -> pd.DataFrame:
    """The subjects sheet that describes the synthetic cohort's scans (same schema as a user's)."""
    return pd.DataFrame(
        {
            "subject": ids,
            "lr": [f"{root}/{s}/lr_dicom" for s in ids],
            "hr": [f"{root}/{s}/hr_dicom" for s in ids],
            "split": [""] * len(ids),
        }
    )


def load_subjects(path: str | os.PathLike, *, check_paths: bool = True, base: str | os.PathLike = ".") -> pd.DataFrame:
    """Read and check a subjects sheet (TSV). Returns it indexed by subject id.

    Checks, each failing with a :class:`CohortError` that names the problem: the file exists
    and has the ``subject`` and ``lr`` columns; every row passes
    ``config/schemas/subjects.schema.yaml``; ids are unique; with ``check_paths`` every LR
    folder and HR folder/file exists (relative paths are taken from ``base``).
    """
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    path = Path(path)
    if not path.is_file():
        raise CohortError(f"subjects sheet {path} does not exist; create it (columns: {', '.join(SHEET_COLUMNS)}) or set `subjects:` in the config")
    df = pd.read_csv(path, sep="\t", dtype=str, comment="#", keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in ("subject", "lr") if c not in df.columns]
    if missing:
        raise CohortError(f"subjects sheet {path}: missing column(s) {', '.join(missing)}; the header must include subject and lr (tab-separated)")
    for col in ("hr", "split"):
        if col not in df.columns:
            df[col] = ""
    df = df.apply(lambda c: c.str.strip())
    for i, row in df.iterrows():
        try:
            validate(row.to_dict(), str(SCHEMA_DIR / "subjects.schema.yaml"))
        except WorkflowError as e:
            raise CohortError(f"subjects sheet {path}, line {i + 2} (subject {row['subject']!r}): {_first_line(e)}") from None
    dup = df["subject"][df["subject"].duplicated()].unique()
    if len(dup):
        raise CohortError(f"subjects sheet {path}: subject id(s) {', '.join(dup)} appear more than once; ids must be unique")
    if check_paths:
        base = Path(base)
        for _, row in df.iterrows():
            lr = base / row["lr"]
            if not lr.is_dir():
                raise CohortError(f"subject {row['subject']}: LR DICOM folder {row['lr']} (sheet {path}) does not exist; fix the lr column or remove the row")
            if row["hr"] and not (base / row["hr"]).exists():
                raise CohortError(f"subject {row['subject']}: HR scan {row['hr']} (sheet {path}) does not exist; fix the hr column, or leave it empty for a clinical-only patient")
    return df.set_index("subject", drop=False)


def _first_line(err: Exception) -> str:
    text = str(err)
    for line in text.splitlines():
        if "ValidationError" in line or "Error validating" not in line and line.strip():
            return line.strip()
    return text.strip()
