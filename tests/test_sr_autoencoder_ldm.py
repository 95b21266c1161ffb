"""The autoencoder and the LDM (issue 5, items 1, 2 and 4): the latent grid, the weights file the
diffusion models read, the LR condition, the DDPM forward process against its closed form, DDIM's
number of network evaluations, overfitting a fixed pair, any slice size, kill-and-resume through
the machinery, and the config defaults. Tiny networks on the CPU."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from femursr.sr.autoencoder import AUTOENCODER_DEFAULTS, Autoencoder, PatchDiscriminator
from femursr.sr.base import StepContext, count_parameters
from femursr.sr.data import PatchDataset, SubjectFiles
from femursr.sr.infer import load_generator, save_generator
from femursr.sr.latent import (
    VAE_DEFAULTS,
    build_vae,
    crop,
    decode_latent,
    encode_latent,
    load_vae_state,
    pad_to_multiple,
    pixel_unshuffle_condition,
    vae_factor,
)
from femursr.sr.ldm import LDM_DEFAULTS, LatentDiffusionSR
from femursr.sr.metrics import psnr
from femursr.sr.train import fit, seed_everything
from femursr.volume import Volume, write_volume

TINY_VAE = {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 4}
TINY_UNET = {"block_out_channels": [32, 32], "layers_per_block": 1, "attention_levels": [False, True], "attention_head_dim": 8, "norm_num_groups": 8}
TINY_DISC = {"features": 8, "layers": 2}


# tiny convolutions run faster on one thread than on two (OpenMP overhead)
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _pattern(n=2, size=32):
    """A smooth fixed HR patch (N, 1, size, size) in [0.2, 0.8], and an LR-like version of it."""
    y, x = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    hr = (0.5 + 0.3 * torch.sin(x / 3.0) * torch.cos(y / 4.0))[None, None].repeat(n, 1, 1, 1)
    return hr, 0.5 * hr + 0.25


def _tiny_ae(**params):
    return Autoencoder(1, {"network": TINY_VAE, "discriminator": TINY_DISC, **params})


def _tiny_ldm(in_channels=1, **params):
    return LatentDiffusionSR(in_channels, {"autoencoder_network": TINY_VAE, "network": TINY_UNET, **params})


def _save_ae(ae, path):
    return save_generator(ae, path, name="autoencoder", dims="2d", neighbours=0, params=ae.params)


@pytest.fixture(scope="module")
def trained_ae(tmp_path_factory):
    """A tiny autoencoder that reconstructs the pattern, and its weights file."""
    torch.manual_seed(0)
    ae = _tiny_ae(pretrain={"epochs": 1, "lr": 2e-3})
    hr, _ = _pattern(4)
    setup, ctx = ae.configure_phase("pretrain", 60), StepContext("cpu")
    for _ in range(60):
        ae.training_step("pretrain", hr, hr, setup, ctx)
    return ae.eval(), _save_ae(ae, tmp_path_factory.mktemp("ae") / "autoencoder.pt")


# ------------------------------------------------------------------ the latent space
def test_latent_grid_is_an_eighth_with_six_channels():
    torch.manual_seed(0)
    narrow = build_vae({"block_out_channels": [4, 4, 8, 8], "layers_per_block": 1, "norm_num_groups": 4})
    assert encode_latent(narrow, torch.rand(1, 1, 512, 512), 1.0).shape == (1, 6, 64, 64)  # the paper's 512 px slice
    vae = build_vae(TINY_VAE)
    assert vae_factor(vae) == 8
    assert encode_latent(vae, torch.rand(2, 1, 64, 40), 1.0).shape == (2, 6, 8, 5)
    assert decode_latent(vae, torch.randn(2, 6, 8, 5), 1.0).shape == (2, 1, 64, 40)
    # the paper's network: LDM kl-f8's shape, 6 latent channels, factor 8
    with torch.device("meta"):
        paper = build_vae(None)
    assert paper.config.latent_channels == 6 and vae_factor(paper) == 8 and list(paper.config.block_out_channels) == [128, 256, 512, 512]
    # another depth or an ill-fitting group norm is refused, naming the key
    with pytest.raises(ValueError, match="factor of 2\\^2 = 4.*give 4 levels"):
        build_vae({"block_out_channels": [8, 8, 16]})
    with pytest.raises(ValueError, match="norm_num_groups 32 does not divide"):
        build_vae({"block_out_channels": [8, 16, 16, 16]})
    with pytest.raises(ValueError, match="unknown key"):
        build_vae({"latent_channel": 4})


def test_padding_to_a_multiple_and_back():
    x = torch.rand(2, 3, 37, 53)
    for mode in ("replicate", "reflect"):
        xp, size = pad_to_multiple(x, 16, mode)
        assert xp.shape == (2, 3, 48, 64) and size == (37, 53)
        assert torch.equal(crop(xp, size), x)
    xp, _ = pad_to_multiple(x, 16)
    assert torch.equal(xp[..., 40, :53], x[..., 36, :])  # replicated edge
    same, size = pad_to_multiple(torch.rand(1, 1, 32, 48), 16)
    assert same.shape == (1, 1, 32, 48) and size == (32, 48)


@pytest.mark.parametrize("channels", [1, 5])
def test_pixel_unshuffle_condition_keeps_every_pixel(channels):
    lr = torch.rand(2, channels, 64, 40)
    c = pixel_unshuffle_condition(lr, 8)
    assert c.shape == (2, channels * 64, 8, 5)  # 2D: 64 channels; 2.5D: 5 x 64
    assert torch.equal(F.pixel_shuffle(c, 8), lr)
    # the centre slice's pixel (y, x) sits in channel (c * 8 + y % 8) * 8 + x % 8 at (y // 8, x // 8)
    k, y, x = channels // 2, 21, 13
    assert c[1, (k * 8 + y % 8) * 8 + x % 8, y // 8, x // 8] == lr[1, k, y, x]
    with pytest.raises(ValueError, match="not a multiple of 8"):
        pixel_unshuffle_condition(torch.rand(1, channels, 30, 40), 8)


def test_vae_weights_file_round_trip_and_errors(tmp_path):
    torch.manual_seed(1)
    ae = _tiny_ae()
    path = _save_ae(ae, tmp_path / "ae.pt")
    state = load_vae_state(path)
    want = ae.vae.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    # the LDM built with the same network takes them; its VAE then encodes as the autoencoder does
    ldm = _tiny_ldm()
    ldm.load_autoencoder(path)
    x = torch.rand(1, 1, 16, 16)
    assert torch.equal(encode_latent(ldm.vae, x, 1.0), encode_latent(ae.vae, x, 1.0))
    assert not any(p.requires_grad for p in ldm.vae.parameters())
    # the autoencoder's own file rebuilds it for inference
    back = load_generator(path, build=lambda name, dims, n, params, perceptual_weights=None: Autoencoder(1, params))
    assert torch.equal(back.predict(x), ae.eval().predict(x))
    # errors name the file and the fix
    with pytest.raises(FileNotFoundError, match="train the autoencoder first \\(rule train_autoencoder\\)"):
        load_vae_state(tmp_path / "missing.pt")
    other = save_generator(ldm, tmp_path / "ldm.pt", name="ldm", dims="2d", neighbours=0, params={})
    with pytest.raises(ValueError, match="ldm.pt: weights of model 'ldm', not of the autoencoder"):
        load_vae_state(other)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt: not a readable femursr weights file"):
        load_vae_state(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="ae.pt: the autoencoder's weights do not fit the VAE.*Retrain the autoencoder"):
        LatentDiffusionSR(1, {"autoencoder_network": {**TINY_VAE, "latent_channels": 4}, "network": TINY_UNET}).load_autoencoder(path)


# ------------------------------------------------------------------ the diffusion process
def test_forward_noising_has_the_closed_form_mean_and_variance():
    """q(z_t | z_0) = N(sqrt(abar_t) z_0, (1 - abar_t) I), with LDM-SR's betas (linear in
    sqrt(beta) from 0.0015 to 0.0155), measured on 40,000 draws."""
    m = _tiny_ldm()
    betas = np.linspace(0.0015**0.5, 0.0155**0.5, 1000) ** 2
    abar = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(m.alphas_cumprod().numpy(), abar, rtol=1e-5)
    torch.manual_seed(3)
    n = 40000
    z0 = torch.tensor([1.5, -0.7, 0.0, 2.0]).view(1, 4, 1, 1).expand(n, 4, 1, 1)
    for t in (0, 250, 600, 999):
        zt = m.q_sample(z0, torch.full((n,), t), torch.randn(n, 4, 1, 1))
        mean, var = zt.mean(0).flatten(), zt.var(0).flatten()
        se = (1.0 - abar[t]) ** 0.5 / n**0.5
        np.testing.assert_allclose(mean.numpy(), abar[t] ** 0.5 * z0[0].flatten().numpy(), atol=5 * se)
        np.testing.assert_allclose(var.numpy(), np.full(4, 1.0 - abar[t]), rtol=0.05)


def test_ddim_with_the_exact_noise_predictor_reaches_the_known_latent():
    """With eta 0 and the exact predictor of a fixed z0, eps(z_t) = (z_t - sqrt(abar_t) z0) /
    sqrt(1 - abar_t), DDIM keeps eps fixed at its first value e = (n - sqrt(abar_T) z0) /
    sqrt(1 - abar_T) (n: the initial noise, T the first DDIM timestep) and ends, as LDM's DDIM
    does, at the noise level of t = 0: sqrt(abar_0) z0 + sqrt(1 - abar_0) e."""
    from types import SimpleNamespace

    m = _tiny_ldm(sample_steps=30, eta=0.0)
    abar = m.alphas_cumprod().double()
    torch.manual_seed(4)
    z0 = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    seen = []

    def exact(x, t):
        seen.append(int(t))
        a = abar[int(t)]
        return SimpleNamespace(sample=((x[:, :6].double() - a.sqrt() * z0) / (1 - a).sqrt()).float())

    torch.manual_seed(11)
    n = torch.randn(2, 6, 3, 5).double()
    torch.manual_seed(11)
    z = m.sample_latent(torch.zeros(2, 64, 3, 5), net=exact).double()
    first = seen[0]
    e = (n - abar[first].sqrt() * z0) / (1 - abar[first]).sqrt()
    want = abar[0].sqrt() * z0 + (1 - abar[0]).sqrt() * e
    assert first == 1 + 33 * 29 and len(seen) == 30
    torch.testing.assert_close(z, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [7, 30])
def test_ddim_evaluates_the_unet_exactly_sample_steps_times(steps):
    torch.manual_seed(0)
    m = _tiny_ldm(sample_steps=steps, eta=0.5).eval()
    m.latent_scale.fill_(1.0)
    calls = []
    m.unet_ema.register_forward_hook(lambda mod, args, out: calls.append(int(args[1])))
    decoded = []
    m.vae.decoder.register_forward_hook(lambda *a: decoded.append(1))
    out = m.predict(torch.rand(2, 1, 40, 24))
    assert out.shape == (2, 1, 40, 24)
    assert len(calls) == steps and len(decoded) == 1
    k = 1000 // steps
    assert calls == [1 + k * i for i in reversed(range(steps))]  # LDM's uniform DDIM steps, offset 1
    assert m.network_evaluations() == {"unet": steps, "decoder": 1}


def test_scale_by_std_sets_the_latent_scale_from_the_first_batch():
    torch.manual_seed(0)
    m = _tiny_ldm()
    hr, lr = _pattern(4)
    torch.manual_seed(9)
    z = encode_latent(m.vae, hr, 1.0, sample=True)
    torch.manual_seed(9)
    setup = m.configure_phase("train", 4)
    m.training_step("train", lr, hr, setup, StepContext("cpu"))
    assert float(m.latent_scale) == pytest.approx(1.0 / z.flatten().std().item(), rel=1e-5)
    first = float(m.latent_scale)
    m.training_step("train", lr, 0.5 * hr, setup, StepContext("cpu"))
    assert float(m.latent_scale) == first  # set once
    with pytest.raises(ValueError, match="not a multiple of 16 px"):
        m.training_step("train", torch.rand(1, 1, 24, 24), torch.rand(1, 1, 24, 24), setup, StepContext("cpu"))
    with pytest.raises(RuntimeError, match="latent_scale is not set"):
        _tiny_ldm().predict(lr)


# ------------------------------------------------------------------ learning a fixed pair
def test_autoencoder_overfits_a_fixed_patch():
    torch.manual_seed(0)
    ae = _tiny_ae(pretrain={"epochs": 1, "lr": 2e-3}, gan={"epochs": 1, "lr": 1e-3})
    hr, _ = _pattern(2)
    ctx = StepContext("cpu")
    start = psnr(ae.eval().predict(hr), hr).mean().item()
    ae.train()
    setup = ae.configure_phase("pretrain", 60)
    losses = [ae.training_step("pretrain", hr, hr, setup, ctx) for _ in range(60)]
    after = psnr(ae.eval().predict(hr), hr).mean().item()
    print(f"autoencoder: PSNR {start:.1f} -> {after:.1f} dB in 60 steps")
    assert after > start + 10 and after > 28
    assert losses[-1]["l_rec"] < 0.1 * losses[0]["l_rec"]
    assert 0 < losses[-1]["l_kl"] < 1e-5  # KL on, weighted by 1e-6
    # the adversarial phase runs both networks and keeps the reconstruction
    ae.train()
    setup = ae.configure_phase("gan", 10)
    out = [ae.training_step("gan", hr, hr, setup, ctx) for _ in range(10)][-1]
    assert {"l_rec", "l_kl", "l_g_gan", "gan_weight", "l_d", "out_d_real", "out_d_fake"} <= set(out)
    assert out["gan_weight"] > 0
    assert psnr(ae.eval().predict(hr), hr).mean().item() > after - 3
    rec = ae.record()
    assert rec["perceptual"] == {"on": False, "weights": None, "why_off": "no VGG19 weights file given"}
    assert rec["latent"]["of_512_px"] == [6, 64, 64]


def test_ldm_overfits_a_fixed_pair(trained_ae):
    """300 steps on one (LR, HR) pair: the noise-prediction loss falls, and a DDIM sample from
    noise lands near the HR's latent and image, far nearer than the noise it started from. The
    sampler runs with eta 1 (DDIM's stochastic end): with eta 0, the errors of a model trained
    for seconds at the noisiest steps drift the deterministic path off the data."""
    ae, path = trained_ae
    hr, lr = _pattern(16)
    torch.manual_seed(0)
    m = _tiny_ldm(lr=5e-3, sample_steps=10, eta=1.0, ema_decay=0.0)
    m.load_autoencoder(path)
    setup, ctx = m.configure_phase("train", 300), StepContext("cpu")
    losses = []
    m.train()
    for _ in range(300):
        losses.append(m.training_step("train", lr, hr, setup, ctx)["l_eps"])
        m.on_step_end("train")
    first, last = np.mean(losses[:30]), np.mean(losses[-30:])
    m.eval()
    hr, lr = hr[:4], lr[:4]
    torch.manual_seed(5)
    z = m.sample_latent(m.condition(lr))
    sample = m.predict(lr)
    torch.manual_seed(5)
    noise = torch.randn(4, 6, 4, 4)  # the initial noise of the DDIM sample above
    z_hr = encode_latent(m.vae, hr, m.latent_scale)
    decoded_noise = decode_latent(m.vae, noise, m.latent_scale).clamp(0, 1)
    lat_sample, lat_noise = F.mse_loss(z, z_hr).item(), F.mse_loss(noise, z_hr).item()
    img_sample, img_noise = F.mse_loss(sample, hr).item(), F.mse_loss(decoded_noise, hr).item()
    print(f"ldm: eps loss {first:.3f} -> {last:.3f}; MSE to the HR latent: sample {lat_sample:.3f}, noise {lat_noise:.3f}; "
          f"to the HR image: sample {img_sample:.5f}, decoded noise {img_noise:.5f}")
    assert last < 0.5 * first
    assert lat_sample < 0.4 * lat_noise
    assert img_sample < 0.25 * img_noise


@pytest.mark.parametrize("in_channels", [1, 5])
def test_predict_keeps_any_slice_size(trained_ae, in_channels):
    ae, path = trained_ae
    x = torch.rand(2, in_channels, 37, 53)
    torch.manual_seed(0)
    m = _tiny_ldm(in_channels, sample_steps=3).eval()
    m.load_autoencoder(path)
    m.latent_scale.fill_(0.8)
    out = m.predict(x)
    assert out.shape == (2, 1, 37, 53) and 0 <= out.min() and out.max() <= 1
    assert m.unet.config.in_channels == 6 + 64 * in_channels
    torch.manual_seed(1)
    a = m.predict(x)
    torch.manual_seed(1)
    assert torch.equal(a, m.predict(x)) and not torch.equal(a, out)  # seeded, and stochastic
    rec = ae.predict(x[:, :1])
    assert rec.shape == (2, 1, 37, 53) and 0 <= rec.min() and rec.max() <= 1


# ------------------------------------------------------------------ through the machinery
SHAPE = (6, 40, 48)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    files = []
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    mask = ((z - 3) / 3.5) ** 2 + ((y - 20) / 15) ** 2 + ((x - 24) / 18) ** 2 <= 1
    for i in range(3):
        rng = np.random.default_rng(i)
        hr = np.clip(0.5 + 0.3 * np.sin(x / 2.0 + i) * np.cos(y / 3.0) + 0.05 * rng.standard_normal(SHAPE), 0, 1)
        lr = np.clip(0.5 * hr + 0.25 + 0.05 * rng.standard_normal(SHAPE), 0, 1)
        d = root / f"T{i}"
        f = SubjectFiles(f"T{i}", str(d / "lr.nii"), str(d / "hr.nii"), str(d / "femur.nii.gz"))
        geo = dict(spacing=(0.2, 0.2, 0.3), origin=(0.0, 0.0, 0.0))
        write_volume(Volume((lr * mask).astype(np.float32), **geo), f.lr)
        write_volume(Volume((hr * mask).astype(np.float32), **geo), f.hr)
        write_volume(Volume(mask.astype(np.uint8), **geo), f.mask)
        files.append(f)
    return files


class Kill(Exception):
    pass


def _run(make, cohort, neighbours, run_dir, kill_at=None):
    seed_everything(7)
    model = make()
    train = PatchDataset(cohort[:2], 16, neighbours, seed=1)
    val = PatchDataset(cohort[2:], 16, neighbours, seed=1, stream="validation", augment=False)

    def cb(pos):
        if pos.global_step == kill_at:
            raise Kill(kill_at)

    res = fit(
        model, train, val, run_dir, config={"test": model.name}, batch_size=2, samples_per_epoch=4, validation_samples=2,
        device="cpu", checkpoint_every_steps=3, log_every_steps=1, tensorboard=False, progress=False, callback=cb,
    )  # fmt: skip
    return model, res


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def test_autoencoder_killed_and_resumed_ends_as_an_uninterrupted_run(cohort, tmp_path):
    def make():
        return _tiny_ae(pretrain={"epochs": 2, "lr": 1e-3}, gan={"epochs": 2, "lr": 1e-3})

    ref, res = _run(make, cohort, 0, tmp_path / "ref")
    assert res.global_step == 8 and set(res.validation) == {"psnr", "ssim"}
    run = tmp_path / "killed"
    for step in (4, 7):  # in the pre-training (checkpoint at step 3) and in the GAN phase (step 6)
        with pytest.raises(Kill):
            _run(make, cohort, 0, run, kill_at=step)
    model, res = _run(make, cohort, 0, run)
    assert res.resumed_from == 6 and res.global_step == 8
    diff = _same_weights(ref, model)
    print(f"autoencoder kill-and-resume: max abs weight difference {diff:.3g}")
    assert diff < 1e-6
    assert any(k.startswith("discriminator.") for k in ref.state_dict())


def test_ldm_killed_and_resumed_ends_as_an_uninterrupted_run(cohort, trained_ae, tmp_path):
    _, path = trained_ae

    def make():
        m = _tiny_ldm(3, epochs=3, lr=1e-3, sample_steps=4, ema_decay=0.9)
        m.load_autoencoder(path)
        return m

    ref, res = _run(make, cohort, 1, tmp_path / "ref")
    assert res.global_step == 6 and set(res.validation) == {"psnr", "ssim"}
    assert float(ref.latent_scale) > 0
    run = tmp_path / "killed"
    with pytest.raises(Kill):
        _run(make, cohort, 1, run, kill_at=5)
    model, res = _run(make, cohort, 1, run)
    assert res.resumed_from == 4 and res.global_step == 6
    diff = _same_weights(ref, model)
    print(f"ldm kill-and-resume: max abs weight difference {diff:.3g}")
    assert diff < 1e-6
    assert float(model.latent_scale) == float(ref.latent_scale) and int(model.ema_steps) == 6
    # the inference file holds the VAE, the EMA U-Net and the latent scale, and rebuilds the model
    out = save_generator(model, tmp_path / "ldm.pt", name="ldm", dims="25d", neighbours=1, params={**model.params, "autoencoder_network": TINY_VAE})
    keys = torch.load(out, weights_only=True)["state_dict"].keys()
    assert {k.split(".")[0] for k in keys} == {"vae", "unet_ema", "latent_scale"}
    back = load_generator(out, build=lambda name, dims, n, params, perceptual_weights=None: LatentDiffusionSR(2 * n + 1, params))
    x = torch.rand(1, 3, 20, 30)
    torch.manual_seed(2)
    a = back.predict(x)
    torch.manual_seed(2)
    assert torch.equal(a, model.eval().predict(x))


# ------------------------------------------------------------------ config and sizes
def test_schema_defaults_are_the_code_defaults_and_the_paper_settings():
    from snakemake.utils import validate

    from conftest import SCHEMA, load_config

    cfg = {"cohort": "synthetic"}
    validate(cfg, str(SCHEMA))
    assert cfg["models"]["autoencoder"] == AUTOENCODER_DEFAULTS
    assert cfg["models"]["ldm"] == LDM_DEFAULTS
    assert AUTOENCODER_DEFAULTS["network"] == VAE_DEFAULTS
    paper = load_config("paper.yaml")["models"]
    a, l = paper["autoencoder"], paper["ldm"]
    assert (a["pretrain"]["epochs"], a["gan"]["epochs"], a["gan"]["lr"]) == (75, 75, 4.5e-5)
    assert a["network"] == VAE_DEFAULTS and a["loss"]["reconstruction"] == "mse" and a["loss"]["kl_weight"] == 1e-6
    assert (l["epochs"], l["lr"], l["train_timesteps"], l["sample_steps"], l["eta"]) == (100, 1e-5, 1000, 30, 0.0)
    assert l["network"] == LDM_DEFAULTS["network"] and l["autoencoder"] == "autoencoder"
    demo = load_config()
    assert demo["training"]["patch_size_px"] % (8 * 2 ** (len(demo["models"]["ldm"]["network"]["block_out_channels"]) - 1)) == 0


def test_paper_parameter_counts():
    """The paper's networks, counted on the meta device, against hand-derived sizes."""
    with torch.device("meta"):
        ae = Autoencoder(1, {})
        ldm2, ldm25 = LatentDiffusionSR(1, {}), LatentDiffusionSR(5, {})
    counts = {
        "VAE (kl-f8 shape, 1 ch, 6 latent)": count_parameters(ae.vae),
        "patch discriminator (64 f, 3 layers)": count_parameters(ae.discriminator),
        "LDM U-Net 2D (70 in)": count_parameters(ldm2.unet),
        "LDM U-Net 2.5D (326 in)": count_parameters(ldm25.unet),
    }
    for k, v in counts.items():
        print(f"{k}: {v:,}")
    # LDM's kl-f8 autoencoder (3 channels, 4 latent) has 83,653,863 parameters; one image channel
    # and 6 latent channels change conv_in (-2,304), conv_out (-2,306), the encoder's output conv
    # (+18,436), quant_conv (+84), post_quant_conv (+22) and the decoder's conv_in (+9,216)
    assert counts["VAE (kl-f8 shape, 1 ch, 6 latent)"] == 83_653_863 - 2_304 - 2_306 + 18_436 + 84 + 22 + 9_216
    # 1*64*16 + 64, then 64->128, 128->256 (stride 2), 256->512 (stride 1) 4x4 without bias + BN,
    # then 512->1 4x4 with bias
    f = 64
    assert counts["patch discriminator (64 f, 3 layers)"] == (16 * f + f) + sum(16 * a * b + 2 * b for a, b in ((f, 2 * f), (2 * f, 4 * f), (4 * f, 8 * f))) + 16 * 8 * f + 1
    # 2.5D differs only in conv_in: 4 more slices x 64 channels into 160 features, 3 x 3
    assert counts["LDM U-Net 2.5D (326 in)"] - counts["LDM U-Net 2D (70 in)"] == 4 * 64 * 160 * 9
    assert 100e6 < counts["LDM U-Net 2D (70 in)"] < 130e6
    assert ldm2.network_evaluations() == {"unet": 30, "decoder": 1}
    assert isinstance(ae.discriminator, PatchDiscriminator)
