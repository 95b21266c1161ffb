# Helpers shared by the workflow: the cohort, wildcard constraints, parameter slices and the
# list of final targets. Rule files hold rules only.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow_scripts"))

import dataclasses  # noqa: E402

from femursr.cohort import CohortError, load_subjects, synthetic_ids  # noqa: E402
from femursr.masks import ThresholdParams  # noqa: E402
from femursr.registration import RigidParams  # noqa: E402

SYNTHETIC = config["cohort"] == "synthetic"
SYNTH_ROOT = "results/synthetic"

if SYNTHETIC:
    SUBJECTS = synthetic_ids(config["synthetic"])
else:
    try:
        SHEET = load_subjects(config["subjects"])
    except CohortError as err:
        raise WorkflowError(str(err)) from None
    SUBJECTS = list(SHEET.index)
    if not SUBJECTS:
        raise WorkflowError(
            f"subjects sheet {config['subjects']} lists no subjects; add rows "
            "(subject, lr, hr, split) or set `cohort: synthetic`"
        )


def _check_fields(block, cls, where):
    """Keys of a free-form parameter block must be fields of the dataclass that takes them."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key in block:
        if key not in known:
            raise WorkflowError(
                f"config {where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}"
            )


_check_fields(
    {
        k: v
        for k, v in config["preprocessing"]["registration"].items()
        if k not in ("min_dice", "min_structure_ncc")
    },
    RigidParams,
    "preprocessing.registration",
)
_check_fields(
    config["preprocessing"]["mask"]["threshold"],
    ThresholdParams,
    "preprocessing.mask.threshold",
)

if SYNTHETIC:
    PAIRED = SUBJECTS
else:
    PAIRED = [s for s in SUBJECTS if SHEET.loc[s, "hr"]]


wildcard_constraints:
    subject="|".join(SUBJECTS),
    scan="lr|hr",


def subject_index(wildcards):
    """1-based position of the subject in the cohort (selects its random stream)."""
    return SUBJECTS.index(wildcards.subject) + 1


def synthesize_mem_mb(wildcards, attempt):
    """Memory (MB) of one synthetic subject: about 50 bytes per HR voxel (measured on the demo),
    for an adult proximal femur box of 95 x 60 x 135 mm scaled by the anatomy and size factor.
    """
    syn = config["synthetic"]
    edge = [
        e * syn["anatomy_scale"] * 1.1 / syn["hr"]["voxel_mm"] for e in (95, 60, 135)
    ]
    voxels = edge[0] * edge[1] * edge[2]
    return int(max(2000, voxels * 50 / 1e6) * attempt)


def scan_source(wildcards):
    """The raw scan (DICOM folder or file) of a subject: the sheet's path, or the synthetic series."""
    if SYNTHETIC:
        return f"{SYNTH_ROOT}/{wildcards.subject}/{wildcards.scan}_dicom"
    return SHEET.loc[wildcards.subject, wildcards.scan]


def series_uid(wildcards):
    """SeriesInstanceUID to import from a folder with several series ('' = choose automatically)."""
    if SYNTHETIC:
        return ""
    col = f"{wildcards.scan}_series_uid"
    return SHEET.loc[wildcards.subject, col] if col in SHEET.columns else ""


def _size_mb(path):
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6
    return p.stat().st_size / 1e6 if p.exists() else 0.0


def preprocess_mem_mb(wildcards, input, attempt):
    """Memory (MB) of a preprocessing job: eight times its inputs (float copies, B-spline
    coefficients), at least 2 GB; doubled on each retry."""
    return int(max(2000, 8 * sum(_size_mb(p) for p in input)) * attempt)


def synthetic_outputs(name):
    """Paths of one output of synthesize_subject, for every subject."""
    return expand(getattr(rules.synthesize_subject.output, name), subject=SUBJECTS)


def final_targets():
    """What `snakemake` builds by default: every stage that exists for the configured cohort."""
    targets = []
    if SYNTHETIC:
        targets += list(rules.synthesize_cohort.output)
    targets += expand(rules.normalize.output, subject=PAIRED)
    if SYNTHETIC:
        targets += list(rules.preprocessing_accuracy.output)
    return targets
