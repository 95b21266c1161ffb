# Helpers shared by the workflow: the cohort, wildcard constraints, parameter slices and the
# list of final targets. Rule files hold rules only.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow_scripts"))

import dataclasses  # noqa: E402
import functools  # noqa: E402

from femursr import provenance  # noqa: E402

SCRIPTS = Path(workflow.basedir) / "workflow_scripts"


@functools.cache
def code_version(script, *modules):
    """A hash of workflow_scripts/<script>.py and of every femursr module it imports
    (transitively), plus ``modules``: each rule's ``code`` param, so that editing a module of the
    package reruns the rules that run it and what depends on them, and nothing else."""
    return provenance.code_version(SCRIPTS, SCRIPTS / f"{script}.py", modules)


from femursr.cohort import CohortError, load_subjects, synthetic_ids  # noqa: E402
from femursr import nnunet as femur_nnunet  # noqa: E402
from femursr.masks import ThresholdParams  # noqa: E402
from femursr.registration import RigidParams  # noqa: E402

SYNTHETIC = config["cohort"] == "synthetic"
SYNTH_ROOT = "results/synthetic"

if SYNTHETIC:
    # synthetic.n_clinical more subjects follow the n_subjects with both scans: clinical-only
    # patients (rules/clinical.smk), made only when there is an SR model to apply to them
    _N_CLINICAL = (
        config["synthetic"]["n_clinical"]
        if config["training"]["models"] or config["clinical"]["model_dir"]
        else 0
    )
    SUBJECTS = synthetic_ids(
        {
            **config["synthetic"],
            "n_subjects": config["synthetic"]["n_subjects"] + _N_CLINICAL,
        }
    )
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
    PAIRED = SUBJECTS[: config["synthetic"]["n_subjects"]]
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


# what one synthetic subject's scans and truth depend on: not the number of subjects (adding
# subjects to the cohort does not redraw those already there)
SYNTH_SUBJECT_PARAMS = {
    k: v
    for k, v in config["synthetic"].items()
    if k not in ("n_subjects", "n_clinical")
}


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
    targets += sr_targets()
    if EVAL_SUBJECTS:  # none for a sheet of clinical-only patients (clinical.model_dir)
        targets += evaluation_targets()
    targets += results_targets()
    targets += clinical_targets()
    return targets


def _check_nnunet_fold(key, fold, n, what):
    """Stop at parse time when ``fold`` is not one of nnU-Net's split of ``n`` training ``what``
    (min(5, n) folds, femursr.nnunet.plan_and_preprocess)."""
    if fold != "all" and fold >= min(5, n):
        raise WorkflowError(
            f"{key}.fold: fold {fold} does not exist with {n} training {what} "
            f"(folds 0 to {min(5, n) - 1}, or all)"
        )


# ------------------------------------------------------------------ femur masks (nnunet backend)
# rules/nnunet.smk: nnunet_dataset -> nnunet_plan -> nnunet_train -> femur_mask. Everything below
# is decided at parse time, so a wrong model folder or a sheet cohort without labelled CTs stops
# the run before any job starts.
MASK = config["preprocessing"]["mask"]
NNUNET = MASK["nnunet"]
NNUNET_ON = MASK["backend"] == "nnunet"
NNUNET_ROOT = "results/nnunet"
NNUNET_DATASET = femur_nnunet.dataset_name(NNUNET["dataset_id"], NNUNET["dataset_name"])
NNUNET_FOLD_DIR = f"fold_{NNUNET['fold']}"
# the model this workflow trains (when no model_folder is given), in nnU-Net's layout
NNUNET_TRAINED = (
    f"{NNUNET_ROOT}/nnUNet_results/{NNUNET_DATASET}/"
    f"{NNUNET['trainer']}__{femur_nnunet.PLANS}__{NNUNET['configuration']}"
)
NNUNET_MODEL = (NNUNET["model_folder"] or NNUNET_TRAINED).rstrip("/")
NNUNET_CHECKPOINT = f"{NNUNET_MODEL}/{NNUNET_FOLD_DIR}/{femur_nnunet.CHECKPOINT}"
# the training cases: labelled CTs given in config ([{case, image, mask}]), or else synthetic
# subjects whose LR scan and truth LR-grid mask train the model
NNUNET_CASES = []
NNUNET_SUBJECTS = []
_NNUNET_KEY = "config preprocessing.mask.nnunet"

if NNUNET_ON and NNUNET["model_folder"]:
    try:
        femur_nnunet.check_model_folder(NNUNET_MODEL, [NNUNET["fold"]])
    except FileNotFoundError as err:
        raise WorkflowError(f"{_NNUNET_KEY}.model_folder: {err}") from None
