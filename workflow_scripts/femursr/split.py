"""The split of the subjects into training, validation and test (paper section 3.1: 60/20/20).

Imported at parse time by the workflow (``rules/common.smk``), so that the test subjects, whose
volumes the SR models are applied to, are known when the DAG is built: no torch here.

The split is a function of the subject ids, the fractions and the seed only. Each subject's
place in the draw is ``sha256("{seed}:{subject}")``, so the split does not depend on the order of
the sheet, and adding a subject moves no other subject between parts unless the part sizes
change. A subject whose ``split`` is fixed in the sheet keeps it; the others fill the parts
towards ``fraction * n``, after each part has received at least one subject.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_file

PARTS = ("train", "validation", "test")


class SplitError(ValueError):
    """The subjects cannot be split as configured."""


@dataclass(frozen=True)
class Split:
    """Subject -> part (``train``, ``validation``, ``test``) and where it came from (``seeded`` or
    ``sheet``), in the order of the cohort."""

    subjects: tuple[str, ...]
    part_of: dict
    source: dict

    def part(self, name: str) -> list[str]:
        """The subjects of one part, in cohort order."""
        if name not in PARTS:
            raise KeyError(f"split part must be one of {', '.join(PARTS)}, not {name!r}")
        return [s for s in self.subjects if self.part_of[s] == name]

    def rows(self) -> list[tuple[str, str, str]]:
        """(subject, part, source) in cohort order."""
        return [(s, self.part_of[s], self.source[s]) for s in self.subjects]


def _rank(seed: int, subject: str) -> str:
    return hashlib.sha256(f"{seed}:{subject}".encode()).hexdigest()


def split_subjects(subjects, fractions: dict, seed: int, fixed: dict | None = None) -> Split:
    """Split ``subjects`` into train/validation/test.

    ``fractions``: ``{"train": 0.6, "validation": 0.2, "test": 0.2}`` (must sum to 1);
    ``fixed``: subject -> part for subjects whose part is given (the sheet's ``split`` column;
    empty values and subjects not in ``subjects`` are ignored). Raises :class:`SplitError` when
    a part would be empty (fewer than 3 subjects, or a fixed split that leaves no subject free
    for a part), naming the subjects and the fix.
    """
    subjects = list(subjects)
    if len(set(subjects)) != len(subjects):
        dup = sorted({s for s in subjects if subjects.count(s) > 1})
        raise SplitError(f"split: subject id(s) {', '.join(dup)} appear more than once")
    frac = {p: float(fractions[p]) for p in PARTS}
    total = sum(frac.values())
    if any(f < 0 for f in frac.values()) or abs(total - 1.0) > 1e-6:
        raise SplitError(
            f"config split: the fractions train {frac['train']}, validation {frac['validation']}, "
            f"test {frac['test']} sum to {total:g}; they must be >= 0 and sum to 1"
        )
    n = len(subjects)
    if n < len(PARTS):
        raise SplitError(
            f"split: {n} subject(s) with both scans ({', '.join(subjects) or 'none'}); training, "
            "validation and test need at least one each, so at least 3 subjects with an LR and an HR scan"
        )
    part_of, source = {}, {}
    for s, p in (fixed or {}).items():
        if s in subjects and p:
            if p not in PARTS:
                raise SplitError(f"subject {s}: split {p!r} in the sheet; use one of {', '.join(PARTS)} or leave it empty")
            part_of[s], source[s] = p, "sheet"
    free = sorted((s for s in subjects if s not in part_of), key=lambda s: _rank(seed, s))
    count = {p: sum(1 for s in part_of if part_of[s] == p) for p in PARTS}

    def assign(s, p):
        part_of[s], source[s] = p, "seeded"
        count[p] += 1

    # first one subject for every part that has none, then fill towards fraction * n
    for p in PARTS:
        if count[p] == 0 and free:
            assign(free.pop(0), p)
    for s in free:
        assign(s, max(PARTS, key=lambda p: (frac[p] * n - count[p], -PARTS.index(p))))
    empty = [p for p in PARTS if count[p] == 0]
    if empty:
        raise SplitError(
            f"split: the {' and '.join(empty)} part(s) would be empty: the sheet's split column fixes "
            f"{len(fixed or {})} subject(s) and leaves none free for it; fix fewer subjects in the sheet"
        )
    return Split(tuple(subjects), part_of, source)


def write_split(split: Split, path: str | os.PathLike) -> Path:
    """Write the split as TSV (subject, split, source), atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            f.write("subject\tsplit\tsource\n")
            for row in split.rows():
                f.write("\t".join(row) + "\n")
    return path


def read_split(path: str | os.PathLike) -> Split:
    """Read a split written by :func:`write_split`."""
    path = Path(path)
    lines = [ln.split("\t") for ln in path.read_text().splitlines() if ln.strip()]
    if not lines or lines[0] != ["subject", "split", "source"]:
        raise SplitError(f"{path}: not a split table (header must be subject, split, source)")
    rows = lines[1:]
    for i, r in enumerate(rows, start=2):
        if len(r) != 3 or r[1] not in PARTS:
            raise SplitError(f"{path}, line {i}: expected subject, one of {', '.join(PARTS)}, source")
    return Split(tuple(r[0] for r in rows), {r[0]: r[1] for r in rows}, {r[0]: r[2] for r in rows})
