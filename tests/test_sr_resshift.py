"""ResShift (issue 5, item 3): the residual-shifting chain against its formulas, the Swin-UNet's
windows and shapes, the model overfitting one pair, inference on odd slice sizes, checkpoint and
resume through the shared machinery, and the config defaults. Networks are tiny (CPU, seconds)."""

import copy
import math

import numpy as np
import pytest
import torch

from femursr.sr.base import SRModel, StepContext
from femursr.sr.data import PatchDataset, SubjectFiles
from femursr.sr.infer import load_generator, save_generator
from femursr.sr.resshift import RESSHIFT_DEFAULTS, ResShiftDiffusion, ResShiftSR, eta_schedule
from femursr.sr.swinunet import LRFeatureExtractor, SwinBlock, SwinUNet
from femursr.sr.train import fit, seed_everything
from femursr.volume import Volume, write_volume

TINY_VAE = {"latent_channels": 6, "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4}
TINY_NET = {
    "channels": 16, "channel_mult": [1, 2], "res_blocks": 1, "swin_levels": [0, 1], "swin_depth": 2,
    "swin_embed_dim": 16, "swin_head_channels": 8, "window_size": 2, "norm_groups": 4,
}  # fmt: skip


# tiny convolutions run faster on one thread than on two (OpenMP overhead)
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny_params(**kw):
    return {"autoencoder_network": TINY_VAE, "network": TINY_NET, "feature_extractor": {"base_channels": 4}, **kw}


# ------------------------------------------------------------------ the chain
def test_schedule_equals_the_closed_form():
    got = eta_schedule(8, kappa=2.0, power=0.3, min_noise_level=0.04, etas_end=0.99)
    # independently: sqrt(eta_t) = a * (b / a) ** ((t / (T - 1)) ** p), a = min(0.04 / 2, 0.04)
    a, b = 0.02, 0.99
    want = [math.exp(math.log(a) + (t / 7) ** 0.3 * (math.log(b) - math.log(a))) for t in range(8)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got, [0.020, 0.176, 0.292, 0.412, 0.542, 0.681, 0.830, 0.990], atol=6e-4)
    assert eta_schedule(1, 2.0, 0.3, 0.04, 0.99).tolist() == [0.99]
    # kappa < 1 starts at the minimum noise level itself
    assert eta_schedule(4, 0.5, 0.3, 0.04, 0.99)[0] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="etas_end"):
        eta_schedule(8, 2.0, 0.3, 0.04, 0.01)
    with pytest.raises(ValueError, match="steps"):
        eta_schedule(0, 2.0, 0.3, 0.04, 0.99)


def _chain():
    return ResShiftDiffusion(eta_schedule(8, 2.0, 0.3, 0.04, 0.99), kappa=2.0)


def _moments(x):
    return x.mean(0), x.var(0)


def test_forward_process_has_the_mean_and_variance_of_its_formula():
    torch.manual_seed(0)
    d, n = _chain(), 200_000
    x0 = torch.tensor([0.3, -1.2, 0.0]).reshape(1, 3, 1, 1).expand(n, 3, 1, 1)
    y = torch.tensor([-0.7, 0.4, 2.0]).reshape(1, 3, 1, 1).expand(n, 3, 1, 1)
    for t in (0, 3, 7):
        eta = float(d.etas[t])
        xt = d.q_sample(x0, y, torch.full((n,), t))
        mean, var = _moments(xt.double())
        want_mean = x0[0] + eta * (y[0] - x0[0])
        want_var = 4.0 * eta
        # four standard errors of the mean and of the variance
        assert (mean - want_mean).abs().max() < 4 * math.sqrt(want_var / n)
        assert (var - want_var).abs().max() < 4 * want_var * math.sqrt(2 / n)
        m, v = d.q_mean_variance(x0[:1], y[:1], torch.tensor([t]))
        torch.testing.assert_close(m[0], want_mean.float())
        assert float(v.max()) == pytest.approx(want_var)


