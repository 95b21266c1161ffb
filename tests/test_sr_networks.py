"""SRGAN and Real-ESRGAN+: networks, losses, training steps, EMA, USM, parameter counts (issue 4).

All on the CPU with small networks (one thread), except the parameter counts, which build the
paper's networks without running them; the last tests run each model through the shared
training loop (femursr.sr.train.fit), killed and resumed. `pytest -s -k parameter_counts`
prints the paper's counts.
"""

import copy
import logging

import numpy as np
import pytest
import torch
from scipy import ndimage

from femursr.sr.base import StepContext, count_parameters, ema_update
from femursr.sr.gan import REALESRGAN_DEFAULTS, SRGAN_DEFAULTS, RealESRGANPlus, SRGAN
from femursr.sr.losses import GANLoss, PerceptualLoss, gaussian_kernel1d, usm_sharpen
from femursr.sr.networks import RRDBNet, SRResNet, UNetDiscriminatorSN, VGGDiscriminator
from femursr.sr.registry import build_model

from conftest import load_config

CPU = StepContext(torch.device("cpu"))
PATCH = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks run fastest on one thread, and do not stall when other jobs share the CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_params(model: str, **over) -> dict:
    """A few-thousand-parameter version of a model's config block."""
    if model == "srgan":
        p = {"network": {"generator": {"features": 8, "n_blocks": 2, "n_extra_blocks": 1},
                         "discriminator": {"features": 8, "patch_size": PATCH}}}  # fmt: skip
    else:
        p = {"network": {"generator": {"features": 8, "growth": 4, "n_blocks": 1, "n_extra_blocks": 1},
                         "discriminator": {"features": 8}}}  # fmt: skip
    p.update(over)
    return p


MODELS = {"srgan": SRGAN, "realesrgan": RealESRGANPlus}