elif NNUNET_ON:
    if NNUNET["training_cases"] is not None and NNUNET["training_subjects"] is not None:
        raise WorkflowError(
            f"{_NNUNET_KEY}: give training_cases (labelled CTs) or training_subjects "
            "(synthetic subjects), not both"
        )
    if NNUNET["training_cases"] is not None:
        try:
            NNUNET_CASES = femur_nnunet.read_training_cases(
                NNUNET["training_cases"], where=f"{_NNUNET_KEY}.training_cases"
            )
        except ValueError as err:
            raise WorkflowError(str(err)) from None
    elif SYNTHETIC:
        # By default every synthetic subject's LR scan trains the model that then masks it (the
        # clinical-only patients of synthetic.n_clinical are left out, as a real one has no label), so
        # the demo's masks are predictions on training cases (an optimistic Dice). The data
        # split of the SR models is not used here (it was not there when this was written);
        # training_subjects can hold subjects out.
        NNUNET_SUBJECTS = list(
            PAIRED
            if NNUNET["training_subjects"] is None
            else NNUNET["training_subjects"]
        )
        unknown = [s for s in NNUNET_SUBJECTS if s not in SUBJECTS]
        if unknown:
            raise WorkflowError(
                f"{_NNUNET_KEY}.training_subjects: {', '.join(unknown)} not in the synthetic "
                f"cohort ({SUBJECTS[0]} ... {SUBJECTS[-1]})"
            )
        if len(NNUNET_SUBJECTS) < 2:
            raise WorkflowError(
                f"{_NNUNET_KEY}.training_subjects: nnU-Net needs at least 2 training cases, "
                f"got {len(NNUNET_SUBJECTS)}"
            )
    else:
        raise WorkflowError(
            f"{_NNUNET_KEY}: the nnunet femur-mask backend with `cohort: sheet` needs a model or "
            "labelled CTs to train one. Add either `model_folder:` (an nnU-Net model trained "
            "elsewhere, the folder holding plans.json, dataset.json and "
            f"{NNUNET_FOLD_DIR}/{femur_nnunet.CHECKPOINT}) or `training_cases:` (a TSV with "
            "columns image, mask [, case], or a list of {image: ..., mask: ...}: CTs in HU and "
            "binary femur masks on their grids; the paper used 1 mm femur crops of "
            "TotalSegmentator CTs), or set `backend: threshold`"
        )
    _check_nnunet_fold(
        _NNUNET_KEY, NNUNET["fold"], len(NNUNET_CASES) + len(NNUNET_SUBJECTS), "cases"
    )

NNUNET_TRAIN_OPTIONS = {
    k: NNUNET[k]
    for k in ("configuration", "fold", "trainer", "epochs", "iterations_per_epoch")
    + ("val_iterations", "device", "seed")
}

# the slice of the mask config that the femur_mask rule uses (editing the other backend's
# settings does not rerun the masks)
if NNUNET_ON:
    MASK_OPTIONS = {
        "backend": "nnunet",
        **{k: NNUNET[k] for k in ("fold", "spacing_mm", "device", "mirroring")},
    }
else:
    MASK_OPTIONS = {"backend": MASK["backend"], "threshold": MASK["threshold"]}


def femur_mask_input(wildcards):
    """Inputs of femur_mask: the LR resampled onto the HR grid (threshold), or the native LR,
    the HR (its grid only), the registration and the nnU-Net checkpoint (nnunet)."""
    s = wildcards.subject
    if not NNUNET_ON:
        return {"lr": rules.resample_lr.output.volume.format(subject=s)}
    return {
        "lr": rules.import_scan.output.volume.format(subject=s, scan="lr"),
        "hr": rules.import_scan.output.volume.format(subject=s, scan="hr"),
        "transform": rules.register.output.transform.format(subject=s),
        "model": NNUNET_CHECKPOINT,
    }


def nnunet_dataset_input(wildcards):
    """The labelled CTs of the nnU-Net dataset: images and masks, in case order (for synthetic
    subjects the masks are their truth folders, holding femur_mask_lr.nii.gz)."""
    if NNUNET_CASES:
        return {
            "images": [c["image"] for c in NNUNET_CASES],
            "masks": [c["mask"] for c in NNUNET_CASES],
        }
    return {
        "images": expand(
            rules.import_scan.output.volume, subject=NNUNET_SUBJECTS, scan="lr"
        ),
        "masks": expand(rules.synthesize_subject.output.truth, subject=NNUNET_SUBJECTS),
    }


def nnunet_case_ids():
    """Case ids of the nnU-Net dataset, in the order of nnunet_dataset_input."""
    return [c["case"] for c in NNUNET_CASES] or list(NNUNET_SUBJECTS)


def largest_input_mem_mb(wildcards, input, attempt):
    """Memory (MB) of a job that holds one input at a time: twelve times the largest input
    (float copies, a 1 mm resampled copy, compression), at least 2 GB; doubled on each retry.
    """
    return int(max(2000, 12 * max([_size_mb(p) for p in input] or [0])) * attempt)


def nnunet_gpu(wildcards):
    """GPUs of nnU-Net training: none when the config says cpu, else one (auto uses it if there)."""
    return 0 if NNUNET["device"] == "cpu" else 1


def nnunet_predict_gpu(wildcards):
    """GPUs of the femur mask: one only when nnU-Net is told to use cuda (a short prediction
    with device auto uses a GPU when it finds one, without reserving it)."""
    return 1 if NNUNET_ON and NNUNET["device"] == "cuda" else 0


def _nnunet_runtime(options, attempt):
    its = options["epochs"] * (
        options["iterations_per_epoch"] + options["val_iterations"]
    )
    per_it = 3.0 if options["device"] == "cpu" else 0.3
    return int((30 + its * per_it / 60) * attempt)


def nnunet_train_runtime(wildcards, attempt):
    """Minutes of nnU-Net training: the iteration budget at 3 s per iteration on a CPU
    (3d_fullres, 2 cores) or 0.3 s on a GPU, plus half an hour; doubled on each retry.
    """
    return _nnunet_runtime(NNUNET, attempt)


# ------------------------------------------------------------------ SR models (rules/sr.smk)
# The split is drawn here, at parse time, so that the DAG knows the test subjects, whose volumes
# the trained models are applied to; rule `split` writes the same split to results/split.tsv.
# The registry is read without importing torch.
from femursr.split import SplitError, split_subjects  # noqa: E402
from femursr.sr.registry import AUXILIARY as SR_AUXILIARY  # noqa: E402
from femursr.sr.registry import MODELS as SR_REGISTRY  # noqa: E402

