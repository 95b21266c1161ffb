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


def synthetic_outputs(name):
    """Paths of one output of synthesize_subject, for every subject."""
    return expand(getattr(rules.synthesize_subject.output, name), subject=SUBJECTS)


def final_targets():
    """What `snakemake` builds by default: every stage that exists for the configured cohort."""
    targets = []
    if SYNTHETIC:
        targets += list(rules.synthesize_cohort.output)
    return targets
