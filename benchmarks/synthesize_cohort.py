"""Benchmark: time to generate the default demo cohort with `snakemake -c2`, against its budget.

The foundation issue's target is under 2 minutes on 2 cores for the demo cohort. Runs the
workflow's two synthetic rules in a scratch directory and prints the wall time, the per-subject
times from the rules' benchmark files, and the ratio to the budget.

    .venv/bin/python benchmarks/synthesize_cohort.py [--cores 2] [--keep DIR]
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 120.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--keep", help="keep the results in this directory")
    a = ap.parse_args()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="femursr-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    cmd = [snakemake, "-s", str(REPO / "Snakefile"), "-d", str(work), "--configfile", str(REPO / "config/config.yaml"),
           f"-c{a.cores}", "synthesize_cohort", "--quiet"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    per = pd.concat([pd.read_csv(p, sep="\t") for p in sorted((work / "benchmarks/results/synthesize_subject").glob("*.tsv"))])
    print(f"demo cohort: {len(per)} subjects on {a.cores} cores in {wall:.1f} s wall")
    print(f"per subject: mean {per['s'].mean():.2f} s, max {per['s'].max():.2f} s, peak RSS {per['max_rss'].max():.0f} MB")
    print(f"ratio to the {BUDGET_S:.0f} s budget: {wall / BUDGET_S:.2f}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
