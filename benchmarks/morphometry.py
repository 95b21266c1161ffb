"""Benchmark: exact Hildebrand local thickness (femursr.morphometry) against its peers.

Usage (one command; it builds its own virtual environment with the peers, then runs this file):

    bash benchmarks/morphometry.sh            # sizes 128 and 256
    bash benchmarks/morphometry.sh 128        # one size

Structure: Gaussian-filtered white noise (sigma 4 voxels) thresholded at BV/TV 0.25, unit voxels,
the same array for every method; bone (Tb.Th) and marrow (Tb.Sp) both measured, times summed.
Each (method, size) runs in its own process after a small warm-up call (so numba compilation is
not timed), which also gives a clean peak memory figure (ru_maxrss).

Peers, measured in the same run:
* ``ormir_exact``: ORMIR_XCT ``compute_local_thickness_from_mask(oversample=False,
  skeletonize=False)`` - paints every voxel's ball: the exact voxel-level reference;
* ``ormir_default``: the same function with its defaults (oversampled distances, skeleton only);
* ``localthickness``: the ``localthickness`` package (Dahl & Dahl), approximate; radii x 2;
* ``porespy``: ``porespy.filters.local_thickness`` with its defaults, approximate; radii x 2;
* ``edt_floor``: the Euclidean distance transforms alone (``edt``), the floor of any exact method.

Printed per size: time (s), peak memory (MB), mean Tb.Th and Tb.Sp (voxels), each method's time
as a ratio to ours, our time as a multiple of the EDT floor, and our deviation from the exact
reference. Results are also written to benchmarks/results/morphometry.tsv.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
METHODS = ["femursr", "ormir_exact", "ormir_default", "localthickness", "porespy", "edt_floor"]


def structure(n: int, seed: int = 0) -> np.ndarray:
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    a = ndi.gaussian_filter(rng.standard_normal((n, n, n)).astype(np.float32), 4)
    return a > np.quantile(a, 0.75)


def thickness_fn(method: str):
    """A function phase -> local thickness map (diameters, voxels) for ``method``."""
    if method == "femursr":
        sys.path.insert(0, str(HERE.parent / "workflow_scripts"))
        from femursr.morphometry import local_thickness

        return local_thickness
    if method.startswith("ormir"):
        from ormir_xct.core.util.hildebrand_thickness import compute_local_thickness_from_mask

        if method == "ormir_exact":
            return lambda m: compute_local_thickness_from_mask(m, 1.0, oversample=False, skeletonize=False)
        return lambda m: compute_local_thickness_from_mask(m, 1.0)
    if method == "localthickness":
        import localthickness

        return lambda m: 2.0 * localthickness.local_thickness(m)
    if method == "porespy":
        import porespy

        return lambda m: 2.0 * porespy.filters.local_thickness(m)
    if method == "edt_floor":
        import edt

        return lambda m: edt.edt(m, black_border=False, parallel=1)
    raise ValueError(method)


def run_one(method: str, n: int) -> dict:
    warnings.filterwarnings("ignore")
    fn = thickness_fn(method)
    small = structure(24, seed=1)
    fn(small)
    fn(~small)  # warm-up: numba compilation, imports
    bone = structure(n)
    t0 = time.perf_counter()
    th = fn(bone)
    t1 = time.perf_counter()
    sp = fn(~bone)
    t2 = time.perf_counter()
    out = {"method": method, "size": n, "seconds": t2 - t0, "seconds_bone": t1 - t0, "seconds_marrow": t2 - t1}
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if method != "edt_floor":
        out["tb_th_vox"] = float(np.asarray(th)[bone].mean())
        out["tb_sp_vox"] = float(np.asarray(sp)[~bone].mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[128, 256])
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]))))
        return
    env = dict(os.environ)
    rows = []
    for n in args.sizes:
        for m in args.methods:
            res = subprocess.run([sys.executable, __file__, "--one", m, str(n)], capture_output=True, text=True, env=env)
            if res.returncode:
                print(f"{m} {n}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {n}^3 {m:15s} {r['seconds']:8.2f} s  peak {r['peak_mb']:7.0f} MB", flush=True)
    import pandas as pd

    df = pd.DataFrame(rows)
    lines = []
    for n, g in df.groupby("size"):
        g = g.set_index("method")
        ours = g.loc["femursr"]
        ref = g.loc["ormir_exact"] if "ormir_exact" in g.index else None
        lines.append(f"\n{n}^3, BV/TV 0.25, bone + marrow")
        lines.append(f"{'method':15s} {'time s':>8s} {'peak MB':>8s} {'Tb.Th':>7s} {'Tb.Sp':>7s} {'time / ours':>12s}")
        for m, r in g.iterrows():
            th = f"{r['tb_th_vox']:.2f}" if pd.notna(r.get("tb_th_vox")) else "-"
            spv = f"{r['tb_sp_vox']:.2f}" if pd.notna(r.get("tb_sp_vox")) else "-"
            lines.append(f"{m:15s} {r['seconds']:8.2f} {r['peak_mb']:8.0f} {th:>7s} {spv:>7s} {r['seconds'] / ours['seconds']:12.2f}")
        if "edt_floor" in g.index:
            lines.append(f"ours / EDT floor: {ours['seconds'] / g.loc['edt_floor', 'seconds']:.2f}")
        if ref is not None:
            lines.append(
                f"ours vs ORMIR exact: Tb.Th {100 * (ours['tb_th_vox'] / ref['tb_th_vox'] - 1):+.2f} %, "
                f"Tb.Sp {100 * (ours['tb_sp_vox'] / ref['tb_sp_vox'] - 1):+.2f} %; speed-up {ref['seconds'] / ours['seconds']:.1f}x"
            )
    print("\n".join(lines))
    out = HERE / "results" / "morphometry.tsv"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tsv.tmp")
    df.to_csv(tmp, sep="\t", index=False)
    os.replace(tmp, out)
    print(f"\nwritten: {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