def test_posterior_step_reproduces_the_previous_marginal():
    """x_t ~ q(x_t | x0, y), then x_{t-1} ~ q(x_{t-1} | x_t, x0): x_{t-1} must have the marginal
    q(x_{t-1} | x0, y) (mean x0 + eta_{t-1} e0, variance kappa^2 eta_{t-1})."""
    torch.manual_seed(1)
    d, n = _chain(), 200_000
    x0 = torch.full((n, 2, 1, 1), 0.5)
    y = torch.tensor([-1.0, 1.5]).reshape(1, 2, 1, 1).expand(n, 2, 1, 1)
    for t in (1, 4, 7):
        tt = torch.full((n,), t)
        xt = d.q_sample(x0, y, tt)
        mean, var = d.posterior(x0, xt, tt)
        prev = mean + var.sqrt() * torch.randn_like(xt)
        m, v = _moments(prev.double())
        eta = float(d.etas[t - 1])
        want_mean, want_var = x0[0] + eta * (y[0] - x0[0]), 4.0 * eta
        assert (m - want_mean).abs().max() < 4 * math.sqrt(want_var / n)
        assert (v - want_var).abs().max() < 4 * want_var * math.sqrt(2 / n)
    # the last step lands on x0
    m0, v0 = d.posterior(x0[:2], d.q_sample(x0[:2], y[:2], torch.zeros(2, dtype=torch.long)), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(m0, x0[:2])
    assert float(v0.abs().max()) == 0.0


def test_sampling_runs_exactly_T_evaluations_from_the_prior():
    d = _chain()
    torch.manual_seed(2)
    x0, y = torch.randn(3, 6, 4, 5), torch.randn(3, 6, 4, 5)
    noise = torch.randn_like(y)
    calls = []

    def oracle(x_in, t, cond):
        calls.append((x_in.clone(), t.clone()))
        assert cond == "lr"
        return x0

    out = d.sample(oracle, y, "lr", noise=noise)
    assert [int(t[0]) for _, t in calls] == list(range(7, -1, -1)) and len(calls) == d.steps == 8
    # the first input is the prior sample y + kappa sqrt(eta_T) noise, normalized by sqrt(kappa^2 eta_T + 1)
    eta_t = 0.99**2
    torch.testing.assert_close(calls[0][0], (y + 2.0 * 0.99 * noise) / math.sqrt(4 * eta_t + 1))
    torch.testing.assert_close(d.prior_sample(y, noise), y + 1.98 * noise)
    # a denoiser that knows x0 ends exactly on it (the last posterior step has variance 0)
    torch.testing.assert_close(out, x0)
    for steps in (1, 3, 15):
        n = []
        ResShiftDiffusion(eta_schedule(steps, 2.0, 0.3, 0.04, 0.99), 2.0).sample(lambda x, t, c: n.append(1) or x, y, None)
        assert len(n) == steps


# ------------------------------------------------------------------ the Swin-UNet
def test_swin_unet_keeps_odd_latent_shapes():
    torch.manual_seed(3)
    net = SwinUNet(6, lr_channels=5, factor=8, network=TINY_NET, extractor={"base_channels": 4})
    for p in net.parameters():  # leave the zero initialization so that the output depends on the input
        torch.nn.init.normal_(p, std=0.05)
    for h, w in ((13, 11), (7, 5), (1, 1), (8, 8)):
        x = torch.randn(2, 6, h, w)
        out = net(x, torch.tensor([0, 7]), torch.rand(2, 5, 8 * h, 8 * w))
        assert out.shape == x.shape and torch.isfinite(out).all()
    assert net.size_multiple == 2
    with pytest.raises(ValueError, match="expected"):
        net(torch.randn(1, 6, 4, 4), torch.tensor([0]), torch.rand(1, 5, 16, 16))
    ext = LRFeatureExtractor(5, 8, 16)
    assert ext.out_channels == 128 and ext(torch.rand(1, 5, 24, 40)).shape == (1, 128, 3, 5)


def _block(window, shift, seed=4):
    torch.manual_seed(seed)
    blk = SwinBlock(8, heads=2, window=window, shift=shift, mlp_ratio=2.0, groups=4)
    torch.nn.init.normal_(blk.attn.relative_position_bias_table, std=0.5)
    return blk


def test_window_attention_masks_the_padding():
    """A 6 x 6 map in windows of 4: the bottom-right 2 x 2 tokens share a window with 12 padded
    tokens. Their attention must equal that of a window-2 block (same weights, the relative
    position biases of offsets -1 ... 1) on those 4 tokens alone."""
    blk4 = _block(4, False)
    blk2 = SwinBlock(8, heads=2, window=2, shift=False, mlp_ratio=2.0, groups=4)
    blk2.load_state_dict({k: v for k, v in blk4.state_dict().items() if "relative_position_bias_table" not in k}, strict=False)
    t4 = blk4.attn.relative_position_bias_table.detach()
    with torch.no_grad():
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                blk2.attn.relative_position_bias_table[(dy + 1) * 3 + dx + 1] = t4[(dy + 3) * 7 + dx + 3]
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(blk4._attend(x)[..., 4:, 4:], blk2._attend(x[..., 4:, 4:]))
        torch.testing.assert_close(blk4._attend(x)[..., :4, :4], blk4._attend(x[..., :4, :4]))


@pytest.mark.parametrize("size", [8, 6])
def test_shifted_windows_keep_wrapped_regions_apart(size):
    """Shift 2 of windows of 4: token (0, 0) is rolled into the last window's corner region,
    where it attends to the tokens of rows and columns 0 and 1 only (padded map or not)."""
    blk = _block(4, True)
    x = torch.randn(1, 8, size, size)
    with torch.no_grad():
        base = blk._attend(x)[0, :, 0, 0]
        far = x.clone()
        far[..., 2:, :] += 5.0
        far[..., :, 2:] += 5.0
        torch.testing.assert_close(blk._attend(far)[0, :, 0, 0], base)
        near = x.clone()
        near[..., 1, 1] += 5.0
        assert (blk._attend(near)[0, :, 0, 0] - base).abs().max() > 1e-3
    assert blk(x).shape == x.shape


# ------------------------------------------------------------------ the model
def test_resshift_overfits_a_fixed_pair():
    torch.manual_seed(0)
    model = ResShiftSR(5, tiny_params(lr=2e-3, scheduler="constant", ema_decay=0.9))
    g = torch.Generator().manual_seed(1)
    hr = torch.rand(1, 1, 32, 32, generator=g)
    lr = (0.5 * hr + 0.25 + 0.05 * torch.randn(1, 5, 32, 32, generator=g)).clamp(0, 1)
    ctx = StepContext(torch.device("cpu"))
    setup = model.configure_phase("train", 150)
    losses = []
    for _ in range(150):
        losses.append(model.training_step("train", lr.repeat(2, 1, 1, 1), hr.repeat(2, 1, 1, 1), setup, ctx)["l_mse"])
        model.on_step_end("train")
    start, end = np.mean(losses[:3]), np.mean(losses[-10:])
    with torch.no_grad():
        z0, zy = model.encode(hr), model.encode(model.centre(lr))
        torch.manual_seed(5)
        z = model.diffusion.sample(model.denoiser_ema.eval(), zy, lr)
    lr_err, sample_err = float(((zy - z0) ** 2).mean()), float(((z - z0) ** 2).mean())
    print(f"x0 loss {start:.3g} -> {end:.3g}; latent MSE to HR: LR {lr_err:.3g}, sample {sample_err:.3g}")
    assert end < 0.05 * start
    assert sample_err < 0.1 * lr_err


def test_predict_keeps_odd_sizes_and_draws_from_the_global_generator():
    torch.manual_seed(0)
    model = ResShiftSR(1, tiny_params()).eval()
    for p in model.denoiser_ema.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(2, 1, 37, 53)
    torch.manual_seed(11)
    a = model.predict(x)
    torch.manual_seed(11)
    b = model.predict(x)
    c = model.predict(x)
    assert a.shape == (2, 1, 37, 53) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.pad_multiple() == 16
    assert model.evaluations_per_slice() == {"vae_encoder": 1, "denoiser": 8, "vae_decoder": 1}


def test_scale_factor_null_is_measured_on_the_first_batch():
    torch.manual_seed(0)
    model = ResShiftSR(1, tiny_params(scale_factor=None))
    assert torch.isnan(model.scale_factor)
    with pytest.raises(RuntimeError, match="never measured"):
        model.predict(torch.rand(1, 1, 16, 16))
    hr = torch.rand(4, 1, 16, 16)
    model.training_step("train", hr, hr, model.configure_phase("train", 1), StepContext(torch.device("cpu")))
    assert float(model.encode(hr).std()) == pytest.approx(1.0, rel=1e-4)
    assert "scale_factor" in model.state_dict() and "scale_factor" in model.inference_modules


def test_bad_training_patch_and_missing_autoencoder_block_are_named():
    with pytest.raises(ValueError, match="autoencoder_network"):
        ResShiftSR(1, {"network": TINY_NET})
    model = ResShiftSR(1, tiny_params())
    hr = torch.rand(2, 1, 24, 24)
    with pytest.raises(ValueError, match="multiples of 16 px"):
        model.training_step("train", hr, hr, model.configure_phase("train", 1), StepContext(torch.device("cpu")))


# ------------------------------------------------------------------ autoencoder file, checkpoints, resume
class _AutoencoderFile(SRModel):
    """Just a VAE under the name the autoencoder's weights file carries."""

    name = "autoencoder"
    inference_modules = ("vae",)

    def __init__(self, network):
        super().__init__(1)
        from femursr.sr.latent import build_vae

        self.vae = build_vae(network)


def _vae_file(path, network=TINY_VAE, seed=7):
    torch.manual_seed(seed)
    ae = _AutoencoderFile(network)
    save_generator(ae, path, name="autoencoder", dims="2d", neighbours=0, params={"network": network})
    return ae


SHAPE = (10, 32, 40)


def _subject(root, sid, seed):
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    mask = ((z - 5) / 5.0) ** 2 + ((y - 16) / 12.0) ** 2 + ((x - 20) / 15.0) ** 2 <= 1
    hr = np.clip(0.5 + 0.4 * np.sin(x / 2.0) * np.cos(y / 3.0) + 0.05 * rng.standard_normal(SHAPE), 0, 1)
    lr = np.clip(0.5 * hr + 0.25 + 0.05 * rng.standard_normal(SHAPE), 0, 1)
    d = root / sid
    files = SubjectFiles(sid, str(d / "lr.nii"), str(d / "hr.nii"), str(d / "femur.nii.gz"))
    geo = dict(spacing=(0.2, 0.2, 0.3), origin=(0.0, 0.0, 0.0))
    write_volume(Volume((lr * mask).astype(np.float32), **geo), files.lr)
    write_volume(Volume((hr * mask).astype(np.float32), **geo), files.hr)
    write_volume(Volume(mask.astype(np.uint8), **geo), files.mask)
    return files


class Kill(Exception):
    pass


def test_checkpoint_resume_and_weights_file(tmp_path):
    cohort = [_subject(tmp_path / "prepared", f"T{i}", i) for i in range(3)]
    ae = _vae_file(tmp_path / "autoencoder.pt")
    params = tiny_params(lr=1e-3, ema_warmup=True)

    def run(run_dir, callback=None):
        seed_everything(5)
        model = ResShiftSR(5, copy.deepcopy(params))
        model.load_autoencoder(tmp_path / "autoencoder.pt")
        train = PatchDataset(cohort[:2], 16, 2, seed=3)
        val = PatchDataset(cohort[2:], 16, 2, seed=3, stream="validation", augment=False)
        res = fit(
            model, train, val, run_dir, config={"resshift": params}, callback=callback, batch_size=2, samples_per_epoch=8,
            validation_samples=2, device="cpu", checkpoint_every_steps=3, log_every_steps=2, tensorboard=False, progress=False,
        )  # fmt: skip
        return model, res

    ref, res = run(tmp_path / "ref")
    assert res.global_step == 8 and set(res.validation) == {"psnr", "ssim"}
    for k, v in ae.vae.state_dict().items():  # the trained autoencoder's weights, untouched by training
        assert torch.equal(ref.vae.state_dict()[k], v)

    def kill_at(step):
        def cb(pos):
            if pos.global_step == step:
                raise Kill(step)

        return cb

    with pytest.raises(Kill):
        run(tmp_path / "killed", kill_at(5))  # last checkpoint: the end of epoch 1 (step 4)
    model, res = run(tmp_path / "killed")
    assert res.resumed_from == 4 and res.global_step == 8
    a, b = ref.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("denoiser_ema.") for k in a)
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"kill-and-resume: max abs weight difference {diff:.3g} over {len(a)} tensors")
    assert diff < 1e-6

    # the inference file is self-contained (VAE, EMA denoiser, scale) and rebuilds the same sampler
    path = save_generator(ref, tmp_path / "resshift.pt", name="resshift", dims="25d", neighbours=2, params=params)
    keys = torch.load(path, weights_only=True)["state_dict"].keys()
    assert {k.split(".")[0] for k in keys} == {"vae", "denoiser_ema", "scale_factor"}

    def build(name, dims, neighbours, p, perceptual_weights=None):
        assert name == "resshift"
        return ResShiftSR(2 * neighbours + 1, p)

    back = load_generator(path, build=build)
    x = torch.rand(1, 5, 21, 30)
    torch.manual_seed(9)
    want = ref.eval().predict(x)
    torch.manual_seed(9)
    assert torch.equal(back.predict(x), want)


