"""Benchmark: preprocessing of one LR/HR pair at the paper's scale; time and peak memory per step.

Issue 3's target: import, registration, resampling and normalization of an HR-pQCT of about
1.4 G voxels (82 um, 5.6 GB as float32) each stay under 16 GB of memory on a 24 GB machine.

One synthetic subject is drawn with the study's settings (``config/paper.yaml``: adult anatomy,
82 um HR voxels, a 200 x 200 x 160 mm clinical field of view) and rendered in full: the whole
femur with its trabecular network at 82 um, blurred and noisy, written as two CT DICOM series
(one file per slice) beside its true femur mask and pose. Truth morphometry, which the workflow's
``synthesize_subject`` also computes, is left out (it is not preprocessing). Then the workflow's
own rule scripts (``workflow_scripts/{import_scan,register,resample_lr,normalize}.py``) run on
the pair, each in its own process, with the config's parameters; the femur mask that
normalization applies is the true one (the ``femur_mask`` step is not part of this benchmark).

Per step: wall time, peak resident memory of the process (``ru_maxrss`` from ``wait4``: the
kernel's high-water mark, which counts file pages mapped in as well as the heap), the largest
anonymous (heap) memory seen by polling ``/proc``, and the ratio of the peak to 16 GB. Each step
is set beside a peer measured in the same run:

* import HR: SimpleITK's GDCM series reader reading the same DICOM series into memory (no checks);
* registration: reading the imported HR once (it must read every HR voxel to downsample it);
* resampling: one ``sitk.Resample`` of the LR onto the whole HR grid (B-spline, same transform
  and threads), the one-shot call our slab-wise resampling replaces (result kept in memory);
* normalization: copying its two input volumes (the same bytes read and written, no arithmetic).

The table is printed and written to ``benchmarks/results/preprocess_paper_scale.tsv``.

    .venv/bin/python benchmarks/preprocess_paper_scale.py [--workdir DIR] [--scale 1.0]
        [--voxel-mm 0.082] [--subject 8] [--threads 1] [--reuse] [--keep]

``--scale``/``--voxel-mm`` shrink the problem for a quick run (``--scale 0.45 --voxel-mm 0.2``
gives the demo's HR size; the LR keeps the paper's field of view). ``--reuse`` skips the
synthesis when the work folder holds a pair (and reports the synthesis figures of the run that
made it). The paper-scale run needs about 26 GB of disk in the work folder and about 26 CPU
minutes (14 of them the synthesis; the steps are single-threaded), so roughly half an hour of
wall time on 2 otherwise idle cores; measured here beside other jobs (load 3 to 13) it took 65.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow_scripts"
TARGET_BYTES = 16e9  # 16 GB, the target
RESULTS = REPO / "benchmarks" / "results" / "preprocess_paper_scale.tsv"

# runs one rule script with a stand-in `snakemake` object (femursr.workflow.mock_snakemake)
RULE_CHILD = (
    "import json, runpy, sys; spec = json.loads(sys.argv[1]); sys.path.insert(0, spec['scripts']); "
    "from femursr.workflow import mock_snakemake; "
    "runpy.run_path(spec['script'], init_globals={'snakemake': mock_snakemake(**spec['sm'])}, run_name='__main__')"
)
# runs one function of this file
FUNC_CHILD = (
    "import json, runpy, sys; spec = json.loads(sys.argv[1]); sys.path.insert(0, spec['scripts']); "
    "runpy.run_path(spec['bench'])[spec['func']](**spec['kw'])"
)


# ------------------------------------------------------------------------ measuring a child
def _status_kb(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measure(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd``; return its wall time (s), exit status, peak RSS (bytes, ``ru_maxrss`` from
    wait4) and the largest anonymous and file-backed RSS seen polling /proc every 50 ms."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd)
    peak = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            for k, v in _status_kb(proc.pid).items():
                if k in peak:
                    peak[k] = max(peak[k], v)
            stop.wait(0.05)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall_s": wall,
        "rc": proc.returncode,
        "peak_rss": usage.ru_maxrss * 1024,  # kB on Linux
        "peak_anon": peak["RssAnon"] * 1024,
        "peak_file": peak["RssFile"] * 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "load": os.getloadavg()[0],
    }


def run_rule(script: str, threads: int, **sm) -> dict:
    spec = {"scripts": str(SCRIPTS), "script": str(SCRIPTS / script), "sm": {"threads": threads, **sm}}
    return measure([sys.executable, "-c", RULE_CHILD, json.dumps(spec)])


def run_func(func: str, **kw) -> dict:
    spec = {"scripts": str(SCRIPTS), "bench": str(Path(__file__).resolve()), "func": func, "kw": kw}
    return measure([sys.executable, "-c", FUNC_CHILD, json.dumps(spec)])


# ------------------------------------------------------------- functions run in a child
def synthesize(work: str, synthetic: dict, seed: int, index: int, subject_id: str) -> None:
    """One subject at the configured scale: LR and HR DICOM series, true femur mask (.nii.gz) and
    pose, a sample of femur points for the registration error, and ``pair.json``."""
    import numpy as np
    import SimpleITK as sitk

    from femursr import phantom
    from femursr.volume import Volume, VolumeWriter, write_volume

    work = Path(work)
    times = {}
    t = time.perf_counter()
    subj = phantom.draw_subject(synthetic, seed, index, subject_id)
    rng = phantom.subject_rng(seed, 10_000 + index)  # the stream synthesize_subject uses
    shape, spacing, origin = phantom.hr_grid(subj, synthetic)
    print(f"{subject_id}: HR grid {shape} (z, y, x) = {np.prod(shape) / 1e9:.2f} G voxels at {spacing[0]} mm", flush=True)
    with VolumeWriter(work / "scratch" / "hr_image.nii", shape, np.float32, spacing, origin) as w:
        hr_img, tissue, _ = phantom.render_hr(subj, synthetic, rng, image_out=w)
    times["render_hr"] = time.perf_counter() - t
    t = time.perf_counter()
    lo = np.asarray(origin)
    hi = lo + (np.asarray(shape[::-1]) - 1) * np.asarray(spacing)
    lr_img, _, lr_info = phantom.render_lr(subj, synthetic, rng, (lo, hi))
    times["render_lr"] = time.perf_counter() - t
    t = time.perf_counter()
    syn_dir = work / "synthetic"
    phantom.write_scans(subject_id, synthetic, seed, lr_img, hr_img, syn_dir / "lr_dicom", syn_dir / "hr_dicom")
    times["dicom"] = time.perf_counter() - t
    t = time.perf_counter()
    femur = tissue.array > 0
    write_volume(Volume(femur.view(np.uint8), spacing, origin), syn_dir / "femur_mask.nii.gz")
    sitk.WriteTransform(phantom.pose_transform(subj), str(syn_dir / "pose.tfm"))
    kji = np.argwhere(femur[::8, ::8, ::8]) * 8  # femur voxels on a 0.66 mm lattice
    kji = kji[np.random.default_rng(0).permutation(len(kji))[:20000]]
    np.save(syn_dir / "femur_points.npy", hr_img.index_to_physical(kji[:, ::-1]))
    times["truth"] = time.perf_counter() - t
    (work / "scratch" / "hr_image.nii").unlink()
    record = {
        "subject": subject_id,
        "index": index,
        "hr_shape_zyx": list(shape),
        "hr_voxels": int(np.prod(shape)),
        "hr_spacing_mm": list(spacing),
        "lr_shape_zyx": list(lr_img.shape),
        "lr_spacing_mm": list(lr_img.spacing),
        "femur_voxels": int(femur.sum()),
        "trabecular_voxels": int((tissue.array == 2).sum()),
        "lr_snr_femur": lr_info["snr_femur"],
        "seconds": times,
    }
    (syn_dir / "pair.json").write_text(json.dumps(record, indent=2))


def peer_series_reader(folder: str, threads: int) -> None:
    """SimpleITK's GDCM series reader: the whole series into memory, float32."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    reader.SetOutputPixelType(sitk.sitkFloat32)
    img = reader.Execute()
    print(f"peer: GDCM read {img.GetSize()}", flush=True)


