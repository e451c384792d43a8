"""Tests for sample.py: the samplers on an exact Gaussian case, guidance, determinism, the command line
and torchrun sharding. Run: python -m pytest -q test_sample.py

For data x_1 ~ N(mu, diag(s^2)) and noise x_0 ~ N(0, I), x_t = t x_1 + (1 - t) x_0 is Gaussian with mean
t mu and variance t^2 s^2 + (1 - t)^2, and the exact velocity E[x_1 - x_0 | x_t] is
    v(x, t) = mu + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) * (x - t mu).
Its ODE maps x_0 to mu + s x_0 exactly, so the ODE samplers' errors can be measured per sample.
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import router
import sample
from model import SiT, create_model
from router import dar_mix as DAR_MIX  # the original, for a spy that wraps it
from checkpoint import load_model
from flow import euler_maruyama_sample, euler_sample, guided_velocity, heun_sample, sample_batch, sample_latents

REPO = Path(__file__).resolve().parent


class GaussianVelocity(nn.Module):
    """The exact velocity field for per-class data N(mu_y, diag(s^2)); label num_classes (the null class)
    is N(mu_null, diag(s^2)). Called like the SiT: forward(x, t, y) with t a [B] tensor."""

    def __init__(self, class_means, null_mean, std):
        super().__init__()
        self.num_classes = len(class_means)
        self.register_buffer("means", torch.cat([class_means, null_mean[None]]).double())
        self.register_buffer("std", std.double())

    def forward(self, x, t, y):
        t = t.view(-1, *([1] * (x.dim() - 1)))
        mu, s2 = self.means[y], self.std ** 2
        return mu + (t * s2 - (1 - t)) / (t ** 2 * s2 + (1 - t) ** 2) * (x - t * mu)

    forward_with_cfg = SiT.forward_with_cfg  # the model's own guidance code, on this exact field


MEANS = torch.tensor([[1.5, -0.5, 0.0], [-1.0, 2.0, 0.5]], dtype=torch.float64)
NULL_MEAN = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
STD = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
N = 20000


@pytest.fixture(scope="module")
def field():
    return GaussianVelocity(MEANS, NULL_MEAN, STD)


def noise(n=N, seed=0):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def t_batch(t, n):
    return torch.full((n,), t, dtype=torch.float64)


def class_velocity(field, label, n=N, cfg_scale=1.0, cfg_interval=None):
    return guided_velocity(field, torch.full((n,), label), cfg_scale, cfg_interval)


def check_gaussian(x, mean, std, rel_std=0.03):
    """Sample mean within 5 standard errors (+ a small bias allowance), sample std within rel_std."""
    standard_error = std / len(x) ** 0.5
    assert torch.all((x.mean(0) - mean).abs() < 5 * standard_error + 0.01 * std), (x.mean(0), mean)
    assert torch.all((x.std(0) / std - 1).abs() < rel_std), (x.std(0), std)


def test_ode_samplers_reach_the_data_distribution(field):
    x0 = noise()
    for sampler, steps in ((heun_sample, 50), (euler_sample, 200)):
        x = sampler(class_velocity(field, 0), x0, steps)
        check_gaussian(x, MEANS[0], STD, rel_std=0.02)
        assert (x - (MEANS[0] + STD * x0)).pow(2).mean().sqrt() < 0.02  # the exact transport map


def test_heun_error_well_below_euler_and_orders(field):
    x0 = noise(2000)
    exact = MEANS[1] + STD * x0
    velocity = class_velocity(field, 1, n=2000)
    rms = lambda x: (x - exact).pow(2).mean().sqrt().item()  # noqa: E731
    euler = {steps: rms(euler_sample(velocity, x0, steps)) for steps in (10, 20)}
    heun = {steps: rms(heun_sample(velocity, x0, steps)) for steps in (10, 20)}
    assert heun[10] < euler[10] / 10
    assert 1.6 < euler[10] / euler[20] < 2.4  # first order
    assert 3.2 < heun[10] / heun[20] < 4.8  # second order


def test_sde_reaches_the_data_distribution(field):
    generator = torch.Generator().manual_seed(1)
    randn_like = lambda z: torch.randn(z.shape, generator=generator, dtype=z.dtype)  # noqa: E731
    x = euler_maruyama_sample(class_velocity(field, 0), noise(), 100, randn_like)
    check_gaussian(x, MEANS[0], STD)
    # stochastic: unlike the ODE, the end point is not the deterministic map of the initial noise
    assert (x - (MEANS[0] + STD * noise())).abs().mean() > 0.05


def test_cfg_scale_one_is_conditional_and_guidance_extrapolates(field):
    x0 = noise(4000)
    y = torch.zeros(4000, dtype=torch.int64)
    conditional = heun_sample(lambda x, t: field(x, t_batch(t, len(x)), y), x0, 20)
    scale_one = heun_sample(guided_velocity(field, y, cfg_scale=1.0), x0, 20)
    through_cfg = heun_sample(lambda x, t: field.forward_with_cfg(x, t_batch(t, len(x)), y, 1.0), x0, 20)
    assert torch.equal(scale_one, conditional)
    torch.testing.assert_close(through_cfg, conditional)
    # equal variances: v_u + s (v_c - v_u) is the exact field of the mean mu_u + s (mu_c - mu_u)
    guided = heun_sample(guided_velocity(field, y, cfg_scale=2.0), x0, 50)
    torch.testing.assert_close(guided, NULL_MEAN + 2 * (MEANS[0] - NULL_MEAN) + STD * x0, atol=0.02, rtol=0)


def test_cfg_interval_guides_only_inside(field):
    x, y = noise(8), torch.ones(8, dtype=torch.int64)
    velocity = guided_velocity(field, y, cfg_scale=3.0, cfg_interval=(0.2, 0.6))
    for t in (0.0, 0.1, 0.7, 1.0):
        torch.testing.assert_close(velocity(x, t), field(x, t_batch(t, 8), y))
    for t in (0.2, 0.4, 0.6):
        torch.testing.assert_close(velocity(x, t), field.forward_with_cfg(x, t_batch(t, 8), y, 3.0))
        assert not torch.allclose(velocity(x, t), field(x, t_batch(t, 8), y))


def test_cfg_channels_3_is_sits_released_guidance():
    """SiT's forward_with_cfg guides channels 0-2 and keeps the conditional prediction for the others; ours
    guides every channel unless asked for that."""
    torch.manual_seed(0)
    model = create_model("SiT-T/8", input_size=16, in_channels=4, num_classes=3).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, t, y = torch.randn(2, 4, 16, 16, dtype=torch.float64), torch.tensor([0.3, 0.8], dtype=torch.float64), torch.tensor([0, 2])
    v_cond, v_uncond = model(x, t, y), model(x, t, torch.full_like(y, 3))
    sit = torch.cat([v_uncond[:, :3] + 2.5 * (v_cond[:, :3] - v_uncond[:, :3]), v_cond[:, 3:]], dim=1)
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 2.5, cfg_channels=3), sit)
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 2.5), v_uncond + 2.5 * (v_cond - v_uncond))
    assert ((sit - model.forward_with_cfg(x, t, y, 2.5))[:, 3:]).abs().max() > 1e-3


#################################################################################
#                     A tiny checkpoint and the command line                    #
#################################################################################

MODEL_CONFIG = dict(name="SiT-T/8", input_size=16, in_channels=1, num_classes=3, router="dar", query="static",
                    chunk=4, learn_sigma=False, class_dropout_prob=0.1)


def make_checkpoint(path, step=5, seed=0, channels=1, data=None, **config_changes):
    """A train.py-contract checkpoint of a tiny SiT (MODEL_CONFIG with config_changes) whose zero-initialized
    layers are randomized (so that it predicts a non-trivial velocity), with EMA weights different from the
    raw ones; `data` replaces entries of its Fashion-MNIST data description."""
    torch.manual_seed(seed)
    config = dict(MODEL_CONFIG, in_channels=channels, **config_changes)
    model = create_model(**config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name or "router" in name:
                param.normal_(0, 0.05)
    ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = config.pop("name")
    torch.save(dict(model=model.state_dict(), ema=ema, opt={}, step=step, args=dict(model=name),
                    model_config=dict(config, name=name),
                    data={**dict(name="fashion-mnist", path="", channels=channels, num_classes=3, image_size=16),
                          **(data or {})},
                    rng=dict(seed=seed)), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("run") / "results" / "tiny" / "checkpoints" / "0000005.pt")


@pytest.fixture(scope="module")
def tiny_model(checkpoint):
    return load_model(checkpoint)[0]


def test_same_seed_same_samples_in_any_batch(tiny_model):
    args = dict(sampler="sde", steps=3)
    first, labels = sample_batch(tiny_model, range(0, 4), seed=7, **args)
    again, labels_again = sample_batch(tiny_model, range(0, 4), seed=7, **args)
    assert torch.equal(first, again) and torch.equal(labels, labels_again)
    part, part_labels = sample_batch(tiny_model, range(2, 4), seed=7, **args)  # the same samples, other batch
    assert torch.equal(part, first[2:]) and torch.equal(part_labels, labels[2:])
    other, _ = sample_batch(tiny_model, range(0, 4), seed=8, **args)
    assert not torch.equal(first, other)
    assert first.dtype == torch.uint8 and first.shape == (4, 1, 16, 16) and labels.max() < 3
    assert len(set(first.flatten().tolist())) > 50  # real images, not a constant


def test_a_float64_model_samples_in_float64(tiny_model):
    """The sampler's noise and state take a float64 model's dtype (float32 noise failed in its first layer), and
    the samples are the float32 model's up to float32 rounding; a bf16 model is a clear error."""
    double = copy.deepcopy(tiny_model).double()
    x, _ = sample_latents(double, range(3), seed=7, sampler="sde", steps=3)
    reference, _ = sample_latents(tiny_model, range(3), seed=7, sampler="sde", steps=3)
    assert x.dtype == torch.float64 and reference.dtype == torch.float32
    torch.testing.assert_close(x.float(), reference, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="a model in torch.bfloat16 cannot be sampled"):  # not torch's conv2d error
        sample_latents(copy.deepcopy(tiny_model).bfloat16(), range(3), seed=7, sampler="sde", steps=3)