TRAINING = config["training"]
SR_MODELS = list(TRAINING["models"])
SR_DIMS = list(TRAINING["dims"])
SR_FIXED_SPLIT = {} if SYNTHETIC else {s: SHEET.loc[s, "split"] for s in PAIRED}
SR_TRAIN, SR_VALIDATION, SR_TEST = [], [], []
try:
    SPLIT = split_subjects(
        PAIRED, config["split"], config["seed"], fixed=SR_FIXED_SPLIT
    )
    SR_TRAIN, SR_VALIDATION, SR_TEST = (
        SPLIT.part(p) for p in ("train", "validation", "test")
    )
except SplitError as err:
    # without SR models (training.models: []) the split is not needed
    if SR_MODELS:
        raise WorkflowError(str(err)) from None
_sr_unknown = [m for m in SR_MODELS if m not in SR_REGISTRY]
if _sr_unknown:
    raise WorkflowError(
        f"config training.models: unknown SR model(s) {', '.join(_sr_unknown)}; known: "
        f"{', '.join(sorted(SR_REGISTRY))} (femursr.sr.registry.MODELS)"
    )
_sr_no_block = [m for m in SR_MODELS if m not in config["models"]]
if _sr_no_block:
    raise WorkflowError(
        f"config training.models: {', '.join(_sr_no_block)} has no settings block "
        "models.<name> in config/schemas/config.schema.yaml; add one"
    )
# Latent diffusion models (LDM, ResShift) work in the latent space of an autoencoder trained on
# the HR slices: each names the models block that configures it (key `autoencoder`, default
# "autoencoder"); one autoencoder is trained per block and shared by the models that name it.
SR_AUTOENCODER = {
    m: config["models"][m]["autoencoder"]
    for m in SR_MODELS
    if "autoencoder" in config["models"][m]
}
for _m, _ae in SR_AUTOENCODER.items():
    if _ae not in config["models"] or "network" not in config["models"][_ae]:
        raise WorkflowError(
            f"config models.{_m}.autoencoder: {_ae!r} is not an autoencoder block of `models` "
            "(use 'autoencoder', or add a block models.autoencoder_<name> with the settings "
            "of models.autoencoder)"
        )
AUTOENCODERS = sorted(set(SR_AUTOENCODER.values()))


def one_of(names):
    """A wildcard constraint matching exactly ``names`` (none at all when the list is empty:
    Snakemake reads an empty constraint as no constraint)."""
    return "|".join(names) if names else "(?!)"


# models whose inference draws several samples per slice: their SR volume is the mean, and the
# voxel-wise standard deviation is written beside it
SR_SAMPLED = [m for m in SR_MODELS if config["models"][m].get("samples", 1) > 1]
SR_SINGLE = [m for m in SR_MODELS if m not in SR_SAMPLED]
SR_RUN = "results/models/{model}_{dims}"
AE_RUN = "results/models/{autoencoder}"
# the slices of `training` that the SR rules use: settings of inference do not retrain
SR_TRAIN_OPTIONS = {
    k: TRAINING[k]
    for k in ("patch_size_px", "batch_size", "samples_per_epoch", "neighbours")
    + ("validation_patches", "perceptual_weights", "device", "amp", "num_workers")
    + ("checkpoint_every_steps", "log_every_steps")
}
SR_INFER_OPTIONS = {
    "device": TRAINING["device"],
    "amp": TRAINING["amp"],
    "batch_slices": TRAINING["inference_batch_slices"],
    "tile_px": TRAINING["inference_tile_px"],
    "tile_overlap_px": TRAINING["inference_tile_overlap_px"],
}


wildcard_constraints:
    model="|".join(SR_MODELS),
    dims="|".join(SR_DIMS),
    autoencoder=one_of(AUTOENCODERS),


def sr_model_params(wildcards):
    """The config block of a model; for a latent model with its autoencoder's network added
    (``autoencoder_network``), which builds the autoencoder it carries."""
    block = config["models"][wildcards.model]
    if wildcards.model in SR_AUTOENCODER:
        network = config["models"][SR_AUTOENCODER[wildcards.model]]["network"]
        return {**block, "autoencoder_network": network}
    return block


def sr_autoencoder_weights(wildcards):
    """The trained autoencoder of a latent model (none for the GANs)."""
    if wildcards.model not in SR_AUTOENCODER:
        return []
    return rules.train_autoencoder.output.weights.format(
        autoencoder=SR_AUTOENCODER[wildcards.model]
    )


def sr_model_module(name):
    """The femursr module of a registered model (the registry names them as "module:Class")."""
    target = SR_REGISTRY.get(name) or SR_AUXILIARY[name]
    return f"femursr.sr.{target.split(':')[0]}"


# every SR model's module: the code of rules that may run any of them
SR_MODEL_MODULES = tuple(sorted({sr_model_module(m) for m in SR_REGISTRY}))


def sr_train_code(wildcards):
    """``code`` param of the training rules: the script and machinery, plus the module of the
    model trained (the registry imports it by name at run time, out of the import graph's
    sight), so that editing one model's code retrains that model only."""
    model = wildcards.get("model", "autoencoder")
    return code_version("train_sr", sr_model_module(model))


def sr_infer_code(wildcards):
    """``code`` param of the inference rules (see sr_train_code)."""
    return code_version("sr_infer", sr_model_module(wildcards.model))


def sr_samples(wildcards):
    """Samples per slice at inference (models.<name>.samples; 1 for deterministic models)."""
    return config["models"][wildcards.model].get("samples", 1)