def test_autoencoder_of_another_shape_is_refused(tmp_path):
    _vae_file(tmp_path / "ae.pt", {**TINY_VAE, "block_out_channels": [4, 8, 8, 8]})
    model = ResShiftSR(1, tiny_params())
    with pytest.raises(ValueError, match="ae.pt: the autoencoder's weights do not fit"):
        model.load_autoencoder(tmp_path / "ae.pt")


# ------------------------------------------------------------------ config and the paper's network
def test_schema_defaults_are_the_code_defaults_and_the_configs_validate():
    from conftest import SCHEMA, load_config
    from snakemake.utils import validate

    cfg = {"cohort": "synthetic"}
    validate(cfg, str(SCHEMA))
    assert cfg["models"]["resshift"] == RESSHIFT_DEFAULTS
    paper = load_config("paper.yaml")["models"]["resshift"]
    assert paper["network"] == RESSHIFT_DEFAULTS["network"] and paper["feature_extractor"] == RESSHIFT_DEFAULTS["feature_extractor"]
    assert (paper["epochs"], paper["lr"], paper["steps"], paper["scheduler"]) == (150, 4.5e-5, 8, "cosine")
    demo = load_config()["models"]["resshift"]
    model = ResShiftSR(1, {**demo, "autoencoder_network": TINY_VAE})
    assert model.pad_multiple() == 16 and model.record()["chain"]["sqrt_etas"][-1] == 0.99