def test_a_checkpoint_loads_with_the_kernel_of_the_loading_machine(tmp_path):
    """A run trained with an explicit --kernel (cpu here, triton on a GPU) is sampled with the kernel that suits the
    machine that loads it (auto): the same velocities as the kernel it was trained with, on any device."""
    trained = make_checkpoint(tmp_path / "0000005.pt", router="dar", query="timestep", chunk=2, kernel="triton")
    model = load_model(trained)[0]
    assert model.router.kernel == "auto"
    reference = create_model(**dict(MODEL_CONFIG, in_channels=1, router="dar", query="timestep", chunk=2,
                                    kernel="torch"))
    reference.load_state_dict(torch.load(trained, weights_only=True)["ema"])
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference.eval()(x, t, y), rtol=1e-5, atol=1e-5)


def test_kernel_flag_chooses_how_dar_is_computed(checkpoint, tmp_path, monkeypatch):
    """--kernel torch samples a DAR checkpoint with the plain dar_mix, the default (auto) with the C++ kernel; the
    images agree (up to one level of rounding)."""
    calls = []
    monkeypatch.setattr(router, "dar_mix", lambda *a, **k: calls.append(1) or DAR_MIX(*a, **k))
    images = {}
    for kernel in ("torch", "auto"):
        calls.clear()
        out = tmp_path / f"{kernel}.npz"
        sample.main(["--ckpt", str(checkpoint), "--num-samples", "3", "--steps", "2", "--kernel", kernel,
                     "--out", str(out)])
        assert bool(calls) == (kernel == "torch"), kernel
        with np.load(out) as f:
            images[kernel] = f["arr_0"].astype(int)
    assert np.abs(images["torch"] - images["auto"]).max() <= 1
    names = {kernel: sample.output_path(sample.parse_args(["--kernel", kernel, "--sampler", "heun", "--steps", "2"]), checkpoint, 5).name
             for kernel in ("torch", "auto")}  # the default name: one kernel's samples never overwrite the other's
    assert names == {"torch": "0000005-heun-2-kernel-torch-n1000.npz", "auto": "0000005-heun-2-n1000.npz"}
    with pytest.raises(SystemExit):
        sample.parse_args(["--kernel", "fast"])


