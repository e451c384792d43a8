"""Tests of distill.py (DMD for SiT) and of sampling its generators: the distribution-matching update on an exact
Gaussian teacher, G at step 0, the DAR student, exact resume, sample.py on a generator, clear errors.

    python -m pytest -q test_distill.py

The Gaussian teacher is test_sample.GaussianVelocity, the exact velocity of data N(mu, diag(s^2)); the
SiT teachers are test_sample.make_checkpoint's tiny SiT-T/8 at 16 x 16 with randomized zero-init layers.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import distill
import sample
from checkpoint import latest_checkpoint, load_checkpoint, read_log
from flow import euler_sample, generate, guided_velocity
from test_sample import GaussianVelocity, make_checkpoint

REPO = Path(__file__).resolve().parent
RUN = ["--batch-size", "4", "--log-every", "1", "--sample-grid", "0"]


class LinearGenerator(nn.Module):
    """G(z) = a * z + b per dimension: its outputs are N(b, a^2)."""

    def __init__(self, dims):
        super().__init__()
        self.a = nn.Parameter(torch.ones(dims, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(dims, dtype=torch.float64))

    def forward(self, z):
        return self.a * z + self.b


def gaussian_field(mean, std):
    """The exact velocity of N(mean, diag(std^2)) as (x_t, t) -> v (class 0)."""
    field = GaussianVelocity(mean[None], torch.zeros_like(mean), std)
    return lambda x_t, t: field(x_t, t, torch.zeros(len(x_t), dtype=torch.int64))


def dm_step(generator, optimizer, mean, std, n, seed, swap=False):
    """One distribution-matching update of `generator` with the exact real and fake (its own distribution) fields."""
    draws = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mean), generator=draws, dtype=torch.float64)
    t = 0.02 + 0.96 * torch.rand(n, generator=draws, dtype=torch.float64)
    noise = torch.randn(n, len(mean), generator=draws, dtype=torch.float64)
    real = gaussian_field(mean, std)
    fake = gaussian_field(generator.b.detach().clone(), generator.a.detach().abs().clone())
    loss, _ = distill.distribution_matching_loss(generator(z), t, noise, *((fake, real) if swap else (real, fake)))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_dm_update_moves_a_linear_generator_to_the_gaussian_teacher():
    mean, std = torch.tensor([1.5, -1.0, 0.3], dtype=torch.float64), torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    generator = LinearGenerator(3)  # N(0, 1): off in mean (all three) and scale (the first two)
    optimizer = torch.optim.SGD(generator.parameters(), lr=3.0)  # the loss is a mean over B x 3 entries
    dm_step(generator, optimizer, mean, std, 4096, seed=0)
    assert torch.all(generator.b.detach() * mean.sign() > 0.1 * mean.abs()), generator.b  # every mean moves right
    for step in range(1, 40):
        dm_step(generator, optimizer, mean, std, 4096, seed=step)
    assert torch.allclose(generator.b.detach(), mean, atol=0.02), generator.b
    assert torch.allclose(generator.a.detach().abs(), std, atol=0.02), generator.a

    scale_only = LinearGenerator(3)  # the right means, unit scales: one step moves the scales the right way
    scale_only.b.data.copy_(mean)
    dm_step(scale_only, torch.optim.SGD(scale_only.parameters(), lr=3.0), mean, std, 4096, seed=0)
    a = scale_only.a.detach()
    assert a[0] < 0.95 and a[1] > 1.05 and abs(a[2] - 1) < 0.02, a

    away = LinearGenerator(3)  # the opposite sign (real and fake swapped) must move away: the test can fail
    dm_step(away, torch.optim.SGD(away.parameters(), lr=3.0), mean, std, 4096, seed=0, swap=True)
    assert torch.all(away.b.detach() * mean.sign() < 0), away.b


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return dict(residual=make_checkpoint(root / "residual" / "checkpoints" / "0000005.pt", router="residual", chunk=1),
                dar=make_checkpoint(root / "dar" / "checkpoints" / "0000005.pt", seed=1),
                dar_trained_with_kernel_cpu=make_checkpoint(root / "dar-cpu" / "checkpoints" / "0000005.pt", seed=1,
                                                            kernel="cpu"), root=root)


def build(teacher_path, *flags):
    args = distill.parse_args(["--teacher", str(teacher_path), *flags])
    teacher, checkpoint = distill.load_teacher(teacher_path, "cpu")
    return teacher, distill.build_student(distill.student_config(checkpoint["model_config"], args), checkpoint, "cpu")


@pytest.mark.parametrize("which, flags, tolerance", [
    ("residual", [], 0.0), ("dar", [], 0.0), ("dar_trained_with_kernel_cpu", [], 0.0),
    ("residual", ["--router", "dar", "--chunk", "2"], 1e-3)])  # LayerNorm eps
def test_generator_at_step_zero_is_the_teachers_one_step_prediction(teachers, which, flags, tolerance):
    teacher, generator = build(teachers[which], *flags)
    z, y = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        one_step = z + teacher(z, torch.zeros(6), y)  # x_hat at t = 0: z + (1 - 0) v(z, 0)
        out = generate(generator.eval(), z, y, 1)
        assert one_step.abs().mean() > 0.1 and (one_step - z).abs().mean() > 0.01  # a non-trivial prediction
        assert torch.allclose(out, one_step, atol=tolerance, rtol=0), (out - one_step).abs().max()
        two = generate(generator, z, y, 2)
        assert torch.allclose(two, euler_sample(guided_velocity(teacher, y), z, 2), atol=2 * tolerance, rtol=0)
    if flags:
        assert type(generator.router).__name__ != type(teacher.router).__name__
    assert getattr(generator.router, "kernel", "auto") == "auto"  # the machine's kernel, not the teacher run's


def test_resume_is_exact_and_sample_py_reads_the_generator(teachers, tmp_path):
    flags = ["--teacher", str(teachers["dar"]), "--results-dir", str(tmp_path), *RUN, "--ckpt-every", "2",
             "--keep-ckpts", "0", "--fake-updates", "2", "--regression-weight", "0.25", "--regression-pairs", "6",
             "--regression-sampler", "euler", "--regression-steps", "2"]
    distill.main(flags + ["--max-steps", "4", "--run-name", "whole"])
    distill.main(flags + ["--max-steps", "2", "--run-name", "parts"])
    distill.main(flags + ["--max-steps", "4", "--run-name", "parts", "--resume", "auto"])
    timing = ("images_per_s", "time_s")
    strip = lambda log: [{k: v for k, v in r.items() if k not in timing} for r in log]  # noqa: E731
    assert strip(read_log(tmp_path / "parts")) == strip(read_log(tmp_path / "whole"))
    assert [r["step"] for r in read_log(tmp_path / "whole")] == [1, 2, 3, 4]
    assert all("regression" in r for r in read_log(tmp_path / "whole"))
    whole, parts = (load_checkpoint(latest_checkpoint(tmp_path / name)) for name in ("whole", "parts"))
    for key in ("model", "ema", "fake"):
        assert any(not torch.equal(whole[key][k], v) for k, v in load_checkpoint(teachers["dar"])["ema"].items())
        for name, tensor in whole[key].items():
            assert torch.equal(parts[key][name], tensor), (key, name)
    assert whole["generator"]["gen_steps"] == 1 and whole["step"] == 4

    sample.main(["--ckpt", str(tmp_path / "whole"), "--num-samples", "5"])
    with np.load(tmp_path / "whole" / "samples" / "0000004-generator-1-n5.npz") as f:
        assert f["arr_0"].shape == (5, 16, 16, 3)
    with pytest.raises(ValueError, match="distilled 1-step generator"):
        sample.main(["--ckpt", str(tmp_path / "whole"), "--num-samples", "2", "--steps", "25"])


@pytest.mark.parametrize("steps", [1, 2])
def test_untrained_generator_samples_like_the_teachers_euler(teachers, tmp_path, steps):
    """With --lr 0, G stays the teacher: sample.py on it (K evaluations, no ODE) equals the teacher's K-step Euler."""
    distill.main(["--teacher", str(teachers["residual"]), "--results-dir", str(tmp_path), *RUN, "--max-steps", "1",
                  "--lr", "0", "--fake-lr", "1e-3", "--run-name", "frozen", "--sample-grid", "2",
                  "--gen-steps", str(steps)])
    with Image.open(tmp_path / "frozen" / "samples.png") as grid:
        assert grid.size == (2 * 18 + 2, 3 * 18 + 2)  # one row per class, 2 samples each
    sample.main(["--ckpt", str(tmp_path / "frozen"), "--num-samples", "4"])
    sample.main(["--ckpt", str(teachers["residual"]), "--num-samples", "4", "--sampler", "euler", "--steps",
                 str(steps), "--out", str(tmp_path / "t.npz")])
    with np.load(tmp_path / "frozen" / "samples" / f"0000001-generator-{steps}-n4.npz") as g, \
            np.load(tmp_path / "t.npz") as t:
        assert np.array_equal(g["arr_0"], t["arr_0"]) and np.array_equal(g["arr_1"], t["arr_1"])