def test_paper_network_parameter_counts():
    """The paper's Swin-UNet (ResShift realsr, about 118.6 M parameters there with a 3-channel LQ
    concatenated) with our LR extractor, counted without allocating (meta device)."""
    with torch.device("meta"):
        nets = {c: SwinUNet(6, 6, lr_channels=c, factor=8) for c in (1, 5)}
    counts = {c: sum(p.numel() for p in n.parameters()) for c, n in nets.items()}
    ext = {c: sum(p.numel() for p in n.feature_extractor.parameters()) for c, n in nets.items()}
    # extractor by hand: per stage conv3x3 (cin -> b) and stride-2 conv3x3 (b -> 2b), b = 16, 32, 64
    by_hand = lambda c: sum(9 * ci * b + b + 9 * b * 2 * b + 2 * b for ci, b in ((c, 16), (32, 32), (64, 64)))  # noqa: E731
    assert ext == {1: by_hand(1), 5: by_hand(5)}
    assert counts[5] - counts[1] == 4 * 9 * 16  # only the extractor's first convolution differs
    print(f"Swin-UNet + extractor: 2D {counts[1]:,}, 2.5D {counts[5]:,} (extractor {ext[1]:,} / {ext[5]:,})")
    assert 115e6 < counts[1] < 122e6