def test_bare_sample_py_uses_newest_checkpoint(tmp_path, monkeypatch, capsys):
    old = make_checkpoint(tmp_path / "results" / "old-run" / "checkpoints" / "0000100.pt", step=100)
    new = make_checkpoint(tmp_path / "results" / "new-run" / "checkpoints" / "0000020.pt", step=20, seed=1)
    os.utime(old, (1e9, 1e9))  # the other run's checkpoint is older on disk despite its higher step
    make_checkpoint(new.parent / "0000010.pt", step=10, seed=2)  # an earlier step of the newest run
    monkeypatch.chdir(tmp_path)
    sample.main(["--num-samples", "5", "--batch-size", "2", "--steps", "2"])
    out = tmp_path / "results" / "new-run" / "samples" / "0000020-heun-2-n5.npz"
    assert str(out) in capsys.readouterr().out
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8 and labels.shape == (5,)
    assert np.array_equal(images[..., 0], images[..., 2])  # a gray model repeats its channel
    model = load_model(new)[0]
    expected, expected_labels = sample_batch(model, range(5), seed=0, sampler="heun", steps=2)
    assert np.array_equal(images[..., 0], expected[:, 0].numpy()) and np.array_equal(labels, expected_labels)
    with Image.open(out.with_suffix(".png")) as grid:
        assert grid.mode == "L" and grid.size == (3 * 18 + 2, 2 * 18 + 2)  # 5 images on a 3-column grid