def patch_pair(channels=1, size=PATCH, batch=2, seed=0):
    """A fixed LR/HR pair: HR = smoothed random structure in [0, 1], LR = a blurred, noisy copy
    (2.5D: the neighbours are shifted copies)."""
    g = np.random.default_rng(seed)
    hr = ndimage.gaussian_filter(g.random((batch, size, size)), (0, 1.0, 1.0))
    hr = (hr - hr.min()) / (hr.max() - hr.min())
    lr = ndimage.gaussian_filter(hr, (0, 1.5, 1.5)) + 0.02 * g.standard_normal(hr.shape)
    lrs = np.stack([np.roll(lr, k - channels // 2, axis=1) for k in range(channels)], axis=1)
    return torch.tensor(lrs, dtype=torch.float32), torch.tensor(hr[:, None], dtype=torch.float32)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module, keys=None):
    after = module.state_dict()
    return {k: not torch.equal(before[k], after[k]) for k in (keys or before)}


# ------------------------------------------------------------------ shapes
@pytest.mark.parametrize("channels", [1, 5])
@pytest.mark.parametrize("hw", [(64, 64), (37, 50), (48, 20), (6, 9)])
@pytest.mark.parametrize("net", ["srresnet", "rrdbnet"])
def test_generators_keep_the_size(net, channels, hw):
    torch.manual_seed(0)
    if net == "srresnet":
        g = SRResNet(channels, features=8, n_blocks=1, n_extra_blocks=1)
    else:
        g = RRDBNet(channels, features=8, growth=4, n_blocks=1, n_extra_blocks=0)
    y = g(torch.rand(2, channels, *hw))
    assert y.shape == (2, 1, *hw)
    assert torch.isfinite(y).all()


def test_srresnet_global_skip_is_the_centre_slice():
    """With the last conv zeroed the generator returns its input's centre channel exactly."""
    g = SRResNet(5, features=8, n_blocks=1, n_extra_blocks=1)
    torch.nn.init.zeros_(g.tail.weight)
    torch.nn.init.zeros_(g.tail.bias)
    x = torch.rand(3, 5, 21, 17)
    torch.testing.assert_close(g.eval()(x), x[:, 2:3], rtol=0, atol=0)


def test_rrdbnet_pads_and_crops():
    """An odd-sized input gives the top-left crop of the output on its reflect-padded version
    (the body sees the same pixels), and no pixel of a multiple-of-4 input is padded."""
    torch.manual_seed(0)
    g = RRDBNet(1, features=8, growth=4, n_blocks=1, n_extra_blocks=0).eval()
    x = torch.rand(1, 1, 37, 50)
    padded = torch.nn.functional.pad(x, (0, 2, 0, 3), mode="reflect")  # to 40 x 52
    torch.testing.assert_close(g(x), g(padded)[..., :37, :50])
    assert g.body(torch.zeros(1, 8, 2, 2)).shape == (1, 8, 2, 2)


@pytest.mark.parametrize("size", [64, 512, 100])
def test_vgg_discriminator_one_logit_per_patch(size):
    d = VGGDiscriminator(1, features=4, patch_size=size)
    assert d.n_stages == int(np.ceil(np.log2(size / 4)))
    out = d(torch.rand(2, 1, size, size))
    assert out.shape == (2, 1)
    with pytest.raises(ValueError, match=f"built for {size} px"):
        d(torch.rand(2, 1, 2 ** (d.n_stages - 1), 2 ** (d.n_stages - 1)))


@pytest.mark.parametrize("hw", [(64, 64), (512, 512), (37, 50)])
def test_unet_discriminator_one_logit_per_pixel(hw):
    d = UNetDiscriminatorSN(1, features=4)
    assert d(torch.rand(2, 1, *hw)).shape == (2, 1, *hw)


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("channels", [1, 5])
@pytest.mark.parametrize("model", ["srgan", "realesrgan"])
def test_generator_overfits_a_patch_pair(model, channels):
    """Pre-training (the model's own pixel loss and Adam) on one fixed pair: the loss falls by an
    order of magnitude within a few hundred steps."""
    torch.manual_seed(0)
    params = small_params(model, pretrain={"epochs": 1, "lr": 2e-3, "scheduler": "constant"})
    if model == "realesrgan":
        params["network"]["generator"].update(features=16, growth=8, n_blocks=1, n_extra_blocks=0)
    m = MODELS[model](channels, params)
    lr, hr = patch_pair(channels)
    setup = m.configure_phase("pretrain", 500)
    m.train()
    first = m.training_step("pretrain", lr, hr, setup, CPU)["l_pix"]
    best = first
    for step in range(500):
        best = min(best, m.training_step("pretrain", lr, hr, setup, CPU)["l_pix"])
        if best < first / 10:
            break
    assert best < first / 10, f"{model} {channels}ch: pixel loss {first:.4g} -> {best:.4g} in {step + 1} steps"


@pytest.mark.parametrize("model", ["srgan", "realesrgan"])
def test_pretrain_step_updates_only_the_generator(model):
    torch.manual_seed(0)
    m = MODELS[model](1, small_params(model)).train()
    setup = m.configure_phase("pretrain", 10)
    assert set(setup.optimizers) == {"generator"}
    g0, d0, e0 = snapshot(m.generator), snapshot(m.discriminator), snapshot(m.generator_ema)
    losses = m.training_step("pretrain", *patch_pair(), setup, CPU)
    assert set(losses) == {"l_pix"} and np.isfinite(losses["l_pix"])
    trainable = [k for k, _ in m.generator.named_parameters()]
    assert all(changed(g0, m.generator, trainable).values())
    assert not any(changed(d0, m.discriminator).values())  # weights, BN statistics, SN vectors
    assert not any(changed(e0, m.generator_ema).values())  # the EMA moves in on_step_end only
    m.on_step_end("pretrain")
    assert any(changed(e0, m.generator_ema).values())


@pytest.mark.parametrize("model", ["srgan", "realesrgan"])
def test_gan_step_updates_generator_and_discriminator(model):
    torch.manual_seed(0)
    m = MODELS[model](1, small_params(model)).train()
    setup = m.configure_phase("gan", 10)
    assert set(setup.optimizers) == {"generator", "discriminator"}
    g0, d0, e0 = snapshot(m.generator), snapshot(m.discriminator), snapshot(m.generator_ema)
    losses = m.training_step("gan", *patch_pair(), setup, CPU)
    assert {"l_pix", "l_g_gan", "l_d_real", "l_d_fake"} <= set(losses)
    assert "l_percep" not in losses  # no VGG19 weights given
    assert all(np.isfinite(v) for v in losses.values())
    assert all(changed(g0, m.generator, [k for k, _ in m.generator.named_parameters()]).values())
    assert all(changed(d0, m.discriminator, [k for k, _ in m.discriminator.named_parameters()]).values())
    assert all(p.requires_grad for p in m.discriminator.parameters())  # unfrozen after the G step
    assert not any(changed(e0, m.generator_ema).values())


def test_srgan_refuses_patches_its_discriminator_was_not_built_for():
    m = SRGAN(1, small_params("srgan"))
    setup = m.configure_phase("pretrain", 10)
    with pytest.raises(ValueError, match="models.srgan.network.discriminator.patch_size"):
        m.training_step("pretrain", *patch_pair(size=PATCH * 2), setup, CPU)


def test_schedules_follow_the_config():
    m = SRGAN(1, small_params("srgan"))
    setup = m.configure_phase("pretrain", 80)
    opt, sched = setup.optimizers["generator"], setup.schedulers["generator"]
    assert opt.defaults["betas"] == (0.9, 0.99)
    rates = []
    for _ in range(80):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # milestones 1/8, 1/4, 1/2, 3/4 of 80 iterations, gamma 0.5
    expected = [1e-4 * 0.5 ** sum(i >= s for s in (10, 20, 40, 60)) for i in range(80)]
    np.testing.assert_allclose(rates, expected, rtol=1e-12)
    gan = m.configure_phase("gan", 80)
    assert gan.optimizers["discriminator"].param_groups[0]["lr"] == 1e-6
    assert gan.optimizers["generator"].param_groups[0]["lr"] == 1e-4

    r = RealESRGANPlus(1, small_params("realesrgan"))
    setup = r.configure_phase("pretrain", 50)
    opt, sched = setup.optimizers["generator"], setup.schedulers["generator"]
    for _ in range(50):
        assert opt.param_groups[0]["lr"] == 2e-4
        opt.step()
        sched.step()
    assert r.configure_phase("gan", 50).optimizers["discriminator"].param_groups[0]["lr"] == 1e-4
    # partial phase blocks: keys left out take the defaults; a bare gan lr sets both rates
    m = SRGAN(1, small_params("srgan", pretrain={"epochs": 3}, gan={"epochs": 0, "lr": 3e-5}))
    assert [(ph.name, ph.epochs) for ph in m.phases()] == [("pretrain", 3), ("gan", 0)]
    pre = m.configure_phase("pretrain", 8)
    assert pre.optimizers["generator"].param_groups[0]["lr"] == 1e-4 and pre.schedulers["generator"].milestones
    gan = m.configure_phase("gan", 8)
    assert {n: o.param_groups[0]["lr"] for n, o in gan.optimizers.items()} == {"generator": 3e-5, "discriminator": 3e-5}


# ------------------------------------------------------------------ EMA and prediction
def test_ema_update_math():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    ema = copy.deepcopy(model)
    e0 = [p.detach().clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema_update(ema, model, 0.9)
    for pe, pm, p0 in zip(ema.parameters(), model.parameters(), e0):
        torch.testing.assert_close(pe, 0.9 * p0 + 0.1 * pm)
    torch.testing.assert_close(ema[1].running_mean, torch.full((2,), 3.0))


def test_model_ema_with_and_without_warmup():
    torch.manual_seed(0)
    m = SRGAN(1, small_params("srgan", ema_decay=0.99, ema_warmup=True))
    decays = []
    for _ in range(3):
        with torch.no_grad():
            for p in m.generator.parameters():
                p.add_(0.5)
        e0 = [p.detach().clone() for p in m.generator_ema.parameters()]
        d = m.current_ema_decay()
        decays.append(d)
        m.on_step_end("pretrain")
        for pe, pm, p0 in zip(m.generator_ema.parameters(), m.generator.parameters(), e0):
            torch.testing.assert_close(pe, d * p0 + (1 - d) * pm)
    np.testing.assert_allclose(decays, [1 / 10, 2 / 11, 3 / 12])
    m.ema_steps.fill_(10_000)
    assert m.current_ema_decay() == 0.99
    assert SRGAN(1, small_params("srgan")).current_ema_decay() == 0.999  # the references' fixed decay


def test_predict_uses_the_ema_in_eval_mode_for_whole_slices():
    torch.manual_seed(0)
    m = SRGAN(5, small_params("srgan")).train()
    setup = m.configure_phase("pretrain", 10)
    for _ in range(3):
        m.training_step("pretrain", *patch_pair(5), setup, CPU)
        m.on_step_end("pretrain")
    x = torch.rand(2, 5, 41, 67)
    y = m.predict(x)
    assert y.shape == (2, 1, 41, 67) and float(y.min()) >= 0 and float(y.max()) <= 1
    assert m.generator_ema.training  # mode restored
    with torch.no_grad():
        expected = copy.deepcopy(m.generator_ema).eval()(x).clamp(0, 1)
        trained = copy.deepcopy(m.generator).eval()(x).clamp(0, 1)
    torch.testing.assert_close(y, expected)
    assert not torch.allclose(y, trained)
    assert m.inference_modules == ("generator_ema",)
    assert SRGAN(1, small_params("srgan", ema_decay=0)).inference_modules == ("generator",)


@pytest.mark.parametrize("model", ["srgan", "realesrgan"])
def test_state_dict_round_trip_and_registry(model):
    torch.manual_seed(0)
    params = small_params(model)
    a = build_model(model, "25d", 2, params)
    assert a.in_channels == 5 and a.name == model
    setup = a.configure_phase("gan", 10)
    a.training_step("gan", *patch_pair(5), setup, CPU)
    a.on_step_end("gan")
    b = build_model(model, "25d", 2, params)
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 5, 30, 45)
    torch.testing.assert_close(a.predict(x), b.predict(x))
    rec = a.record()
    assert rec["parameters"]["generator"] == count_parameters(a.generator) > 0
    assert rec["parameters"]["discriminator"] == count_parameters(a.discriminator) > 0
    assert rec["perceptual"]["on"] is False and rec["perceptual"]["why_off"] == "no VGG19 weights file given"


# ------------------------------------------------------------------ losses
def _usm_reference_255(img255: np.ndarray, radius=51, weight=0.5, threshold=10.0) -> np.ndarray:
    """USM of an 8-bit-scale image as Real-ESRGAN defines it (OpenCV Gaussian with its default
    mirrored border and sigma rule, threshold in grey levels), in numpy/scipy."""
    sigma = 0.3 * ((radius - 1) * 0.5 - 1) + 0.8
    x = np.arange(radius) - (radius - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()

    def blur(a):
        return ndimage.correlate1d(ndimage.correlate1d(a, k, axis=0, mode="mirror"), k, axis=1, mode="mirror")

    residual = img255 - blur(img255)
    mask = (np.abs(residual) > threshold).astype(np.float64)
    soft = blur(mask)
    sharp = np.clip(img255 + weight * residual, 0, 255)
    return soft * sharp + (1 - soft) * img255


def test_usm_threshold_on_unit_images_equals_the_8bit_definition():
    g = np.random.default_rng(3)
    img = ndimage.gaussian_filter(g.random((70, 90)), 2.0)
    img = 0.2 + 0.6 * (img - img.min()) / (img.max() - img.min())
    ours = usm_sharpen(torch.tensor(img[None, None], dtype=torch.float64))[0, 0].numpy()
    ref = _usm_reference_255(img * 255.0) / 255.0
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    # the same function on the 0-255 scale agrees
    ours255 = usm_sharpen(torch.tensor(img[None, None] * 255.0), value_range=255.0)[0, 0].numpy()
    np.testing.assert_allclose(ours255, ref * 255.0, atol=1e-7)


def test_usm_sharpens_only_edges_above_the_threshold():
    """Two step edges far apart: 3 grey levels (residual below 10 of 255) stays exactly as it is;
    60 grey levels (above) is sharpened. Read on [0, 1] without the /255 the threshold would
    never be reached and nothing would change."""
    img = np.full((40, 240), 0.3)
    img[:, 60:] += 3 / 255  # weak edge at x = 60
    img[:, 180:] += 60 / 255  # strong edge at x = 180
    out = usm_sharpen(torch.tensor(img[None, None]))[0, 0].numpy()
    weak, strong = slice(40, 81), slice(160, 201)
    assert np.array_equal(out[:, weak], img[:, weak])
    assert np.abs(out[:, strong] - img[:, strong]).max() > 5 / 255
    assert out[:, 181].mean() > img[:, 181].mean() and out[:, 178].mean() < img[:, 178].mean()  # overshoot


def test_gaussian_kernel_follows_opencv_sigma_rule():
    k = gaussian_kernel1d(51).numpy()  # OpenCV: sigma = 0.3 * ((51 - 1) / 2 - 1) + 0.8 = 8
    assert abs(k[25 + 8] / k[25] - np.exp(-0.5)) < 1e-12 and abs(k[25 - 16] / k[25] - np.exp(-2)) < 1e-12
    assert abs(k.sum() - 1) < 1e-12
    k = gaussian_kernel1d(21, sigma=2.0).numpy()
    assert abs(k[10 + 2] / k[10] - np.exp(-0.5)) < 1e-12


def test_gan_loss_is_bce_with_logits():
    logits = torch.tensor([[-2.0], [0.0], [3.0]])
    bce = GANLoss("vanilla")
    torch.testing.assert_close(bce(logits, True), torch.log1p(torch.exp(-logits)).mean())
    torch.testing.assert_close(bce(logits, False), torch.log1p(torch.exp(logits)).mean())
    assert float(GANLoss("lsgan")(torch.ones(4), True)) == 0.0


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A torchvision-format VGG19 state dict (random weights: ImageNet weights are not
    downloaded), as a full file and as its features only."""
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.vgg19(weights=None).state_dict()
    d = tmp_path_factory.mktemp("vgg")
    torch.save(state, d / "vgg19_full.pth")
    feats = {k: v for k, v in state.items() if k.startswith("features.")}
    torch.save(feats, d / "vgg19_features.pth")
    return d / "vgg19_full.pth", d / "vgg19_features.pth", feats


def test_perceptual_loss_from_a_weights_file(vgg_file):
    full, feats_only, feats = vgg_file
    x = torch.rand(2, 1, 32, 32)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    for path in (full, feats_only):
        pl = PerceptualLoss(path, {"conv1_2": 0.1, "conv2_2": 1.0})
        assert pl.enabled
        assert float(pl(x, x)) == 0.0
        assert float(pl(x, y)) > 0.0
        assert pl.state_dict() == {} and count_parameters(pl) == 0  # frozen, not checkpointed
    # the features are torchvision's: conv1_1 of the file applied to the normalized RGB copy
    xr = (x.expand(-1, 3, -1, -1) - pl.mean) / pl.std
    ref = torch.nn.functional.conv2d(xr, feats["features.0.weight"], feats["features.0.bias"], padding=1)
    torch.testing.assert_close(pl._vgg[0][0](xr), ref)
    xg = x.clone().requires_grad_(True)
    pl(xg, y).backward()
    assert xg.grad.abs().sum() > 0


def test_perceptual_loss_off_without_weights(caplog):
    caplog.set_level(logging.WARNING, logger="femursr.sr.losses")
    pl = PerceptualLoss(None)
    x = torch.rand(1, 1, 16, 16)
    assert not pl.enabled
    assert float(pl(x, 1 - x)) == 0.0 and float(pl(x, x)) == 0.0
    assert len([r for r in caplog.records if "perceptual loss is off" in r.getMessage()]) == 1


def test_perceptual_loss_names_a_missing_or_wrong_file(tmp_path, vgg_file):
    missing = tmp_path / "nowhere" / "vgg19.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/vgg19.pth"):
        PerceptualLoss(missing)
    with pytest.raises(FileNotFoundError, match="nowhere/vgg19.pth"):
        SRGAN(1, small_params("srgan"), perceptual_weights=str(missing))
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(ValueError, match="notes.pth: not a readable"):
        PerceptualLoss(text)
    feats = dict(vgg_file[2])
    short = tmp_path / "vgg16ish.pth"
    torch.save({k: v for k, v in feats.items() if not k.startswith("features.34.")}, short)
    with pytest.raises(ValueError, match=r"vgg16ish.pth: not a torchvision VGG19 state dict: missing features.\{34.bias"):
        PerceptualLoss(short)
    wrong = tmp_path / "wrong.pth"
    torch.save({**feats, "features.0.weight": torch.zeros(64, 1, 3, 3)}, wrong)
    with pytest.raises(ValueError, match=r"wrong.pth: .*wrong shapes at features.\{0.weight"):
        PerceptualLoss(wrong)
    with pytest.raises(ValueError, match="unknown VGG19 layers"):
        PerceptualLoss(vgg_file[1], {"conv6_1": 1.0})


@pytest.mark.parametrize("model", ["srgan", "realesrgan"])
def test_gan_step_with_the_perceptual_term(model, vgg_file):
    torch.manual_seed(0)
    params = small_params(model, loss={"perceptual_layers": {"conv1_2": 1.0}})
    m = MODELS[model](1, params, perceptual_weights=str(vgg_file[1]))
    assert m.record()["perceptual"] == {"on": True, "weights": str(vgg_file[1]), "why_off": None}
    assert not any("perceptual" in k for k in m.state_dict())
    losses = m.training_step("gan", *patch_pair(), m.configure_phase("gan", 10), CPU)
    assert losses["l_percep"] > 0
    off = MODELS[model](1, small_params(model, loss={"perceptual_weight": 0}), perceptual_weights=str(vgg_file[1]))
    assert off.record()["perceptual"]["why_off"] == "loss.perceptual_weight is 0"


def test_realesrgan_targets_are_sharpened_for_pixel_and_perceptual_only():
    m = RealESRGANPlus(1, small_params("realesrgan"))
    _, hr = patch_pair(size=64)
    t = m.targets(hr)
    torch.testing.assert_close(t["pixel"], usm_sharpen(hr))
    assert t["perceptual"] is t["pixel"] and t["gan"] is hr
    assert not torch.equal(t["pixel"], hr)


# ------------------------------------------------------------------ config and parameter counts
def test_schema_defaults_are_the_code_defaults_and_the_paper_networks():
    cfg = {"cohort": "synthetic"}
    from snakemake.utils import validate

    from conftest import SCHEMA

    validate(cfg, str(SCHEMA))
    assert cfg["models"]["srgan"] == SRGAN_DEFAULTS
    assert cfg["models"]["realesrgan"] == REALESRGAN_DEFAULTS
    paper = load_config("paper.yaml")
    for name in ("srgan", "realesrgan"):
        assert paper["models"][name]["network"] == cfg["models"][name]["network"]
        assert paper["models"][name]["ema_decay"] == 0.999 and not paper["models"][name]["ema_warmup"]
    assert paper["models"]["srgan"]["loss"]["gan_weight"] == 1e-3
    l = paper["models"]["realesrgan"]["loss"]
    assert (l["pixel"], l["pixel_weight"], l["perceptual_weight"], l["gan_weight"]) == ("l1", 1.0, 1.0, 0.1)
    for c in (load_config(), paper):
        assert c["models"]["srgan"]["network"]["discriminator"]["patch_size"] == c["training"]["patch_size_px"]


def test_paper_parameter_counts():
    """The paper's networks, counted, against hand-derived sizes and the reference models."""
    counts = {
        "SRGAN generator 2D (SRResNet 16+4, 64 f)": count_parameters(SRResNet(1)),
        "SRGAN generator 2.5D": count_parameters(SRResNet(5)),
        "SRGAN discriminator (VGG, 512 px)": count_parameters(VGGDiscriminator(1, 64, 512)),
        "Real-ESRGAN+ generator 2D (RRDBNet 23+3, 64/32)": count_parameters(RRDBNet(1)),
        "Real-ESRGAN+ generator 2.5D": count_parameters(RRDBNet(5)),
        "Real-ESRGAN+ discriminator (U-Net SN)": count_parameters(UNetDiscriminatorSN(1)),
    }
    for k, v in counts.items():
        print(f"{k}: {v:,}")
    c = list(counts.values())
    # SRResNet: conv9 (C->64) + PReLU; 20 x [2 conv3 64->64, 2 BN, PReLU]; conv3 + BN; conv9 (64->1)
    block = 2 * 9 * 64 * 64 + 2 * 2 * 64 + 1
    for ch, n in ((1, c[0]), (5, c[1])):
        assert n == (81 * ch * 64 + 64 + 1) + 20 * block + (9 * 64 * 64 + 2 * 64) + (81 * 64 + 1)
    assert 1.4e6 < c[0] < 1.7e6  # SRGAN's generator is ~1.5 M; 4 more blocks, no upsampling convs
    # VGG discriminator: BasicSR's 128 px layout plus two 512-channel stages (512 -> 4 px)
    stages = [(64, 128), (128, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    vgg = (9 * 64 + 64) + (16 * 64 * 64 + 2 * 64)
    vgg += sum(9 * i * o + 2 * o + 16 * o * o + 2 * o for i, o in stages)
    vgg += (512 * 16 * 100 + 100) + (100 + 1)
    assert c[2] == vgg and 25e6 < c[2] < 30e6
    # RRDBNet: Real-ESRGAN x4plus has 16,697,987 (RGB, 23 RRDBs); each RRDB has 719,424; the
    # unshuffled input conv has 16 C input channels; the output has 1 channel instead of 3
    rrdb = 3 * sum(9 * (64 + 32 * i) * (32 if i < 4 else 64) + (32 if i < 4 else 64) for i in range(5))
    assert rrdb == 719_424
    for ch, n in ((1, c[3]), (5, c[4])):
        assert n == 16_697_987 + 3 * rrdb + (9 * 16 * ch * 64 - 9 * 3 * 64) - (9 * 64 * 2 + 2)
    # U-Net SN: Real-ESRGAN's has 4,376,897 with RGB input
    assert c[5] == 4_376_897 - 9 * 2 * 64


# ------------------------------------------------------------------ with the training loop
@pytest.fixture(scope="module")
def blob_cohort(tmp_path_factory):
    """Three prepared subjects (LR, HR in [0, 1], femur mask) of 8 x 40 x 44 voxels."""
    from femursr.sr.data import SubjectFiles
    from femursr.volume import Volume, write_volume

    root = tmp_path_factory.mktemp("gan_cohort")
    z, y, x = np.ogrid[:8, :40, :44]
    mask = ((z - 4) / 4.5) ** 2 + ((y - 20) / 15) ** 2 + ((x - 22) / 17) ** 2 <= 1
    out = []
    for i in range(3):
        g = np.random.default_rng(i)
        hr = np.clip(0.5 + 0.4 * np.sin(x / (2.0 + i)) * np.cos(y / 3.0) + 0.05 * g.standard_normal(mask.shape), 0, 1)
        lr = np.clip(ndimage.gaussian_filter(hr, 1.0) + 0.05 * g.standard_normal(mask.shape), 0, 1)
        files = SubjectFiles(f"B{i}", str(root / f"B{i}_lr.nii"), str(root / f"B{i}_hr.nii"), str(root / f"B{i}_mask.nii.gz"))
        for arr, path in ((lr * mask, files.lr), (hr * mask, files.hr), (mask, files.mask)):
            write_volume(Volume(arr.astype(np.float32 if arr.dtype != bool else np.uint8), spacing=(0.2, 0.2, 0.3), origin=(0.0, 0.0, 0.0)), path)
        out.append(files)
    return out


@pytest.mark.parametrize("model", ["srgan", "realesrgan"])
def test_killed_gan_run_resumes_to_the_uninterrupted_weights(model, blob_cohort, tmp_path):
    """Through femursr.sr.train.fit: pre-training and GAN phase, killed in each and resumed, end
    with the weights of an uninterrupted run (EMA, its step count, BN statistics and the
    spectral-norm vectors are all in the model's state)."""
    from femursr.sr.data import PatchDataset
    from femursr.sr.train import fit, seed_everything

    class Kill(Exception):
        pass

    params = small_params(model, pretrain={"epochs": 1, "lr": 1e-3, "scheduler": "multistep"},
                          gan={"epochs": 1, "lr_generator": 1e-4, "lr_discriminator": 1e-4}, ema_warmup=True)  # fmt: skip

    def run(run_dir, kill_at=None):
        seed_everything(7)
        m = build_model(model, "25d", 1, params)
        train = PatchDataset(blob_cohort[:2], PATCH, 1, seed=3)
        val = PatchDataset(blob_cohort[2:], PATCH, 1, seed=3, stream="validation", augment=False)

        def cb(pos):
            if pos.global_step == kill_at:
                raise Kill

        res = fit(m, train, val, run_dir, config={"params": params}, batch_size=2, samples_per_epoch=8, validation_samples=2,
                  device="cpu", checkpoint_every_steps=2, tensorboard=False, progress=False, callback=cb)  # fmt: skip
        return m, res

    ref, res = run(tmp_path / "ref")
    assert res.global_step == 8 and int(ref.ema_steps) == 8
    for step in (3, 7):  # mid pre-training (resumes from step 2), mid GAN phase (from step 6)
        with pytest.raises(Kill):
            run(tmp_path / "killed", kill_at=step)
    again, res = run(tmp_path / "killed")
    assert res.resumed_from == 6 and res.global_step == 8
    a, b = ref.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"{model}: kill-and-resume max abs weight difference {diff:.3g}")
    assert diff < 1e-6, diff