def peer_read_once(path: str) -> None:
    """Read a file once, sequentially, in 64 MB blocks (into one reused buffer)."""
    buf = bytearray(64 << 20)
    n = 0
    with open(path, "rb", buffering=0) as fh:
        while k := fh.readinto(buf):
            n += k
    print(f"peer: read {n / 1e9:.2f} GB", flush=True)


def peer_resample(lr: str, hr: str, transform: str, threads: int, default_hu: float) -> None:
    """One sitk.Resample of the LR onto the whole HR grid (B-spline), kept in memory."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    reader = sitk.ImageFileReader()
    reader.SetFileName(hr)
    reader.ReadImageInformation()
    f = sitk.ResampleImageFilter()  # the HR's grid, from its header (the HR's voxels are not needed)
    f.SetSize(reader.GetSize())
    f.SetOutputSpacing(reader.GetSpacing())
    f.SetOutputOrigin(reader.GetOrigin())
    f.SetOutputDirection(reader.GetDirection())
    f.SetTransform(sitk.ReadTransform(transform))
    f.SetInterpolator(sitk.sitkBSpline)
    f.SetDefaultPixelValue(float(default_hu))
    f.SetOutputPixelType(sitk.sitkFloat32)
    out = f.Execute(sitk.Cast(sitk.ReadImage(lr), sitk.sitkFloat32))
    print(f"peer: one-shot resample onto {out.GetSize()}", flush=True)


def peer_copy(sources: list, targets: list) -> None:
    """Copy files (the bytes normalization reads and writes, without its arithmetic)."""
    for s, t in zip(sources, targets):
        shutil.copyfile(s, t)


# --------------------------------------------------------------------------------- main
def load_paper_config() -> dict:
    import yaml
    from snakemake.utils import validate

    cfg = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    validate(cfg, str(REPO / "config" / "schemas" / "config.schema.yaml"))  # fills the defaults
    return cfg


def gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="work folder (default: a new temporary folder, removed at the end)")
    ap.add_argument("--scale", type=float, default=None, help="anatomy scale (default: config/paper.yaml's, 1.0)")
    ap.add_argument("--voxel-mm", type=float, default=None, help="HR voxel in mm (default: config/paper.yaml's, 0.082)")
    ap.add_argument("--subject", type=int, default=8, help="subject index of the synthetic cohort (8: 1.40 G HR voxels)")
    ap.add_argument("--threads", type=int, default=1, help="threads per step (the rules declare 1)")
    ap.add_argument("--reuse", action="store_true", help="reuse the synthesized pair found in --workdir")
    ap.add_argument("--keep", action="store_true", help="keep the work folder's files")
    a = ap.parse_args()

    t_start = time.perf_counter()
    cfg = load_paper_config()
    syn = cfg["synthetic"]
    if a.scale is not None:
        syn["anatomy_scale"] = a.scale
    if a.voxel_mm is not None:
        syn["hr"]["voxel_mm"] = a.voxel_mm
    pre = cfg["preprocessing"]
    sid = f"{syn['id_prefix']}{a.subject:03d}"
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="femursr-paper-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    for d in ("scratch", "logs", "imported", "registration", "resampled", "prepared"):
        (work / d).mkdir(exist_ok=True)
    S, I, R, P = work / "synthetic", work / "imported", work / "registration", work / "prepared"
    rows = []

    def row(step, m, peer=None, peer_m=None):
        rows.append({"step": step, **{k: m[k] for k in ("wall_s", "peak_rss", "peak_anon", "peak_file", "cpu_s", "load")},
                     "peer": peer or "", **{f"peer_{k}": peer_m[k] if peer_m else float("nan") for k in ("wall_s", "cpu_s", "peak_rss")}})  # fmt: skip
        ratio = (f", {m['wall_s'] / peer_m['wall_s']:.2f} x the peer's time ({peer_m['wall_s']:.1f} s, cpu {peer_m['cpu_s']:.1f} s, "
                 f"peak {gb(peer_m['peak_rss'])} GB)" if peer_m else "")  # fmt: skip
        print(f"== {step}: {m['wall_s']:.1f} s (cpu {m['cpu_s']:.1f} s), peak RSS {gb(m['peak_rss'])} GB ({m['peak_rss'] / TARGET_BYTES:.2f} of 16 GB), "
              f"heap {gb(m['peak_anon'])} GB{ratio}", flush=True)  # fmt: skip
        for mm, what in ((m, step), (peer_m, peer)):
            if mm and mm["rc"] != 0:
                raise SystemExit(f"{what} failed (exit status {mm['rc']}); see {work / 'logs'}")

    # --- the pair
    if a.reuse and (S / "pair.json").is_file():
        m = json.loads((S / "synthesis_measure.json").read_text())
        print(f"reusing the pair in {S} (synthesized {m['date']})")
        row("synthesis (setup; reused)", m)
    else:
        need = 4.5 * 4 * 1.40e9 * (syn["anatomy_scale"] ** 3) * (0.082 / syn["hr"]["voxel_mm"]) ** 3
        free = shutil.disk_usage(work).free
        if free < need:
            raise SystemExit(f"{work}: {gb(free)} GB free, the run needs about {gb(need)} GB")
        shutil.rmtree(S, ignore_errors=True)
        m = run_func("synthesize", work=str(work), synthetic=syn, seed=cfg["seed"], index=a.subject, subject_id=sid)
        row("synthesis (setup, not a step)", m)
        if m["rc"] == 0:
            (S / "synthesis_measure.json").write_text(json.dumps({**m, "date": time.strftime("%Y-%m-%d %H:%M")}))
    pair = json.loads((S / "pair.json").read_text())

    # --- import
    imp = {"series_uid": "", "options": pre["import"]}
    for scan in ("lr", "hr"):
        m = run_rule("import_scan.py", a.threads, input={"scan": str(S / f"{scan}_dicom")},
                     output={"volume": str(I / f"{scan}.nii"), "report": str(I / f"{scan}.json")}, params=imp,
                     wildcards={"subject": sid, "scan": scan}, log=[str(work / f"logs/import_{scan}.log")])  # fmt: skip
        peer = run_func("peer_series_reader", folder=str(S / f"{scan}_dicom"), threads=a.threads) if scan == "hr" else None
        row(f"import {scan.upper()}", m, "SimpleITK GDCM series reader, whole series into memory" if peer else None, peer)

    # --- registration
    m = run_rule("register.py", a.threads, input={"lr": str(I / "lr.nii"), "hr": str(I / "hr.nii")},
                 output={"transform": str(R / "lr_to_hr.tfm"), "qc": str(R / "qc.json"), "png": str(R / "qc.png")},
                 params={"options": pre["registration"]}, wildcards={"subject": sid}, log=[str(work / "logs/register.log")])  # fmt: skip
    peer = run_func("peer_read_once", path=str(I / "hr.nii"))
    row("registration", m, "reading the imported HR once", peer)

    # --- resampling
    m = run_rule("resample_lr.py", a.threads, input={"lr": str(I / "lr.nii"), "hr": str(I / "hr.nii"), "transform": str(R / "lr_to_hr.tfm")},
                 output={"volume": str(work / "resampled/lr.nii")}, params={"options": pre["resampling"]},
                 wildcards={"subject": sid}, log=[str(work / "logs/resample.log")])  # fmt: skip
    peer = run_func("peer_resample", lr=str(I / "lr.nii"), hr=str(I / "hr.nii"), transform=str(R / "lr_to_hr.tfm"),
                    threads=a.threads, default_hu=pre["resampling"]["default_hu"])  # fmt: skip
    row("resampling", m, "one sitk.Resample onto the whole HR grid, in memory", peer)

    # --- normalization (its peer first, so that the copies are gone before its outputs appear)
    copies = [str(work / "scratch/lr_copy.nii"), str(work / "scratch/hr_copy.nii")]
    peer = run_func("peer_copy", sources=[str(work / "resampled/lr.nii"), str(I / "hr.nii")], targets=copies)
    for c in copies:
        Path(c).unlink(missing_ok=True)
    m = run_rule("normalize.py", a.threads, input={"lr": str(work / "resampled/lr.nii"), "hr": str(I / "hr.nii"), "mask": str(S / "femur_mask.nii.gz")},
                 output={"lr": str(P / "lr.nii"), "hr": str(P / "hr.nii")}, params={"options": pre["normalize"]},
                 wildcards={"subject": sid}, log=[str(work / "logs/normalize.log")])  # fmt: skip
    row("normalization", m, "copying its two input volumes", peer)

    # --- accuracy of the registration at this scale, against the true pose
    sys.path.insert(0, str(SCRIPTS))
    import numpy as np
    import SimpleITK as sitk

    from femursr.registration import target_registration_error

    pts = np.load(S / "femur_points.npy")
    tre = target_registration_error(sitk.ReadTransform(str(R / "lr_to_hr.tfm")), sitk.ReadTransform(str(S / "pose.tfm")), pts)
    qc = json.loads((R / "qc.json").read_text())

    # --- report
    hr_gb = pair["hr_voxels"] * 4 / 1e9
    print()
    print(f"subject {sid}: HR {' x '.join(map(str, pair['hr_shape_zyx']))} (z, y, x) = {pair['hr_voxels'] / 1e9:.2f} G voxels at "
          f"{pair['hr_spacing_mm'][0]} mm ({hr_gb:.1f} GB as float32); LR {' x '.join(map(str, pair['lr_shape_zyx']))}; "
          f"{a.threads} thread(s) per step")  # fmt: skip
    print(
        f"registration: femur Dice {qc['femur_dice']:.3f}, structure NCC {qc['structure_ncc']:.3f}; "
        f"TRE over the femur vs the true pose: mean {tre.mean():.3f} mm, max {tre.max():.3f} mm"
    )
    head = (f"{'step':30s} {'time s':>7s} {'cpu s':>7s} {'load':>5s} {'peak RSS GB':>11s} {'/16 GB':>6s} {'heap GB':>7s}  "
            f"{'peer (same run)':55s} {'peer s':>7s} {'peer cpu':>8s} {'peer GB':>7s} {'time/peer':>9s} {'cpu/peer':>8s}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = r["wall_s"] / r["peer_wall_s"] if r["peer"] else float("nan")
        cpu_ratio = r["cpu_s"] / r["peer_cpu_s"] if r["peer"] else float("nan")
        print(f"{r['step']:30s} {r['wall_s']:7.1f} {r['cpu_s']:7.1f} {r['load']:5.1f} {gb(r['peak_rss']):>11s} {r['peak_rss'] / TARGET_BYTES:6.2f} "
              f"{gb(r['peak_anon']):>7s}  {r['peer']:55s} {r['peer_wall_s']:7.1f} {r['peer_cpu_s']:8.1f} "
              f"{gb(r['peer_peak_rss']) if r['peer'] else 'nan':>7s} {ratio:9.2f} {cpu_ratio:8.2f}")  # fmt: skip
    print("time: wall clock; cpu: user + system time of the step's process; load: 1-minute load average at its end (2 cores)")
    print(f"total wall time of this run: {time.perf_counter() - t_start:.0f} s")
    steps = [r for r in rows if not r["step"].startswith("synthesis")]
    worst = max(steps, key=lambda r: r["peak_rss"])
    verdict = "meets" if worst["peak_rss"] < TARGET_BYTES else "MISSES"
    print(f"largest peak of the four steps: {worst['step']} {gb(worst['peak_rss'])} GB: {verdict} the 16 GB target")

    import pandas as pd

    table = pd.DataFrame(rows)
    table.insert(0, "subject", sid)
    table["hr_shape_zyx"] = "x".join(map(str, pair["hr_shape_zyx"]))
    table["hr_spacing_mm"] = pair["hr_spacing_mm"][0]
    table["threads"] = a.threads
    table["peak_rss_over_16gb"] = table["peak_rss"] / TARGET_BYTES
    table["time_over_peer"] = table["wall_s"] / table["peer_wall_s"]
    table["cpu_over_peer"] = table["cpu_s"] / table["peer_cpu_s"]
    table["tre_mean_mm"], table["tre_max_mm"] = float(tre.mean()), float(tre.max())
    table["date"] = time.strftime("%Y-%m-%d %H:%M")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(SCRIPTS))
    from femursr.atomic import write_tsv

    write_tsv(table, RESULTS, float_format="%.4g")
    print(f"written: {RESULTS}")
    if not a.keep:
        for d in ("synthetic", "imported", "registration", "resampled", "prepared", "scratch"):
            shutil.rmtree(work / d, ignore_errors=True)
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