def run_distill(*flags):
    """distill.py in a fresh process: (exit status, stderr)."""
    result = subprocess.run([sys.executable, str(REPO / "distill.py"), *map(str, flags)], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return result.returncode, result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--gen-steps", "0"], "argument --gen-steps: expected an integer >= 1, got '0'"),
    (["--fake-updates", "0"], "argument --fake-updates: expected an integer >= 1, got '0'"),
    (["--keep-ckpts", "-1"], "argument --keep-ckpts: expected an integer >= 0, got '-1'"),
    (["--t-min", "0.5", "--t-max", "0.4"], "--t-min and --t-max need 0 < t-min < t-max < 1"),
    (["--chunk", "4"], "--chunk and --query apply to --router dar only")])
def test_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit):
        distill.parse_args(["--teacher", "x.pt", *flags])
    assert message in capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(teachers, tmp_path):
    base = ["--results-dir", str(tmp_path), *RUN, "--max-steps", "1"]
    not_a_checkpoint = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, not_a_checkpoint)
    with pytest.raises(ValueError, match=r"--teacher: .*weights.pt is not a train.py checkpoint \(missing model"):
        distill.main(["--teacher", str(not_a_checkpoint), *base])
    with pytest.raises(ValueError, match="--teacher .*missing.pt: no such file or run directory"):
        distill.main(["--teacher", str(tmp_path / "missing.pt"), *base])
    with pytest.raises(ValueError, match=r"--chunk 24: the teacher SiT-T/8 has 24 sublayers, .*never closes"):
        distill.main(["--teacher", str(teachers["residual"]), *base, "--router", "dar", "--chunk", "24"])
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pt"]  # refused before anything is written
    distill.main(["--teacher", str(teachers["dar"]), *base, "--run-name", "g"])
    with pytest.raises(ValueError, match="is a distilled generator"):
        distill.main(["--teacher", str(tmp_path / "g"), *base, "--run-name", "gg"])
    with pytest.raises(ValueError, match="already holds checkpoints: pass --resume auto"):
        distill.main(["--teacher", str(teachers["dar"]), *base, "--run-name", "g"])
    with pytest.raises(ValueError, match=r"--gen-steps: checkpoint 1, this run 2"):
        distill.main(["--teacher", str(teachers["dar"]), *base, "--run-name", "g", "--gen-steps", "2",
                      "--resume", "auto", "--max-steps", "2"])
    latent = make_checkpoint(tmp_path / "latent.pt", data=dict(name="latents", vae=str(tmp_path / "no-vae"),
                                                                 scale=0.18215))
    status, stderr = run_distill("--teacher", latent, *base)
    assert status == 1 and stderr.startswith("error: ") and "no-vae" in stderr, stderr
    assert len(stderr.splitlines()) == 1