def sr_subject_files(part, kind):
    """Prepared volumes (kind lr, hr) or femur masks (mask) of the subjects of a split part."""
    subjects = SR_TRAIN if part == "train" else SR_VALIDATION
    if kind == "mask":
        return expand(rules.femur_mask.output.mask, subject=subjects)
    return expand(getattr(rules.normalize.output, kind), subject=subjects)


def sr_perceptual_weights(wildcards):
    """The VGG19 weights file of the perceptual losses, when configured (an input, so that a
    missing file stops the run before any training starts)."""
    return [TRAINING["perceptual_weights"]] if TRAINING["perceptual_weights"] else []


def sr_gpu(wildcards):
    """GPUs of an SR job: none when the config says cpu, else one (auto uses it if there)."""
    return 0 if TRAINING["device"] == "cpu" else 1


def sr_train_mem_mb(wildcards, attempt):
    """Host memory (MB) of a training job: torch and the model (4 GB) and 1.5 GB per DataLoader
    worker (patches come from memory maps); doubled on each retry."""
    return int((4000 + 1500 * TRAINING["num_workers"]) * attempt)


def sr_infer_mem_mb(wildcards, input, attempt):
    """Host memory (MB) of inference on one volume: torch and the model (4 GB) and three times
    the LR volume (the SR output, the mask, slices in flight); doubled on each retry."""
    return int((4000 + 3 * _size_mb(input.lr)) * attempt)


def sr_targets():
    """The split, every trained model's record, and the SR volumes and T/V of the test subjects."""
    if not SR_MODELS:
        return []
    return (
        list(rules.split.output)
        + expand(rules.train_sr.output.record, model=SR_MODELS, dims=SR_DIMS)
        + expand(rules.sr_infer.output, model=SR_MODELS, dims=SR_DIMS, subject=SR_TEST)
        + expand(
            rules.sr_infer_sampled.output.std,
            model=SR_SAMPLED,
            dims=SR_DIMS,
            subject=SR_TEST,
        )
    )


# ------------------------------------------------------------------ ROI evaluation (rules/evaluate.smk)
# An evaluated volume is a (method, subject): LR and HR of the evaluated subjects, and the SR
# outputs {model}_{dims} of the test subjects. Templates come from the training subjects.
from femursr.labelling import LabellingParams  # noqa: E402
from femursr.pointcloud import MatchParams  # noqa: E402

EVAL = config["evaluation"]
EVAL_ROOT = "results/evaluation"
_EVAL_KEY = "config evaluation"
_check_fields(EVAL["matching"], MatchParams, "evaluation.matching")
EVAL_SUBJECTS = list(PAIRED) if EVAL["subjects"] == "all" else list(SR_TEST)
SR_METHODS = [f"{m}_{d}" for m in SR_MODELS for d in SR_DIMS]
EVAL_SR = SR_METHODS if EVAL["include_sr"] else []
TEMPLATE_CANDIDATES = list(EVAL["template_subjects"] or SR_TRAIN)
_tpl_unknown = [s for s in TEMPLATE_CANDIDATES if s not in PAIRED]
if _tpl_unknown:
    raise WorkflowError(
        f"{_EVAL_KEY}.template_subjects: {', '.join(_tpl_unknown)} is not a subject with both "
        "scans (the template is the HR's femur mask)"
    )
# given subjects are all templates; else n_templates by bone-volume quantiles, at most one per
# candidate (a small cohort has fewer training subjects than templates; selection.tsv shows it)
N_TEMPLATES = (
    len(TEMPLATE_CANDIDATES)
    if EVAL["template_subjects"]
    else min(EVAL["n_templates"], len(TEMPLATE_CANDIDATES))
)
# template labels: label maps from config, the synthetic truth, or automatic (femursr.labelling:
# template_labels auto, and the default for a cohort sheet without label maps)
AUTO_TEMPLATE_LABELS = EVAL["template_labels"] == "auto" or (
    EVAL["template_labels"] is None and not SYNTHETIC
)
TEMPLATE_LABELS = (
    dict(EVAL["template_labels"]) if isinstance(EVAL["template_labels"], dict) else {}
)
_check_fields(EVAL["auto_labelling"], LabellingParams, "evaluation.auto_labelling")
if SYNTHETIC and TEMPLATE_LABELS:
    raise WorkflowError(
        f"{_EVAL_KEY}.template_labels: the synthetic cohort's templates are labelled from its "
        "truth (results/synthetic/{subject}/truth/regions.nii.gz); remove template_labels, or "
        "set it to auto to label them from their femur masks"
    )
_lab_unknown = [s for s in TEMPLATE_LABELS if s not in TEMPLATE_CANDIDATES]
if _lab_unknown:
    raise WorkflowError(
        f"{_EVAL_KEY}.template_labels: {', '.join(_lab_unknown)} cannot be a template (templates "
        f"come from {'evaluation.template_subjects' if EVAL['template_subjects'] else 'the training subjects of the split'})"
    )
if EVAL["template_subjects"] and TEMPLATE_LABELS:
    _lab_missing = [s for s in TEMPLATE_CANDIDATES if s not in TEMPLATE_LABELS]
    if _lab_missing:
        raise WorkflowError(
            f"{_EVAL_KEY}.template_subjects: {', '.join(_lab_missing)} has no region label map in "
            "evaluation.template_labels; add {subject: path} (1 head, 2 neck, 3 trochanter, 4 shaft), "
            "or set template_labels to auto"
        )

