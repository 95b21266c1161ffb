# Helpers shared by the workflow: the cohort, wildcard constraints, parameter slices and the
# list of final targets. Rule files hold rules only.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow_scripts"))

from femursr.cohort import CohortError, load_subjects, synthetic_ids  # noqa: E402

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


wildcard_constraints:
    subject="|".join(SUBJECTS),


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


def synthetic_outputs(name):
    """Paths of one output of synthesize_subject, for every subject."""
    return expand(getattr(rules.synthesize_subject.output, name), subject=SUBJECTS)


def final_targets():
    """What `snakemake` builds by default: every stage that exists for the configured cohort."""
    targets = []
    if SYNTHETIC:
        targets += list(rules.synthesize_cohort.output)
    return targets
