"""Config and subjects sheet are checked at parse time, with messages that name the problem."""

import pytest
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from femursr.cohort import CohortError, load_subjects, synthetic_ids, synthetic_sheet

from conftest import SCHEMA, load_config


def test_default_config_is_the_small_demo():
    cfg = load_config()
    assert cfg["cohort"] == "synthetic"
    assert cfg["synthetic"]["n_subjects"] >= 25  # >= 5 test subjects after a 60/20/20 split
    assert cfg["synthetic"]["lr"]["spacing_mm"] == [0.98, 0.98, 0.65]
    assert 0.2 <= cfg["synthetic"]["hr"]["voxel_mm"] <= 0.3


def test_paper_config_holds_the_study_settings():
    cfg = load_config("paper.yaml")
    assert cfg["synthetic"]["n_subjects"] == 50
    assert cfg["synthetic"]["hr"]["voxel_mm"] == 0.082
    assert cfg["synthetic"]["anatomy_scale"] == 1.0
    t = cfg["training"]
    assert (t["patch_size_px"], t["batch_size"], t["samples_per_epoch"]) == (512, 64, 10000)
    m = cfg["models"]
    assert m["srgan"]["pretrain"] == {"epochs": 45, "lr": 1e-4, "scheduler": "multistep"}
    assert (m["srgan"]["gan"]["epochs"], m["srgan"]["gan"]["lr_discriminator"]) == (75, 1e-6)
    assert m["realesrgan"]["pretrain"] == {"epochs": 20, "lr": 2e-4, "scheduler": "constant"}
    assert (m["realesrgan"]["gan"]["epochs"], m["realesrgan"]["gan"]["lr_discriminator"]) == (60, 1e-4)
    assert (m["ldm"]["epochs"], m["ldm"]["lr"], m["ldm"]["train_timesteps"], m["ldm"]["sample_steps"]) == (100, 1e-5, 1000, 30)
    assert (m["autoencoder"]["pretrain"]["epochs"], m["autoencoder"]["gan"]["epochs"], m["autoencoder"]["gan"]["lr"]) == (75, 75, 4.5e-5)
    assert (m["resshift"]["epochs"], m["resshift"]["lr"], m["resshift"]["steps"], m["resshift"]["scheduler"]) == (150, 4.5e-5, 8, "cosine")
    assert cfg["evaluation"]["roi_edge_vox"] == 128
    assert cfg["evaluation"]["template_points"] == 10000


@pytest.mark.parametrize(
    "path, key",
    [
        (("synthetic", "hr"), "voxl_mm"),
        ((), "cohrot"),
        (("models", "srgan", "pretrain"), "learning_rate"),
        (("training",), "batchsize"),
    ],
)
def test_misspelt_key_is_named(path, key):
    cfg = load_config()
    node = cfg
    for p in path:
        node = node[p]
    node[key] = 1
    with pytest.raises(WorkflowError, match=f"'{key}' was unexpected"):
        validate(cfg, str(SCHEMA))


def test_wrong_value_is_named():
    cfg = load_config()
    cfg["cohort"] = "synthetics"
    with pytest.raises(WorkflowError, match="synthetics"):
        validate(cfg, str(SCHEMA))
    cfg = load_config()
    cfg["synthetic"]["hr"]["voxel_mm"] = -0.2
    with pytest.raises(WorkflowError, match="-0.2"):
        validate(cfg, str(SCHEMA))


def test_defaults_are_filled():
    cfg = {"cohort": "synthetic"}
    validate(cfg, str(SCHEMA))
    assert cfg["synthetic"]["lr"]["snr"] == 0.93
    assert cfg["synthetic"]["trabecular"]["head"]["bvtv"] > 0
    assert cfg["split"] == {"train": 0.6, "validation": 0.2, "test": 0.2}


def _sheet(tmp_path, rows, header="subject\tlr\thr\tsplit"):
    p = tmp_path / "subjects.tsv"
    p.write_text("\n".join([header, *rows]) + "\n")
    return p


def test_good_sheet_loads_with_covariates(tmp_path):
    for s in ("a", "b"):
        (tmp_path / s / "lr").mkdir(parents=True)
        (tmp_path / s / "hr").mkdir()
    p = _sheet(tmp_path, [f"P01\t{tmp_path}/a/lr\t{tmp_path}/a/hr\ttrain\t61", f"P02\t{tmp_path}/b/lr\t\t\t70"], header="subject\tlr\thr\tsplit\tage")
    df = load_subjects(p)
    assert list(df.index) == ["P01", "P02"]
    assert df.loc["P02", "hr"] == ""  # clinical-only patient
    assert df.loc["P01", "age"] == "61"


def test_missing_lr_folder_names_the_subject(tmp_path):
    (tmp_path / "a").mkdir()
    p = _sheet(tmp_path, [f"P01\t{tmp_path}/a\t\t", f"P07\t{tmp_path}/nowhere\t\t"])
    with pytest.raises(CohortError, match=r"subject P07: LR DICOM folder .*nowhere.* does not exist"):
        load_subjects(p)


def test_missing_hr_names_the_subject(tmp_path):
    (tmp_path / "a").mkdir()
    p = _sheet(tmp_path, [f"P03\t{tmp_path}/a\t{tmp_path}/no_hr.aim\t"])
    with pytest.raises(CohortError, match=r"subject P03: HR scan .*no_hr.aim"):
        load_subjects(p)


def test_bad_split_and_bad_id_and_duplicates(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(CohortError, match=r"subject 'P01'.*'trian'"):
        load_subjects(_sheet(tmp_path, [f"P01\t{tmp_path}/a\t\ttrian"]))
    with pytest.raises(CohortError, match=r"subject 'P 1'"):
        load_subjects(_sheet(tmp_path, [f"P 1\t{tmp_path}/a\t\t"]))
    with pytest.raises(CohortError, match="P01 appear more than once"):
        load_subjects(_sheet(tmp_path, [f"P01\t{tmp_path}/a\t\t", f"P01\t{tmp_path}/a\t\t"]))
    with pytest.raises(CohortError, match="missing column"):
        load_subjects(_sheet(tmp_path, [f"P01\t{tmp_path}/a"], header="id\tlr"))
    with pytest.raises(CohortError, match="does not exist"):
        load_subjects(tmp_path / "nope.tsv")


def test_synthetic_ids_and_sheet():
    ids = synthetic_ids({"n_subjects": 25, "id_prefix": "S"})
    assert ids[0] == "S001" and ids[-1] == "S025" and len(set(ids)) == 25
    df = synthetic_sheet(ids[:2])
    assert list(df.columns) == ["subject", "lr", "hr", "split"]