# The nnunet bone-mask backend (evaluation.bone_mask.backend nnunet; rules/nnunet.smk, the
# bone_nnunet_* rules): an nnU-Net with the label bone, trained on the training subjects' normalized
# HR volumes at their own voxel size, or a model folder given in config. Decided at parse time.
BONE_MASK = EVAL["bone_mask"]
BONE_NNUNET = BONE_MASK["nnunet"]
BONE_NNUNET_ON = BONE_MASK["backend"] == "nnunet"
_BONE_KEY = "config evaluation.bone_mask.nnunet"
BONE_NNUNET_DATASET = femur_nnunet.dataset_name(
    BONE_NNUNET["dataset_id"], BONE_NNUNET["dataset_name"]
)
BONE_NNUNET_TRAINED = (
    f"{NNUNET_ROOT}/nnUNet_results/{BONE_NNUNET_DATASET}/"
    f"{BONE_NNUNET['trainer']}__{femur_nnunet.PLANS}__{BONE_NNUNET['configuration']}"
)
BONE_NNUNET_MODEL = (BONE_NNUNET["model_folder"] or BONE_NNUNET_TRAINED).rstrip("/")
BONE_NNUNET_CHECKPOINT = (
    f"{BONE_NNUNET_MODEL}/fold_{BONE_NNUNET['fold']}/{femur_nnunet.CHECKPOINT}"
)
BONE_NNUNET_LABELS = (
    ("truth" if SYNTHETIC else "threshold")
    if BONE_NNUNET["labels"] == "auto"
    else BONE_NNUNET["labels"]
)
BONE_NNUNET_SUBJECTS = list(BONE_NNUNET["training_subjects"] or SR_TRAIN)
if BONE_NNUNET_ON and BONE_NNUNET["model_folder"]:
    try:
        femur_nnunet.check_model_folder(BONE_NNUNET_MODEL, [BONE_NNUNET["fold"]])
    except FileNotFoundError as err:
        raise WorkflowError(f"{_BONE_KEY}.model_folder: {err}") from None
elif BONE_NNUNET_ON:
    if BONE_NNUNET_LABELS == "truth" and not SYNTHETIC:
        raise WorkflowError(
            f"{_BONE_KEY}.labels: truth labels exist only for the synthetic cohort; use "
            "threshold (the HR's threshold masks) or give a trained model_folder"
        )
    if NNUNET_ON and BONE_NNUNET["dataset_id"] == NNUNET["dataset_id"]:
        raise WorkflowError(
            f"{_BONE_KEY}.dataset_id: {BONE_NNUNET['dataset_id']} is also the femur model's "
            "(preprocessing.mask.nnunet.dataset_id); give the bone model another id"
        )
    _bone_unknown = [s for s in BONE_NNUNET_SUBJECTS if s not in PAIRED]
    if _bone_unknown:
        raise WorkflowError(
            f"{_BONE_KEY}.training_subjects: {', '.join(_bone_unknown)} is not a subject with both scans"
        )
    if len(BONE_NNUNET_SUBJECTS) < 2:
        raise WorkflowError(
            f"{_BONE_KEY}: nnU-Net needs at least 2 training volumes, got "
            f"{len(BONE_NNUNET_SUBJECTS)} (training_subjects, or the split's training part)"
        )
    _check_nnunet_fold(
        _BONE_KEY, BONE_NNUNET["fold"], len(BONE_NNUNET_SUBJECTS), "volumes"
    )
BONE_NNUNET_TRAIN_OPTIONS = {k: BONE_NNUNET[k] for k in NNUNET_TRAIN_OPTIONS}
# the slice of the bone-mask config that bone_mask (and the clinical evaluation) use
if BONE_NNUNET_ON:
    BONE_MASK_OPTIONS = {
        "backend": "nnunet",
        "nnunet": {k: BONE_NNUNET[k] for k in ("fold", "device", "mirroring")},
    }
else:
    BONE_MASK_OPTIONS = {k: BONE_MASK[k] for k in ("backend", "sigma_mm", "threshold")}


def bone_model_input(wildcards):
    """The nnU-Net bone model's checkpoint, for the nnunet bone-mask backend (else nothing)."""
    return {"model": BONE_NNUNET_CHECKPOINT} if BONE_NNUNET_ON else {}


def bone_nnunet_dataset_input(wildcards):
    """The training subjects' normalized HR volumes, femur masks and (truth labels) truth folders."""
    files = {
        "images": expand(rules.normalize.output.hr, subject=BONE_NNUNET_SUBJECTS),
        "femurs": expand(rules.femur_mask.output.mask, subject=BONE_NNUNET_SUBJECTS),
    }
    if BONE_NNUNET_LABELS == "truth":
        files["truth"] = expand(
            rules.synthesize_subject.output.truth, subject=BONE_NNUNET_SUBJECTS
        )
    return files


def bone_nnunet_gpu(wildcards):
    """GPUs of the bone model's training: none when the config says cpu, else one."""
    return 0 if BONE_NNUNET["device"] == "cpu" else 1


def bone_nnunet_predict_gpu(wildcards):
    """GPUs of a bone mask: one only when the nnunet backend is told to use cuda."""
    return 1 if BONE_NNUNET_ON and BONE_NNUNET["device"] == "cuda" else 0


def bone_nnunet_train_runtime(wildcards, attempt):
    """Minutes of the bone model's training (as nnunet_train_runtime)."""
    return _nnunet_runtime(BONE_NNUNET, attempt)


# what place_rois uses (editing the morphometry context or the bone threshold does not re-place)
ROI_OPTIONS = {
    k: EVAL[k]
    for k in ("roi_source", "min_outline_fraction", "refine_radius", "matching")
    + ("template_points", "surface_voxel_mm", "outline_closing_mm", "roi_edge_vox")
}


wildcard_constraints:
    method="|".join(["LR", "HR"] + SR_METHODS),


