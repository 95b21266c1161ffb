"""The SR machinery (issue 4, items 1, 2 and 6): split, patches, the training loop with
checkpoints and resume, inference over volumes, metrics. Models here are a tiny two-phase GAN
defined below, so that these tests do not depend on the real networks (femursr.sr.gan)."""

import copy
import csv
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from femursr.split import SplitError, read_split, split_subjects, write_split
from femursr.sr.base import Phase, PhaseSetup, SRModel, StepContext, ema_update
from femursr.sr.data import EpochSampler, FemurVoxels, PatchDataset, SubjectFiles, augment, axial_stack
from femursr.sr.infer import infer_volume, load_generator, predict_slices, run_inference, save_generator, tile_starts
from femursr.sr.metrics import psnr, ssim
from femursr.sr.train import CheckpointMismatch, TrainingStopped, fit, seed_everything, select_device, train_sr
from femursr.volume import Volume, read_volume, write_volume

FRACTIONS = {"train": 0.6, "validation": 0.2, "test": 0.2}


# tiny convolutions run faster on one thread than on two (OpenMP overhead)
pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ------------------------------------------------------------------ a tiny model
class TinyGAN(SRModel):
    """Two 3x3 convolutions (receptive radius 2 px) against a tiny discriminator; two phases,
    schedulers in both, EMA of the generator, and noise on the input so that the random state
    matters."""

    name = "tiny"
    inference_modules = ("generator_ema",)

    def __init__(self, in_channels, params=None, perceptual_weights=None):
        super().__init__(in_channels)
        self.params = {"pretrain_epochs": 2, "gan_epochs": 2, "lr": 2e-3, "width": 8, **(params or {})}
        w = self.params["width"]
        self.generator = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 1, 3, padding=1))
        self.discriminator = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)

    def phases(self):
        return [Phase("pretrain", self.params["pretrain_epochs"]), Phase("gan", self.params["gan_epochs"])]

    def configure_phase(self, phase, iterations):
        g = torch.optim.Adam(self.generator.parameters(), lr=self.params["lr"])
        if phase == "pretrain":
            return PhaseSetup({"generator": g}, {"generator": torch.optim.lr_scheduler.MultiStepLR(g, [max(1, iterations // 2)], 0.5)})
        d = torch.optim.Adam(self.discriminator.parameters(), lr=self.params["lr"] / 2)
        sched = {n: torch.optim.lr_scheduler.CosineAnnealingLR(o, iterations) for n, o in (("generator", g), ("discriminator", d))}
        return PhaseSetup({"generator": g, "discriminator": d}, sched)

    def training_step(self, phase, lr, hr, setup, ctx):
        lr = lr + 0.01 * torch.randn_like(lr)  # uses the global torch RNG, as diffusion models do
        with ctx.autocast():
            sr = self.generator(lr)
            loss = F.l1_loss(sr.float(), hr)
            if phase == "gan":
                loss = loss + 0.01 * F.softplus(-self.discriminator(sr)).mean()
        ctx.backward_step(loss, setup.optimizers["generator"], "generator")
        out = {"l_g": loss.item()}
        if phase == "gan":
            with ctx.autocast():
                l_d = F.softplus(-self.discriminator(hr)).mean() + F.softplus(self.discriminator(sr.detach())).mean()
            ctx.backward_step(l_d, setup.optimizers["discriminator"], "discriminator")
            out["l_d"] = l_d.item()
        return out

    def on_step_end(self, phase):
        ema_update(self.generator_ema, self.generator, 0.8)

    @torch.no_grad()
    def predict(self, lr):
        return self.generator_ema(lr)


def build_tiny(name, dims, neighbours, params, perceptual_weights=None):
    assert name == "tiny"
    return TinyGAN(1 if dims == "2d" else 2 * neighbours + 1, params, perceptual_weights)


# ------------------------------------------------------------------ tiny prepared volumes
SHAPE = (12, 40, 48)  # z, y, x


def _ellipsoid(shape, centre, radii):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2 <= 1


def _subject(root, sid, seed, empty_slices=()):
    """LR, HR (float32 .nii in [0, 1], masked) and femur mask (.nii.gz) of a blob-shaped femur."""
    rng = np.random.default_rng(seed)
    mask = _ellipsoid(SHAPE, (6, 20 + seed % 3, 22), (5.5, 14, 18))
    for z in empty_slices:
        mask[z] = False
    hr = np.clip(0.5 + 0.4 * np.sin(np.arange(SHAPE[2]) / 2.0)[None, None] * np.cos(np.arange(SHAPE[1]) / 3.0)[None, :, None] + 0.05 * rng.standard_normal(SHAPE), 0, 1)
    lr = np.clip(0.5 * hr + 0.25 + 0.05 * rng.standard_normal(SHAPE), 0, 1)
    geo = dict(spacing=(0.2, 0.2, 0.3), origin=(1.0, -2.0, 3.0))
    d = root / sid
    files = SubjectFiles(sid, str(d / "lr.nii"), str(d / "hr.nii"), str(d / "femur.nii.gz"))
    write_volume(Volume((lr * mask).astype(np.float32), **geo), files.lr)
    write_volume(Volume((hr * mask).astype(np.float32), **geo), files.hr)
    write_volume(Volume(mask.astype(np.uint8), **geo), files.mask)
    return files


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    return [_subject(root, f"T{i}", i, empty_slices=(0, 1) if i == 2 else ()) for i in range(4)]


def _volumes(files):
    return read_volume(files.lr).array, read_volume(files.hr).array, read_volume(files.mask).array != 0


# ------------------------------------------------------------------ split
def test_split_is_seeded_60_20_20_and_independent_of_order():
    ids = [f"S{i:03d}" for i in range(1, 26)]
    a = split_subjects(ids, FRACTIONS, 7)
    assert [len(a.part(p)) for p in ("train", "validation", "test")] == [15, 5, 5]
    assert set(a.source.values()) == {"seeded"}
    b = split_subjects(list(reversed(ids)), FRACTIONS, 7)
    assert {s: b.part_of[s] for s in ids} == a.part_of
    c = split_subjects(ids, FRACTIONS, 8)
    assert c.part("test") != a.part("test")
    assert [len(split_subjects(ids[:n], FRACTIONS, 7).part(p)) for n in (3, 50 // 10) for p in ("train", "validation", "test")] == [1, 1, 1, 3, 1, 1]
    ids50 = [f"S{i:03d}" for i in range(1, 51)]
    assert [len(split_subjects(ids50, FRACTIONS, 7).part(p)) for p in ("train", "validation", "test")] == [30, 10, 10]


def test_split_errors_name_the_problem():
    with pytest.raises(SplitError, match="at least 3"):
        split_subjects(["A", "B"], FRACTIONS, 1)
    with pytest.raises(SplitError, match="sum to 1.1"):
        split_subjects(["A", "B", "C"], {"train": 0.7, "validation": 0.2, "test": 0.2}, 1)
    with pytest.raises(SplitError, match="validation and test part"):
        split_subjects(["A", "B", "C"], FRACTIONS, 1, fixed={"A": "train", "B": "train", "C": "train"})


def test_sheet_split_overrides_and_the_rest_fills_the_fractions(tmp_path):
    ids = [f"S{i:03d}" for i in range(1, 26)]
    seeded = split_subjects(ids, FRACTIONS, 7)
    moved = seeded.part("train")[:2]
    s = split_subjects(ids, FRACTIONS, 7, fixed={moved[0]: "test", moved[1]: "test", "S999": "train", seeded.part("test")[0]: ""})
    assert s.part_of[moved[0]] == s.part_of[moved[1]] == "test"
    assert s.source[moved[0]] == "sheet" and s.source[seeded.part("test")[0]] == "seeded"
    assert [len(s.part(p)) for p in ("train", "validation", "test")] == [15, 5, 5]
    back = read_split(write_split(s, tmp_path / "split.tsv"))
    assert back == s
    assert (tmp_path / "split.tsv").read_text().splitlines()[0] == "subject\tsplit\tsource"


# ------------------------------------------------------------------ patches
def test_femur_index_enumerates_the_mask_in_order():
    rng = np.random.default_rng(0)
    mask = rng.random((5, 9, 11)) < 0.4
    idx = FemurVoxels.from_mask(mask, chunk=2)
    assert idx.total == mask.sum()
    assert [idx.voxel(k) for k in range(idx.total)] == [tuple(map(int, v)) for v in np.argwhere(mask)]
    assert list(idx.slices()) == [z for z in range(5) if mask[z].any()]


@pytest.mark.parametrize("neighbours", [0, 2])
@pytest.mark.parametrize("patch_px", [16, 25, 64])
def test_patch_shapes_and_centre_inside_the_femur(cohort, neighbours, patch_px):
    ds = PatchDataset(cohort, patch_px, neighbours, seed=3)
    c = 2 * neighbours + 1
    for i in range(20):
        lr, hr = ds[(1, i)]
        assert lr.shape == (c, patch_px, patch_px) and hr.shape == (1, patch_px, patch_px)
        assert lr.dtype == hr.dtype == torch.float32
        d = ds.draw(1, i)
        lr_vol, hr_vol, mask = _volumes(cohort[d.subject])
        assert mask[d.z, d.y, d.x]
        # undo the augmentation: the centre voxel sits at (P // 2, P // 2)
        flip = hr.numpy()[:, :, ::-1] if d.flip else hr.numpy()
        raw_hr = np.rot90(flip, -d.rot90, axes=(1, 2))
        raw_lr = np.rot90(lr.numpy()[:, :, ::-1] if d.flip else lr.numpy(), -d.rot90, axes=(1, 2))
        h = patch_px // 2
        assert raw_hr[0, h, h] == hr_vol[d.z, d.y, d.x]
        for ch in range(c):
            z = min(max(d.z + ch - neighbours, 0), SHAPE[0] - 1)
            assert raw_lr[ch, h, h] == lr_vol[z, d.y, d.x]
    draws = {(ds.draw(1, i).rot90, ds.draw(1, i).flip) for i in range(200)}
    assert len(draws) == 8  # all rotations and flips occur


def test_edge_slices_are_replicated_and_outside_is_zero(cohort):
    lr_vol = _volumes(cohort[0])[0]
    s = axial_stack(lr_vol, 0, 2)
    assert np.array_equal(s[0], lr_vol[0]) and np.array_equal(s[1], lr_vol[0]) and np.array_equal(s[3], lr_vol[1])
    s = axial_stack(lr_vol, SHAPE[0] - 1, 2)
    assert np.array_equal(s[4], lr_vol[-1]) and np.array_equal(s[3], lr_vol[-1])
    p = axial_stack(lr_vol, 5, 1, y0=-10, x0=SHAPE[2] - 6, height=16, width=16)
    assert p.shape == (3, 16, 16)
    assert not p[:, :10].any() and not p[:, :, 6:].any()
    assert np.array_equal(p[1, 10:, :6], lr_vol[5, :6, -6:])


def test_augment_is_the_dihedral_group():
    a = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    outs = {augment(a, r, f).tobytes() for r in range(4) for f in (False, True)}
    assert len(outs) == 8


def test_sample_is_a_function_of_seed_epoch_and_index_whatever_the_workers(cohort):
    ds = PatchDataset(cohort, 24, 2, seed=11)
    again = PatchDataset(cohort, 24, 2, seed=11)
    assert ds.draw(4, 9) == again.draw(4, 9)
    assert ds.draw(4, 9) != ds.draw(4, 10) and ds.draw(4, 9) != ds.draw(5, 9)
    assert ds.draw(4, 9) != PatchDataset(cohort, 24, 2, seed=12).draw(4, 9)

    def batches(workers, start):
        loader = DataLoader(ds, batch_size=4, sampler=EpochSampler(4, start, 16), num_workers=workers)
        return torch.cat([lr for lr, _ in loader]), torch.cat([hr for _, hr in loader])

    lr0, hr0 = batches(0, 0)
    lr2, hr2 = batches(2, 0)
    assert torch.equal(lr0, lr2) and torch.equal(hr0, hr2)
    lr_tail, _ = batches(2, 8)  # resuming in the middle of the epoch
    assert torch.equal(lr_tail, lr0[8:])


def test_validation_patches_are_fixed_and_not_augmented(cohort):
    ds = PatchDataset(cohort[:2], 16, 0, seed=5, stream="validation", augment=False)
    train = PatchDataset(cohort[:2], 16, 0, seed=5)
    assert all(ds.draw(0, i).rot90 == 0 and not ds.draw(0, i).flip for i in range(30))
    assert [ds.draw(0, i) for i in range(5)] == [PatchDataset(cohort[:2], 16, 0, seed=5, stream="validation", augment=False).draw(0, i) for i in range(5)]
    a, b = ds.draw(0, 0), train.draw(0, 0)
    assert (a.subject, a.z, a.y, a.x) != (b.subject, b.z, b.y, b.x)  # separate random streams


# ------------------------------------------------------------------ metrics
def test_psnr_and_ssim_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(1)
    ref = rng.random((3, 40, 33))
    noisy = np.clip(ref + 0.1 * rng.standard_normal(ref.shape), 0, 1)
    p = psnr(torch.tensor(noisy, dtype=torch.float32), torch.tensor(ref, dtype=torch.float32))
    s = ssim(torch.tensor(noisy), torch.tensor(ref))
    for i in range(3):
        assert p[i].item() == pytest.approx(peak_signal_noise_ratio(ref[i], noisy[i], data_range=1.0), abs=1e-4)
        want = structural_similarity(ref[i], noisy[i], data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert s[i].item() == pytest.approx(want, abs=1e-10)
    # analytic cases: MSE 0.01 is 20 dB; identical images have SSIM 1
    assert psnr(torch.full((8, 8), 0.1), torch.zeros(8, 8)).item() == pytest.approx(20.0)
    assert ssim(torch.tensor(ref[0]), torch.tensor(ref[0])).item() == pytest.approx(1.0)


# ------------------------------------------------------------------ training, checkpoints, resume
TRAIN = dict(batch_size=4, samples_per_epoch=16, validation_samples=4, device="cpu", checkpoint_every_steps=5, log_every_steps=2)


def _datasets(cohort):
    return PatchDataset(cohort[:3], 16, 1, seed=2), PatchDataset(cohort[3:], 16, 1, seed=2, stream="validation", augment=False)


def _fit(cohort, run_dir, config=None, callback=None, **kw):
    seed_everything(123)
    model = TinyGAN(3)
    train, val = _datasets(cohort)
    res = fit(model, train, val, run_dir, config=config or {"test": 1}, callback=callback, **{**TRAIN, **kw})
    return model, res


class Kill(Exception):
    pass


def _kill_at(step):
    def cb(pos):
        if pos.global_step == step:
            raise Kill(step)

    return cb


def _metric_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(r["phase"], r["epoch"], r["global_step"], r["metric"], r["value"]) for r in csv.DictReader(f) if r["metric"] != "epoch_seconds"]


def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(cohort, tmp_path):
    ref, res = _fit(cohort, tmp_path / "ref", tensorboard=True)
    assert res.global_step == 16 and res.resumed_from is None
    run = tmp_path / "killed"
    # killed mid-epoch in the pre-training (last checkpoint: step 5), then in the GAN phase (step 10)
    for step in (7, 11):
        with pytest.raises(Kill):
            _fit(cohort, run, callback=_kill_at(step))
    model, res = _fit(cohort, run)
    assert res.resumed_from == 10 and res.global_step == 16
    a, b = ref.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("generator_ema.") for k in a) and any(k.startswith("discriminator.") for k in a)
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"kill-and-resume: max abs weight difference {diff:.3g} over {len(a)} tensors")
    assert diff < 1e-6
    # optimizers, schedulers and the random state of the final checkpoints agree too
    ca = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    cb = torch.load(run / "checkpoint.pt", weights_only=True)
    for name in ("generator", "discriminator"):
        sa, sb = ca["optimizers"][name]["state"], cb["optimizers"][name]["state"]
        assert sa.keys() == sb.keys()
        for p in sa:
            assert int(sa[p]["step"]) == int(sb[p]["step"]) == 8
            assert torch.allclose(sa[p]["exp_avg"], sb[p]["exp_avg"], atol=1e-6)
            assert torch.allclose(sa[p]["exp_avg_sq"], sb[p]["exp_avg_sq"], atol=1e-8)
        assert ca["schedulers"][name]["last_epoch"] == cb["schedulers"][name]["last_epoch"] == 8
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])
    # the metrics of the resumed run hold every epoch once, as the uninterrupted run's
    rows = _metric_rows(run)
    assert rows == _metric_rows(tmp_path / "ref")
    assert {r[3] for r in rows} >= {"train_l_g", "train_l_d", "val_psnr", "val_ssim", "lr_generator", "lr_discriminator"}
    assert len({r[2] for r in rows}) == 4  # four epochs
    assert list((tmp_path / "ref" / "tensorboard").glob("events.out.tfevents.*"))


def test_sigterm_writes_a_checkpoint_and_stops(cohort, tmp_path):
    import os
    import signal

    def term_at_6(pos):
        if pos.global_step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped, match="SIGTERM received: checkpoint written at step 7"):
        _fit(cohort, tmp_path, callback=term_at_6, handle_signals=True)
    assert signal.getsignal(signal.SIGTERM) is before
    _, res = _fit(cohort, tmp_path)
    assert res.resumed_from == 7 and res.global_step == 16


def test_finished_run_is_not_trained_again(cohort, tmp_path):
    first, _ = _fit(cohort, tmp_path)
    again, res = _fit(cohort, tmp_path)
    assert res.resumed_from == 16 and res.global_step == 16
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_checkpoint_of_another_configuration_is_refused(cohort, tmp_path):
    with pytest.raises(Kill):
        _fit(cohort, tmp_path, config={"params": {"lr": 1e-3}}, callback=_kill_at(6))
    with pytest.raises(CheckpointMismatch) as err:
        _fit(cohort, tmp_path, config={"params": {"lr": 2e-3}})
    msg = str(err.value)
    assert "params.lr: 0.001 -> 0.002" in msg and f"Delete the folder {tmp_path}" in msg and "restore the configuration" in msg


def test_device_selection():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            select_device("cuda:0")
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        select_device("gpu")


def test_train_sr_writes_weights_record_and_metrics(cohort, tmp_path):
    training = {
        "patch_size_px": 16, "batch_size": 4, "samples_per_epoch": 8, "neighbours": 2, "validation_patches": 4, "amp": False,
        "device": "cpu", "num_workers": 0, "checkpoint_every_steps": 3, "log_every_steps": 1,
    }  # fmt: skip
    out = tmp_path / "models" / "tiny_25d"
    rec = train_sr(
        name="tiny", dims="25d", model_params={"pretrain_epochs": 1, "gan_epochs": 1}, training=training, seed=1,
        train=cohort[:3], validation=cohort[3:], run_dir=out / "run", generator=out / "generator.pt",
        record=out / "record.json", metrics=out / "metrics.csv", build=build_tiny,
    )  # fmt: skip
    assert rec["steps"] == 4 and rec["in_channels"] == 5 and rec["amp"] == "off"
    assert set(rec["validation"]) == {"psnr", "ssim"}
    assert json.loads((out / "record.json").read_text())["train_subjects"] == ["T0", "T1", "T2"]
    assert (out / "metrics.csv").read_text() == (out / "run" / "metrics.csv").read_text()
    blob = torch.load(out / "generator.pt", weights_only=True)
    assert blob["model"] == "tiny" and blob["dims"] == "25d"
    assert all(k.startswith("generator_ema.") for k in blob["state_dict"])  # the discriminator is not kept
    assert not list(out.glob(".*tmp*")) and not list((out / "run").glob(".*"))


# ------------------------------------------------------------------ inference
def _tiny_eval(in_channels, seed=0):
    torch.manual_seed(seed)
    m = TinyGAN(in_channels).eval()
    with torch.no_grad():
        for p in m.generator_ema.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("in_channels", [1, 5])
def test_volume_inference_equals_stitched_slices(cohort, in_channels):
    lr, _, mask = _volumes(cohort[2])  # slices 0 and 1 hold no femur
    model = _tiny_eval(in_channels)
    out, timing = infer_volume(model, lr, mask, batch_slices=3)
    n = (in_channels - 1) // 2
    for z in range(SHAPE[0]):
        if not mask[z].any():
            assert not out[z].any()
            continue
        with torch.no_grad():
            want = model.predict(torch.from_numpy(axial_stack(lr, z, n)[None]))[0, 0].numpy()
        want = np.clip(want, 0, 1) * mask[z]
        np.testing.assert_allclose(out[z], want, atol=1e-5)  # batched vs single-slice convolution
    assert out.min() >= 0 and out.max() <= 1 and out.max() > 0
    assert timing["slices_computed"] == SHAPE[0] - 2 and timing["seconds"] > 0 and timing["warmup_batches"] == 1


def test_tiled_inference_equals_untiled_away_from_tile_borders():
    model = _tiny_eval(3, seed=4)
    rng = np.random.default_rng(2)
    stacks = rng.random((2, 3, 70, 90)).astype(np.float32)
    ctx = StepContext(torch.device("cpu"))
    whole = predict_slices(model, stacks, "cpu", ctx)
    tile, overlap, radius = 32, 12, 2
    tiled = predict_slices(model, stacks, "cpu", ctx, tile_px=tile, overlap_px=overlap)
    assert tiled.shape == whole.shape

    def exact(size):  # pixels where every tile that covers them sees their whole receptive field
        ok = np.ones(size, bool)
        for s in tile_starts(size, tile, overlap):
            e = s + tile
            for p in range(s, e):
                if (s > 0 and p - s < radius) or (e < size and e - 1 - p < radius):
                    ok[p] = False
        return ok

    away = exact(70)[:, None] & exact(90)[None, :]
    assert away.mean() > 0.7
    np.testing.assert_allclose(tiled[:, away], whole[:, away], atol=1e-5)
    # at the seams the blend differs, but little
    assert np.abs(tiled - whole).max() > 1e-5
    assert np.abs(tiled - whole).max() < 0.5 * np.abs(whole).max()
    assert tile_starts(90, 32, 12) == [0, 20, 40, 58] and tile_starts(20, 32, 12) == [0]


def test_generator_file_round_trip_and_volume_written_with_timing(cohort, tmp_path):
    model = _tiny_eval(5)
    path = save_generator(model, tmp_path / "generator.pt", name="tiny", dims="25d", neighbours=2, params={})
    back = load_generator(path, build=build_tiny)
    x = torch.rand(2, 5, 20, 24)
    assert torch.equal(back.predict(x), model.predict(x))
    files = cohort[1]
    timing = run_inference(path, files.lr, files.hr, files.mask, tmp_path / "sr" / "T1.nii.gz", tmp_path / "sr" / "T1.json", device="cpu", subject="T1", build=build_tiny)
    sr, hr = read_volume(tmp_path / "sr" / "T1.nii.gz"), read_volume(files.hr)
    assert sr.same_grid(hr) and sr.array.dtype == np.float32
    mask = read_volume(files.mask).array != 0
    assert not sr.array[~mask].any() and 0 <= sr.array.min() and sr.array.max() <= 1
    saved = json.loads((tmp_path / "sr" / "T1.json").read_text())
    assert saved == json.loads(json.dumps(timing)) and saved["seconds"] > 0 and saved["model"] == "tiny" and saved["device"] == "cpu"
    # a weights file that lacks weights of the model is refused, naming the file
    blob = torch.load(path, weights_only=True)
    blob["state_dict"].pop(next(iter(blob["state_dict"])))
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: 1 weight"):
        load_generator(tmp_path / "bad.pt", build=build_tiny)


# ------------------------------------------------------------------ stochastic and latent models
class TinyNoisy(SRModel):
    """A stochastic model: the LR centre slice scaled by a learnt factor, plus Gaussian noise."""

    name = "noisy"
    stochastic = True

    def __init__(self, in_channels, params=None, perceptual_weights=None):
        super().__init__(in_channels)
        self.scale = nn.Parameter(torch.tensor(1.0))

    @torch.no_grad()
    def predict(self, lr):
        c = lr[:, lr.shape[1] // 2 : lr.shape[1] // 2 + 1]
        return self.scale * c + 0.1 * torch.randn_like(c)


def test_sampled_inference_writes_the_mean_and_sd_of_the_samples(cohort, tmp_path):
    lr, _, mask = _volumes(cohort[2])
    model = TinyNoisy(3).eval()
    std = np.zeros(lr.shape, np.float32)
    out, timing = infer_volume(model, lr, mask, batch_slices=64, samples=5, seed=11, std_out=std)
    # the same draws by hand: one batch of all femur slices, seeded after the warm-up
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    x = torch.from_numpy(np.stack([axial_stack(lr, int(z), 1) for z in zs]))
    torch.manual_seed(11)
    draws = np.stack([np.clip(model.predict(x)[:, 0].numpy(), 0, 1) for _ in range(5)]).astype(np.float64)
    np.testing.assert_allclose(out[zs], draws.mean(0) * mask[zs], atol=1e-6)
    np.testing.assert_allclose(std[zs], draws.std(0) * mask[zs], atol=1e-6)
    assert not out[~mask].any() and not std[~mask].any()
    inner = mask & (lr > 0.3) & (lr < 0.7)  # far from the clipping bounds: SD of the noise, 0.1
    assert 0.07 < np.median(std[inner]) < 0.12
    assert timing["samples"] == 5 and timing["seed"] == 11
    again, _ = infer_volume(model, lr, mask, batch_slices=64, samples=5, seed=11)
    other, _ = infer_volume(model, lr, mask, batch_slices=64, samples=5, seed=12)
    assert np.array_equal(again, out) and not np.array_equal(other, out)
    with pytest.raises(ValueError, match="deterministic"):
        infer_volume(_tiny_eval(3), lr, mask, samples=2)


def test_sampled_volume_and_sd_files(cohort, tmp_path):
    path = save_generator(TinyNoisy(1), tmp_path / "g.pt", name="noisy", dims="2d", neighbours=0, params={})
    files = cohort[1]

    def build(name, dims, neighbours, params, perceptual_weights=None):
        return TinyNoisy(1)

    with pytest.raises(ValueError, match="std_out"):
        run_inference(path, files.lr, files.hr, files.mask, tmp_path / "a.nii.gz", tmp_path / "a.json", device="cpu", samples=3, build=build)
    run_inference(path, files.lr, files.hr, files.mask, tmp_path / "a.nii.gz", tmp_path / "a.json", device="cpu", samples=3, std_out=tmp_path / "a.std.nii.gz", build=build)
    sd, hr = read_volume(tmp_path / "a.std.nii.gz"), read_volume(files.hr)
    assert sd.same_grid(hr) and sd.array.max() > 0.02
    assert json.loads((tmp_path / "a.json").read_text())["samples"] == 3


def test_validation_of_the_autoencoder_reconstructs_the_hr(cohort):
    from femursr.sr.train import evaluate

    class Halver(TinyNoisy):
        stochastic = False
        validation_input = "hr"

        @torch.no_grad()
        def predict(self, x):
            return 0.5 * x

    _, val = _datasets(cohort)
    loader = DataLoader(val, sampler=EpochSampler(0, 0, 4), batch_size=4)
    got = evaluate(Halver(3), loader, torch.device("cpu"), StepContext("cpu"))
    _, hr = next(iter(loader))
    assert got["psnr"] == pytest.approx(float(psnr(0.5 * hr, hr).mean()), rel=1e-6)


class TinyLatent(TinyGAN):
    """A model that needs an autoencoder: it keeps the autoencoder's one weight as a buffer."""

    name = "latent"
    needs_autoencoder = True
    inference_modules = ("generator_ema", "ae_weight")

    def __init__(self, in_channels, params=None, perceptual_weights=None):
        super().__init__(in_channels, {"pretrain_epochs": 1, "gan_epochs": 0})
        assert params["autoencoder_network"] == {"latent_channels": 6}
        self.register_buffer("ae_weight", torch.zeros(()))

    def load_autoencoder(self, path):
        self.ae_weight.copy_(torch.load(path, weights_only=True)["w"])


def test_latent_model_trains_with_its_autoencoder_and_refuses_another(cohort, tmp_path):
    import hashlib

    training = {
        "patch_size_px": 16, "batch_size": 4, "samples_per_epoch": 8, "neighbours": 0, "validation_patches": 4, "amp": "off",
        "device": "cpu", "num_workers": 0, "checkpoint_every_steps": 1, "log_every_steps": 1,
    }  # fmt: skip
    ae = tmp_path / "autoencoder.pt"
    torch.save({"w": torch.tensor(3.5)}, ae)
    out = tmp_path / "latent_2d"

    def build(name, dims, neighbours, params, perceptual_weights=None):
        return TinyLatent(1, params)

    def train(**kw):
        args = dict(
            name="latent", dims="2d", model_params={"autoencoder_network": {"latent_channels": 6}}, training=training, seed=1,
            train=cohort[:3], validation=cohort[3:], run_dir=out / "run", generator=out / "generator.pt",
            record=out / "record.json", metrics=out / "metrics.csv", build=build,
        )  # fmt: skip
        return train_sr(**{**args, **kw})

    with pytest.raises(ValueError, match="train it first"):
        train()
    rec = train(autoencoder=ae)
    assert rec["autoencoder"]["sha256"] == hashlib.sha256(ae.read_bytes()).hexdigest()
    assert float(torch.load(out / "generator.pt", weights_only=True)["state_dict"]["ae_weight"]) == 3.5
    torch.save({"w": torch.tensor(4.0)}, ae)  # the autoencoder retrained: the old run must not resume
    with pytest.raises(CheckpointMismatch, match="autoencoder_sha256"):
        train(autoencoder=ae)


# ------------------------------------------------------------------ the rules
def _sr_config(tmp_path, n_subjects=6, **training):
    from conftest import small_synthetic

    cfg = small_synthetic(n_subjects=n_subjects, scale=0.45, voxel=0.4)
    cfg["training"].update({"models": ["srgan", "realesrgan", "ldm", "resshift"], **training})
    path = tmp_path / "config.yaml"
    path.write_text(__import__("yaml").safe_dump(cfg))
    return cfg, path


def _job_counts(stdout):
    jobs = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            jobs[parts[0]] = int(parts[1])
    return jobs


def test_split_rule_writes_the_split_that_the_dag_uses(tmp_path):
    from conftest import run_snakemake

    cfg, cfgfile = _sr_config(tmp_path)
    dry = run_snakemake(["-n", "--configfile", str(cfgfile)], tmp_path)
    jobs = _job_counts(dry.stdout)
    want = split_subjects([f"S{i:03d}" for i in range(1, 7)], cfg["split"], cfg["seed"])
    n_test = len(want.part("test"))
    # resshift draws 2 samples per slice in the demo config: its volumes come from sr_infer_sampled
    assert (jobs["split"], jobs["train_autoencoder"], jobs["train_sr"], jobs["sr_infer"], jobs["sr_infer_sampled"]) == (1, 1, 8, 6 * n_test, 2 * n_test)
    for s in want.part("test"):
        assert f"results/sr/realesrgan_25d/{s}.nii.gz" in dry.stdout
    run_snakemake(["-c1", "results/split.tsv", "--configfile", str(cfgfile)], tmp_path)
    assert read_split(tmp_path / "results" / "split.tsv") == want
    assert not (tmp_path / "results" / "synthetic").exists()  # the split needs no data


@pytest.mark.parametrize(
    "n_subjects, training, message",
    [
        (6, {"models": ["srgn"]}, "config training.models: unknown SR model(s) srgn; known: ldm, realesrgan, resshift, srgan"),
        (2, {}, "training, validation and test need at least one each"),
    ],
)
def test_sr_config_errors_stop_before_any_job(tmp_path, n_subjects, training, message):
    from conftest import run_snakemake

    _, cfgfile = _sr_config(tmp_path, n_subjects, **training)
    res = run_snakemake(["-n", "--configfile", str(cfgfile)], tmp_path, check=False)
    assert res.returncode != 0 and message in res.stdout + res.stderr


@pytest.mark.slow
def test_sr_rules_train_resume_and_apply_on_a_tiny_cohort(tmp_path):
    """split -> train_sr (every model of the registry in the demo config, 2D and 2.5D, one step
    per phase) -> sr_infer on the test subject, through snakemake; then a deleted output is
    rebuilt from the run's checkpoint without training again."""
    from conftest import run_snakemake

    cfg, cfgfile = _sr_config(tmp_path, n_subjects=3, samples_per_epoch=2, batch_size=2, validation_patches=2, device="cpu")
    for block in cfg["models"].values():  # the SR models and the diffusion models' autoencoder
        for phase in ("pretrain", "gan"):
            if phase in block:
                block[phase]["epochs"] = 1
        if "epochs" in block:
            block["epochs"] = 1
    cfg["models"]["resshift"]["samples"] = 2
    cfgfile.write_text(__import__("yaml").safe_dump(cfg))
    run_snakemake(["-c1", "results/split.tsv", "--configfile", str(cfgfile)], tmp_path)
    (test,) = read_split(tmp_path / "results" / "split.tsv").part("test")
    models = [f"{name}_{dims}" for name in cfg["training"]["models"] for dims in cfg["training"]["dims"]]
    targets = [f"results/sr/{m}/{test}.{ext}" for m in models for ext in ("nii.gz", "json")]
    targets += [f"results/models/{m}/record.json" for m in models]
    targets += [f"results/sr/resshift_{dims}/{test}.std.nii.gz" for dims in cfg["training"]["dims"]]
    run_snakemake(["-c2", *targets, "--configfile", str(cfgfile)], tmp_path, timeout=3600)
    hr = read_volume(tmp_path / "results" / "prepared" / test / "hr.nii")
    mask = read_volume(tmp_path / "results" / "masks" / test / "femur.nii.gz").array != 0
    for name in cfg["training"]["models"]:
        for dims in cfg["training"]["dims"]:
            run = tmp_path / "results" / "models" / f"{name}_{dims}"
            rec = json.loads((run / "record.json").read_text())
            assert rec["steps"] == (2 if name in ("srgan", "realesrgan") else 1) and rec["in_channels"] == (1 if dims == "2d" else 5)
            assert rec["perceptual_weights"] is None and set(rec["validation"]) == {"psnr", "ssim"}
            assert (run / "run" / "checkpoint.pt").is_file() and list((run / "run" / "tensorboard").iterdir())
            sr = read_volume(tmp_path / "results" / "sr" / f"{name}_{dims}" / f"{test}.nii.gz")
            assert sr.same_grid(hr) and not sr.array[~mask].any() and 0 < sr.array.max() <= 1
            timing = json.loads((tmp_path / "results" / "sr" / f"{name}_{dims}" / f"{test}.json").read_text())
            assert timing["seconds"] > 0 and timing["slices_computed"] == int(mask.any(axis=(1, 2)).sum())
            assert timing["samples"] == (2 if name == "resshift" else 1)
            if name == "resshift":
                sd = read_volume(tmp_path / "results" / "sr" / f"{name}_{dims}" / f"{test}.std.nii.gz")
                assert sd.same_grid(hr) and not sd.array[~mask].any() and sd.array.max() > 0
            if name in ("ldm", "resshift"):
                assert rec["autoencoder"]["weights"] == "results/models/autoencoder/autoencoder.pt"
    assert "Nothing to be done" in run_snakemake(["-n", *targets, "--configfile", str(cfgfile)], tmp_path).stdout
    # an output lost after training: the rerun resumes from the final checkpoint, no new step
    first = tmp_path / "results" / "models" / f"{cfg['training']['models'][0]}_2d"
    (first / "generator.pt").unlink()
    run_snakemake(["-c1", str((first / "generator.pt").relative_to(tmp_path)), "--configfile", str(cfgfile)], tmp_path)
    rec = json.loads((first / "record.json").read_text())
    assert rec["resumed_from_step"] == rec["steps"] == 2