def test_class_rows_cfg_and_raw_weights(checkpoint, tmp_path):
    out = tmp_path / "grid.npz"
    args = ["--ckpt", str(checkpoint.parent.parent), "--class-labels", "2", "0", "--num-samples", "6",
            "--sampler", "euler", "--steps", "3", "--cfg-scale", "2", "--cfg-interval", "0.1", "0.9"]
    sample.main(args + ["--out", str(out)])
    with np.load(out) as f:
        assert f["arr_1"].tolist() == [2, 0, 2, 0, 2, 0]
        guided = f["arr_0"]
    with Image.open(out.with_suffix(".png")) as grid:
        assert grid.size == (3 * 18 + 2, 2 * 18 + 2)  # one row per class, 3 samples each
    sample.main(args + ["--out", str(tmp_path / "raw.npz"), "--no-ema"])
    with np.load(tmp_path / "raw.npz") as f:
        assert not np.array_equal(f["arr_0"], guided)
    default_name = sample.output_path(sample.parse_args(args), checkpoint, 5)
    assert default_name == checkpoint.parent.parent / "samples" / "0000005-euler-3-cfg2-0.1-0.9-n6-classes2_0.npz"


def test_rgb_model_writes_rgb(tmp_path):
    ckpt = make_checkpoint(tmp_path / "rgb.pt", channels=3)
    sample.main(["--ckpt", str(ckpt), "--num-samples", "2", "--steps", "1", "--sampler", "euler"])
    with Image.open(tmp_path / "samples" / "0000005-euler-1-n2.png") as grid:
        assert grid.mode == "RGB"


@pytest.mark.parametrize("flags, message", [
    (["--class-labels", "3"], "--class-labels [3]"),
    (["--ckpt", "nowhere.pt"], "--ckpt nowhere.pt"),
    (["--cfg-channels", "9", "--cfg-scale", "2"], "--cfg-channels 9: the model has 1 channels"),
])
def test_clear_errors(checkpoint, flags, message):
    flags = (["--ckpt", str(checkpoint)] if "--ckpt" not in flags else []) + flags
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sample.main(flags + ["--num-samples", "1", "--steps", "1"])


def test_a_kill_while_writing_the_npz_leaves_none(checkpoint, tmp_path, monkeypatch):
    """study.py skips sampling when the npz exists, and fid.py reads it: a half-written one must never be there."""
    def killed(file, **arrays):
        file = open(file, "wb") if isinstance(file, (str, Path)) else file
        file.write(b"PK\x03\x04 the first bytes of an npz")
        file.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", killed)
    out = tmp_path / "fid-n2.npz"
    with pytest.raises(KeyboardInterrupt):
        sample.main(["--ckpt", str(checkpoint), "--num-samples", "2", "--steps", "1", "--out", str(out)])
    assert not out.exists()


def test_missing_checkpoint_and_bad_flags(tmp_path, capsys):
    with pytest.raises(ValueError, match="no checkpoint under"):
        sample.main(["--results-dir", str(tmp_path / "empty")])
    for flags in (["--cfg-interval", "0.8", "0.2"], ["--sampler", "sde", "--steps", "1"]):
        with pytest.raises(SystemExit):
            sample.main(flags)
        assert "error: --" in capsys.readouterr().err


def test_torchrun_two_processes_equal_one(checkpoint, tmp_path):
    common = ["--ckpt", str(checkpoint), "--num-samples", "7", "--batch-size", "2", "--sampler", "sde",
              "--steps", "3", "--seed", "3"]
    sample.main(common + ["--out", str(tmp_path / "one.npz")])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "sample.py"), *common, "--out", str(tmp_path / "two.npz")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz", "one.png", "two.npz", "two.png"]