def evaluated_pairs():
    """(method, subject) of every evaluated volume."""
    pairs = [(m, s) for s in EVAL_SUBJECTS for m in ("LR", "HR")]
    return pairs + [(m, s) for s in SR_TEST for m in EVAL_SR]


def evaluation_outputs(pattern):
    """``pattern`` (with {method} and {subject}) for every evaluated volume."""
    return [pattern.format(method=m, subject=s) for m, s in evaluated_pairs()]


def evaluated_volume(wildcards):
    """The volume of a method: the prepared LR (on the HR grid) or HR, or an SR output."""
    m, s = wildcards.method, wildcards.subject
    if m in ("LR", "HR"):
        return getattr(rules.normalize.output, m.lower()).format(subject=s)
    model, dims = m.rsplit("_", 1)
    return rules.sr_infer.output.volume.format(model=model, dims=dims, subject=s)


def place_rois_input(wildcards):
    """Inputs of place_rois: the method's bone mask and volume, the femur mask, the templates,
    and for every method but the HR the HR's ROIs (the distance to them, roi_source hr).
    """
    s = wildcards.subject
    inputs = {
        "bone": rules.bone_mask.output.mask.format(method=wildcards.method, subject=s),
        "volume": evaluated_volume(wildcards),
        "femur": rules.femur_mask.output.mask.format(subject=s),
        "templates": rules.templates.output.templates,
    }
    if wildcards.method != "HR":
        inputs["hr_rois"] = rules.place_rois.output.rois.format(method="HR", subject=s)
    return inputs


def chosen_templates():
    """The template subjects chosen by select_templates (a checkpoint: known once it has run)."""
    import pandas as pd

    table = checkpoints.select_templates.get().output.table
    return pd.read_csv(table, sep="\t", dtype={"subject": str}).subject.tolist()


def template_label_input(wildcards):
    """Region labels of the templates: the automatic label maps of the chosen templates, the
    synthetic truth folders, or the label maps given in evaluation.template_labels."""
    if AUTO_TEMPLATE_LABELS:
        return expand(rules.template_labels.output.labels, subject=chosen_templates())
    if SYNTHETIC:
        return expand(
            rules.synthesize_subject.output.truth, subject=TEMPLATE_CANDIDATES
        )
    return list(TEMPLATE_LABELS.values())


def template_label_maps():
    """subject -> label map file, for the templates job. With automatic labels, the file that
    each candidate's labels would have (the job's input holds the chosen ones only)."""
    if AUTO_TEMPLATE_LABELS:
        return {
            s: rules.template_labels.output.labels.format(subject=s)
            for s in TEMPLATE_CANDIDATES
        }
    if SYNTHETIC:
        return {
            s: f"{rules.synthesize_subject.output.truth.format(subject=s)}/regions.nii.gz"
            for s in TEMPLATE_CANDIDATES
        }
    return TEMPLATE_LABELS


def _evaluation_mem_mb(subjects, attempt):
    """8 bytes per voxel of the largest prepared HR of ``subjects`` (masks, an outline, a float
    slab, the mesh), at least 2 GB; doubled on each retry."""
    sizes = [_size_mb(rules.normalize.output.hr.format(subject=s)) for s in subjects]
    voxels_m = max(sizes or [0]) / 4.0  # float32
    return int(max(2000, 8 * voxels_m) * attempt)


def evaluation_mem_mb(wildcards, attempt):
    """Memory (MB) of a job on one evaluated volume (see _evaluation_mem_mb)."""
    return _evaluation_mem_mb([wildcards.subject], attempt)


def templates_mem_mb(wildcards, attempt):
    """Memory (MB) of the template jobs: as for the largest template candidate."""
    return _evaluation_mem_mb(TEMPLATE_CANDIDATES, attempt)


def evaluation_targets():
    """The morphometry tables of every evaluated volume, the combined tables and, on the
    synthetic cohort, the accuracy of the HR's ROI centres against the truth."""
    targets = list(rules.morphometry_table.output)
    if SYNTHETIC:
        targets += list(rules.roi_accuracy.output)
    return targets


# ------------------------------------------------------------------ results (rules/results.smk)
# Image quality and Table 1 are over the test subjects: the LR and every SR variant against the
# HR (Table 1 also lists the HR itself).
from types import SimpleNamespace  # noqa: E402

QUALITY_OPTIONS = config["evaluation"]["quality"]
QUALITY_METHODS = ["LR"] + EVAL_SR
RESULT_SUBJECTS = list(SR_TEST) if SR_MODELS else list(EVAL_SUBJECTS)
# the SR variants whose inference drew several samples: beside the mean volume they write the
# voxel-wise SD of the samples (results/sr/{model}_{dims}/{subject}.std.nii.gz)
SAMPLED_SR = [
    m
    for m in EVAL_SR
    if config["models"].get(m.rsplit("_", 1)[0], {}).get("samples", 1) > 1
]
# Figures (rules figure1, figure_sample_sd, agreement_plots): Figure 1 of the first test subject
# by default (any test subject on request), the agreement plots of every method against the HR.
# The paper's inset is 30 mm on adult femora; the synthetic cohort is drawn at anatomy_scale.
FIGURE_METHODS = ["LR"] + EVAL_SR + ["HR"]
FIGURE_INSET_MM = round(
    30.0 * (config["synthetic"]["anatomy_scale"] if SYNTHETIC else 1.0), 2
)


def quality_input(wildcards):
    """The evaluated volume (prepared LR or SR output), the HR, the femur mask, and the T/V
    record of an SR output."""
    s = wildcards.subject
    files = {
        "hr": rules.normalize.output.hr.format(subject=s),
        "mask": rules.femur_mask.output.mask.format(subject=s),
    }
    if wildcards.method == "LR":
        files["volume"] = rules.normalize.output.lr.format(subject=s)
    else:
        model, dims = wildcards.method.rsplit("_", 1)
        files["volume"] = rules.sr_infer.output.volume.format(
            model=model, dims=dims, subject=s
        )
        files["timing"] = rules.sr_infer.output.timing.format(
            model=model, dims=dims, subject=s
        )
    return files


def figure1_input(wildcards):
    """The femur mask and the volume of every method of Figure 1 (FIGURE_METHODS order)."""
    s = wildcards.subject
    return {
        "mask": rules.femur_mask.output.mask.format(subject=s),
        "volumes": [
            evaluated_volume(SimpleNamespace(method=m, subject=s))
            for m in FIGURE_METHODS
        ],
    }


def sample_sd_input(wildcards):
    """The femur mask, the HR (the grey window), and the mean and SD volumes of every sampled
    SR variant (SAMPLED_SR order)."""
    s = wildcards.subject
    model_dims = [m.rsplit("_", 1) for m in SAMPLED_SR]
    return {
        "mask": rules.femur_mask.output.mask.format(subject=s),
        "hr": rules.normalize.output.hr.format(subject=s),
        "means": [
            rules.sr_infer_sampled.output.volume.format(model=m, dims=d, subject=s)
            for m, d in model_dims
        ],
        "sds": [
            rules.sr_infer_sampled.output.std.format(model=m, dims=d, subject=s)
            for m, d in model_dims
        ],
    }


def figure_mem_mb(wildcards, attempt):
    """Memory (MB) of a figure job: the femur mask read whole (1 byte per HR voxel) and slices,
    at least 2 GB; doubled on each retry."""
    hr = rules.normalize.output.hr.format(subject=wildcards.subject)
    voxels_m = _size_mb(hr) / 4.0  # float32
    return int(max(2000, 1000 + 2 * voxels_m) * attempt)


def results_figures():
    """Figure 1 of the first test subject, for sampled SR variants the map of the SD across
    samples on its slice, and the agreement plots (these need at least 2 test subjects).
    """
    figures = []
    if RESULT_SUBJECTS:
        figures += expand(rules.figure1.output, subject=RESULT_SUBJECTS[0])
        if SAMPLED_SR:
            figures += expand(rules.figure_sample_sd.output, subject=RESULT_SUBJECTS[0])
    if len(RESULT_SUBJECTS) >= 2:
        figures += expand(rules.agreement_plots.output, method=QUALITY_METHODS)
    return figures


def results_targets():
    """Table 1, the statistics, the image-quality table and their HTML page (results_tables,
    which waits for the figures; at least 2 test subjects), or the figures alone."""
    if len(RESULT_SUBJECTS) >= 2:
        return list(rules.results_tables.output)
    return results_figures()


# ------------------------------------------------------------------ clinical branch (rules/clinical.smk)
# Patients with a clinical CT and no HR-pQCT: the sheet's rows with an empty hr, the synthetic
# cohort's n_clinical last subjects, and clinical.subjects (subjects with both scans run through
# the branch as well, their HR unused: a check against the paired evaluation). The model they get
# is clinical.model (trained here and exported as a portable folder) or clinical.model_dir.
from femursr import clinical as femur_clinical  # noqa: E402
from femursr import portable as femur_portable  # noqa: E402
from snakemake.logging import logger  # noqa: E402

CLINICAL_CFG = config["clinical"]
CLINICAL_ROOT = "results/clinical"
_CLIN_KEY = "config clinical"
CLINICAL_MODEL_DIR = CLINICAL_CFG["model_dir"]
_clin_extra = list(CLINICAL_CFG["subjects"] or [])
_clin_unknown = [s for s in _clin_extra if s not in PAIRED]
if _clin_unknown:
    raise WorkflowError(
        f"{_CLIN_KEY}.subjects: {', '.join(_clin_unknown)} is not a subject with both scans (the "
        "clinical-only patients take the clinical branch anyway; list here only paired subjects "
        "to run through it as well)"
    )
_clin_only = [s for s in SUBJECTS if s not in PAIRED]
if (_clin_only or _clin_extra) and not (SR_MODELS or CLINICAL_MODEL_DIR):
    if _clin_extra:
        raise WorkflowError(
            f"{_CLIN_KEY}.subjects: the clinical branch needs an SR model: list models in "
            "training.models, or give clinical.model_dir (a portable model folder)"
        )
    logger.warning(
        f"clinical-only patients {', '.join(_clin_only)} are left out: no SR model to apply "
        "(training.models is empty and clinical.model_dir is not set)"
    )
CLINICAL = (
    _clin_only + [s for s in _clin_extra if s not in _clin_only]
    if SR_MODELS or CLINICAL_MODEL_DIR
    else []
)
if CLINICAL_MODEL_DIR and CLINICAL_CFG["model"]:
    raise WorkflowError(
        f"{_CLIN_KEY}: give model (a {{model}}_{{dims}} trained by this workflow) or model_dir (a "
        "portable model folder), not both"
    )
CLINICAL_CARD = None
if CLINICAL_MODEL_DIR:
    try:
        CLINICAL_CARD = femur_portable.check_model_folder(CLINICAL_MODEL_DIR)
    except (FileNotFoundError, ValueError) as err:
        raise WorkflowError(f"{_CLIN_KEY}.model_dir: {err}") from None
    CLINICAL_METHOD = CLINICAL_CARD["method"]
else:
    CLINICAL_METHOD = CLINICAL_CFG["model"] or (SR_METHODS[0] if SR_METHODS else None)
    # (not checked when nothing is trained here: then there is no clinical branch either)
    if SR_MODELS and CLINICAL_CFG["model"] and CLINICAL_METHOD not in SR_METHODS:
        raise WorkflowError(
            f"{_CLIN_KEY}.model: {CLINICAL_METHOD!r} is not a trained model of this workflow; "
            f"choose one of {', '.join(SR_METHODS) or '(none: training.models is empty)'} "
            "(training.models x training.dims), or give clinical.model_dir"
        )
if not SYNTHETIC and "side" in SHEET.columns:
    CLINICAL_SIDES = {s: SHEET.loc[s, "side"] for s in CLINICAL}
else:
    CLINICAL_SIDES = {}
CLINICAL_PREPARE_OPTIONS = {
    k: CLINICAL_CFG[k] for k in ("voxel_mm", "margin_mm", "head_margin_mm")
}
# the evaluation settings the clinical branch uses (those of the paired evaluation's ROIs)
CLINICAL_EVAL_OPTIONS = {
    "bone_mask": BONE_MASK_OPTIONS,
    **{
        k: EVAL[k]
        for k in ("outline_closing_mm", "surface_voxel_mm", "template_points")
        + ("matching", "refine_radius", "roi_edge_vox", "context_mm")
        + ("min_outline_fraction",)
    },
}
# the voxel of the clinical grid, for memory estimates before any model card exists
_CLIN_VOXEL = (
    CLINICAL_CFG["voxel_mm"]
    or (CLINICAL_CARD or {}).get("voxel_mm")
    or (config["synthetic"]["hr"]["voxel_mm"] if SYNTHETIC else 0.082)
)


def clinical_model(name):
    """A file of the portable model the clinical branch applies: generator, card or templates
    (clinical.model_dir, or the export of the model trained here)."""
    if CLINICAL_MODEL_DIR:
        files = {"card": femur_portable.CARD, **CLINICAL_CARD["files"]}
        return str(Path(CLINICAL_MODEL_DIR) / files[name])
    if CLINICAL_METHOD is None:
        return []
    model, dims = CLINICAL_METHOD.rsplit("_", 1)
    return getattr(rules.clinical_export_model.output, name).format(
        model=model, dims=dims
    )


def clinical_lr(wildcards):
    """The imported clinical CT of a patient."""
    return rules.import_scan.output.volume.format(subject=wildcards.subject, scan="lr")


def clinical_side(wildcards):
    """The femur's side from the sheet's side column ('' = detect it from the anatomy)."""
    return CLINICAL_SIDES.get(wildcards.subject, "")


def clinical_mem_mb(wildcards, attempt):
    """Memory (MB) of a clinical job: 16 bytes per voxel of the clinical grid (the LR in HU and
    normalized, masks, a float slab), the grid an adult proximal femur box of 95 x 60 x 135 mm
    (scaled as the synthetic anatomy) at the clinical voxel; at least 2 GB; doubled on each retry.
    """
    scale = config["synthetic"]["anatomy_scale"] * 1.1 if SYNTHETIC else 1.1
    voxels = 95 * 60 * 135 * scale**3 / _CLIN_VOXEL**3
    return int(max(2000, 16 * voxels / 1e6) * attempt)


def clinical_sr_mem_mb(wildcards, attempt):
    """Memory (MB) of SR on a clinical grid: torch and the model (4 GB) and the grid as for
    clinical_mem_mb (input, output, sums over samples); doubled on each retry."""
    return int((4000 + clinical_mem_mb(wildcards, 1)) * attempt)


def clinical_evaluate_input(wildcards):
    """The prepared folder and the model card; when the scan could be used (the checkpoint's
    status), also the SR volume, its timing and samples, and the templates."""
    folder = checkpoints.clinical_prepare.get(subject=wildcards.subject).output.folder
    files = {"prepared": folder, "card": clinical_model("card")}
    if femur_clinical.read_status(folder)["status"] == "ok":
        if BONE_NNUNET_ON:
            files["bone_model"] = BONE_NNUNET_CHECKPOINT
        sr = rules.clinical_sr.output
        files.update(
            sr=sr.volume.format(subject=wildcards.subject),
            timing=sr.timing.format(subject=wildcards.subject),
            samples=sr.samples.format(subject=wildcards.subject),
            templates=clinical_model("templates"),
        )
    return files


def clinical_targets():
    """Every trained model as a portable folder; each clinical-only patient's metrics and summary
    page, and the table of all of them."""
    targets = []
    if SR_MODELS:
        targets += expand(
            rules.clinical_export_model.output, model=SR_MODELS, dims=SR_DIMS
        )
    if CLINICAL:
        targets += expand(
            [
                rules.clinical_evaluate.output.metrics,
                rules.clinical_evaluate.output.pdf,
                rules.clinical_evaluate.output.png,
            ],
            subject=CLINICAL,
        )
        targets += list(rules.clinical_table.output)
    return targets


# ------------------------------------------------------------------ conda envs (--sdm conda)
# envs/*.yaml hold one tool stack each; a rule whose imports depend on a backend takes its env
# here (tests/test_envs.py checks every rule's env against what its script imports).
FEMUR_MASK_ENV = "../envs/nnunet.yaml" if NNUNET_ON else "../envs/core.yaml"
BONE_MASK_ENV = "../envs/nnunet.yaml" if BONE_NNUNET_ON else "../envs/core.yaml"
# Open3D for the ROI placement, and nnU-Net for the bone masks with backend nnunet
CLINICAL_EVALUATE_ENV = (
    "../envs/femursr.yaml" if BONE_NNUNET_ON else "../envs/open3d.yaml"
)
