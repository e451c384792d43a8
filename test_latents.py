"""Tests of the SD-VAE latents path: train.py --extract-latents (data.py), training on latents, sampling with
decoding, on a tiny randomly initialized AutoencoderKL (8x downsampling, 4 latent channels; no download).

    python -m pytest -q test_latents.py

The image folder: classes a and b, 6 RGB PNGs each plus one unreadable file in b, at 32 x 32, 48 x 40 and
70 x 64 (made of 2 x 2 blocks, so that ADM's box-filter halving is exact): 12 images -> 4 x 4 latents.
Skipped only when diffusers is not installed.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402

import data  # noqa: E402
from checkpoint import latest_checkpoint, load_checkpoint, load_model  # noqa: E402
import flow  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

REPO = Path(__file__).resolve().parent
SIZES = [(32, 32), (48, 40), (70, 64)]  # (width, height)
EXTRACT = ["--extract-latents", "--image-size", "32", "--shard-size", "5", "--vae-batch-size", "4", "--num-workers", "0"]
SHARD_COUNTS = [5, 5, 2]  # 13 files in sorted order, the unreadable one last


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=32)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """(root, {class: [uint8 HWC arrays as written]})."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    written = {}
    for name in ("a", "b"):
        (root / name).mkdir()
        written[name] = []
        for i in range(6):
            width, height = SIZES[i % 3]
            blocks = rng.integers(0, 256, (height // 2, width // 2, 3), dtype=np.uint8)
            image = blocks.repeat(2, axis=0).repeat(2, axis=1)
            Image.fromarray(image).save(root / name / f"{i}.png")
            written[name].append(image)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    return root, written


def extract(folder, out, vae_dir, *extra):
    train.main([*EXTRACT, "--data", str(folder), "--out", str(out), "--vae", str(vae_dir), *extra])


@pytest.fixture(scope="module")
def latents_dir(image_folder, vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("extracted") / "latents"
    extract(image_folder[0], out, vae_dir)
    return out


def read_shards(directory):
    return {part: np.concatenate([np.load(data.shard_path(directory, k, part)) for k in range(3)])
            for part in data.SHARD_PARTS}


def test_extraction_layout_crop_and_flips(latents_dir, image_folder, vae_dir):
    names = sorted(p.name for p in latents_dir.iterdir())
    assert names == sorted(["meta.json"] + [f"{k:05d}.{part}.npy" for k in range(3) for part in data.SHARD_PARTS])
    assert all(p.is_file() for p in latents_dir.iterdir())
    meta = json.loads((latents_dir / "meta.json").read_text())
    assert meta["complete"] and meta["shard_counts"] == SHARD_COUNTS and meta["num_images"] == 12
    assert meta["num_files"] == 13 and meta["class_names"] == ["a", "b"] and meta["image_size"] == 32
    assert meta["latent_shape"] == [4, 4, 4] and meta["scale"] == 0.18215 and meta["vae"] == str(vae_dir.resolve())

    shards = read_shards(latents_dir)
    assert shards["labels"].tolist() == [0] * 6 + [1] * 6
    pixels = shards["pixels"]
    assert pixels.dtype == np.uint8 and pixels.shape == (12, 3, 32, 32)
    written = image_folder[1]["a"] + image_folder[1]["b"]
    for i, image in enumerate(written):
        if image.shape[:2] == (32, 32):  # already the size: unchanged
            assert np.array_equal(pixels[i].transpose(1, 2, 0), image)
        elif image.shape[:2] == (64, 70):  # halved (exactly, 2 x 2 blocks) to 35 x 32, then 1 column cut each side
            assert np.array_equal(pixels[i].transpose(1, 2, 0), image[::2, ::2][:, 1:33])

    moments = shards["moments"]
    assert moments.dtype == np.float32 and moments.shape == (12, 2, 8, 4, 4)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    x = torch.from_numpy(pixels).float() / 127.5 - 1
    with torch.no_grad():
        image_posterior, mirror_posterior = vae.encode(x).latent_dist, vae.encode(x.flip(-1)).latent_dist
    for copy, posterior in enumerate((image_posterior, mirror_posterior)):
        expected = torch.cat([posterior.mean, posterior.std], dim=1) * 0.18215
        torch.testing.assert_close(torch.from_numpy(moments[:, copy]), expected, rtol=1e-4, atol=1e-5)
    # the mirror's latents are those of the mirrored image, not the mirrored latents
    assert not np.allclose(moments[:, 1, :4], moments[:, 0, :4, :, ::-1], atol=1e-3)


class Interrupt(Exception):
    pass


def test_resume_after_interruption(latents_dir, image_folder, vae_dir, tmp_path, monkeypatch):
    out = tmp_path / "latents"
    real_save = data.write_atomically

    def killed_in_second_shard(path, write, *args):
        if path.name == "00001.moments.npy":  # shard 0 complete, shard 1 has none of its files yet
            raise Interrupt
        real_save(path, write, *args)

    monkeypatch.setattr(data, "write_atomically", killed_in_second_shard)
    with pytest.raises(Interrupt):
        extract(image_folder[0], out, vae_dir)
    monkeypatch.setattr(data, "write_atomically", real_save)
    with pytest.raises(ValueError, match="unfinished"):
        data.LatentSet(out)
    (out / ".00001.moments.npy.12345.tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves
    np.save(data.shard_path(out, 1, "moments"), np.zeros(1))  # a part of shard 1 written, its labels not

    real_encode, encoded = data.encode_moments, []
    monkeypatch.setattr(data, "encode_moments", lambda vae, pixels, scale: encoded.append(len(pixels))
                        or real_encode(vae, pixels, scale))
    extract(image_folder[0], out, vae_dir)
    assert sum(encoded) == 5 + 2  # shards 1 and 2 only
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in latents_dir.iterdir())  # no .tmp left
    for part, array in read_shards(out).items():
        assert np.array_equal(array, read_shards(latents_dir)[part]), part
    assert json.loads((out / "meta.json").read_text())["complete"]

    with pytest.raises(ValueError, match="other settings.*image_size 32 there, 16 now"):
        extract(image_folder[0], out, vae_dir, "--image-size", "16")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and without meta.json"):
        extract(image_folder[0], tmp_path / "other", vae_dir)
    with pytest.raises(ValueError, match="--image-size 20: must be a multiple of 8"):
        extract(image_folder[0], tmp_path / "odd", vae_dir, "--image-size", "20")


def test_processes_share_the_shards(latents_dir, image_folder, vae_dir, tmp_path):
    """Process r of W takes shards r, r + W, ...; the last one to finish completes meta.json. In this
    process first (so that the state between the two is seen), then under torchrun."""
    out = tmp_path / "latents"
    args = train.parse_args([*EXTRACT, "--data", str(image_folder[0]), "--out", str(out), "--vae", str(vae_dir)])
    data.extract_latents(args, rank=1, world_size=2)
    assert sorted(p.name for p in out.iterdir()) == sorted(["meta.json"] + [f"00001.{p}.npy" for p in data.SHARD_PARTS])
    assert not json.loads((out / "meta.json").read_text())["complete"]
    data.extract_latents(args, rank=0, world_size=2)
    assert json.loads((out / "meta.json").read_text()) == json.loads((latents_dir / "meta.json").read_text())
    for part, array in read_shards(out).items():
        assert np.array_equal(array, read_shards(latents_dir)[part]), part

    out = tmp_path / "torchrun"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "train.py"), *EXTRACT, "--data", str(image_folder[0]), "--out", str(out),
                             "--vae", str(vae_dir)],  # the threads of this process: convolutions round by thread count
                            env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / "meta.json").read_text()) == json.loads((latents_dir / "meta.json").read_text())
    for part, array in read_shards(out).items():
        assert np.array_equal(array, read_shards(latents_dir)[part]), part


def test_no_pixels(latents_dir, image_folder, vae_dir, tmp_path, monkeypatch):
    out = tmp_path / "latents"
    out.mkdir()
    (out / ".meta.json.999.tmp").write_bytes(b"{")  # a first run killed while writing meta.json: not in the way
    extract(image_folder[0], out, vae_dir, "--no-pixels")
    assert not list(out.glob("*.pixels.npy")) and not json.loads((out / "meta.json").read_text())["pixels"]
    assert np.array_equal(np.load(data.shard_path(out, 2, "moments")), np.load(data.shard_path(latents_dir, 2, "moments")))
    monkeypatch.setitem(train.REPA_ENCODERS, "recording", RecordingEncoder)
    with pytest.raises(ValueError, match="--repa-encoder recording: .*--no-pixels"):
        train.main(["--data", str(out), "--results-dir", str(tmp_path), "--model", "SiT-T/2", "--repa-encoder",
                    "recording", "--global-batch-size", "4"])


def test_latent_batches_flip_and_posterior_draws(latents_dir):
    latents = data.LatentSet(latents_dir)
    shards = read_shards(latents_dir)
    batches = train.ShardedBatches(latents, latents.labels, 4, seed=3, pixels=True)
    flips = []
    for step in range(4):
        x, y, t, noise, pixels = batches.get(step, "cpu")
        # the documented draws from (seed, step): t, noise, then the mirror coin and the posterior's eps
        generator = torch.Generator().manual_seed(train.step_seed(3, step, 0))
        assert torch.equal(t, torch.rand(4, generator=generator))
        assert torch.equal(noise, torch.randn(4, 4, 4, 4, generator=generator))
        flip = torch.randint(2, (4,), generator=generator)
        eps = torch.randn(4, 4, 4, 4, generator=generator)
        rows = batches.order[(step % batches.steps_per_epoch) * 4:][:4].numpy()
        moments = torch.from_numpy(shards["moments"][rows, flip.numpy()])
        torch.testing.assert_close(x, moments[:, :4] + moments[:, 4:] * eps)
        stored = torch.from_numpy(shards["pixels"][rows])
        expected = torch.where(flip.view(-1, 1, 1, 1).bool(), stored.flip(-1), stored)
        assert torch.equal(pixels, expected.float() / 127.5 - 1) and y.tolist() == shards["labels"][rows].tolist()
        flips += flip.tolist()
    assert 0 < sum(flips) < len(flips)
    again = train.ShardedBatches(latents, latents.labels, 4, seed=3, pixels=True).get(2, "cpu")
    assert torch.equal(again[0], batches.get(2, "cpu")[0])
    halves = [train.ShardedBatches(latents, latents.labels, 4, seed=3, rank=r, world_size=2).get(1, "cpu")
              for r in range(2)]
    x = batches.get(1, "cpu")[0]
    assert torch.equal(halves[0][0], x[0::2]) and torch.equal(halves[1][0], x[1::2]) and halves[0][4] is None


class RecordingEncoder(nn.Module):
    """A frozen patch projection of the RGB images it is given, on the model's token grid; keeps its inputs."""
    z_dim = 8
    seen = []

    def __init__(self, grid_size):
        super().__init__()
        self.proj = nn.Conv2d(3, self.z_dim, kernel_size=32 // grid_size, stride=32 // grid_size)
        self.requires_grad_(False)

    def forward(self, x):
        RecordingEncoder.seen.append(x.clone())
        return self.proj(x).flatten(2).transpose(1, 2)


@pytest.fixture(scope="module")
def latent_run(latents_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setitem(train.REPA_ENCODERS, "recording", RecordingEncoder)
        train.main(["--data", str(latents_dir), "--results-dir", str(results), "--model", "SiT-T/2",
                    "--router", "dar", "--chunk", "4", "--global-batch-size", "4", "--max-steps", "3",
                    "--eval-batch-size", "4", "--ckpt-every", "3", "--log-every", "1", "--sample-grid", "2",
                    "--repa-encoder", "recording", "--repa-depth", "1"])
    return results / "SiT-T-2-dar-static-c4"


def test_training_on_latents(latent_run, latents_dir, vae_dir):
    checkpoint = load_checkpoint(latest_checkpoint(latent_run))
    assert checkpoint["data"] == dict(checkpoint["data"], name="latents", path=str(latents_dir), channels=4,
                                      num_classes=2, image_size=4, vae=str(vae_dir.resolve()), scale=0.18215)
    assert checkpoint["model_config"]["in_channels"] == 4 and checkpoint["model_config"]["input_size"] == 4
    log = [json.loads(line) for line in (latent_run / "log.jsonl").read_text().splitlines()]
    assert np.isfinite(log[-1]["val_loss"]) and all(np.isfinite(r["repa_loss"]) for r in log if "loss" in r)
    # REPA's encoder saw the stored pixels (or their mirrors), not latents
    stored = torch.from_numpy(read_shards(latents_dir)["pixels"]).float() / 127.5 - 1
    candidates = torch.cat([stored, stored.flip(-1)]).flatten(1)
    assert len(RecordingEncoder.seen) == 3
    for images in RecordingEncoder.seen:
        assert images.shape == (4, 3, 32, 32)
        assert all((candidates == image.flatten()).all(1).any() for image in images)
    with Image.open(latent_run / "samples.png") as grid:  # 2 classes x 2 samples, decoded to 32 x 32 RGB
        assert grid.size == (2 * 34 + 2, 2 * 34 + 2) and grid.mode == "RGB"


def test_sampling_decodes_with_the_vae(latent_run, vae_dir, tmp_path):
    out = tmp_path / "samples.npz"
    sample.main(["--ckpt", str(latent_run), "--num-samples", "3", "--sampler", "euler", "--steps", "2",
                 "--out", str(out)])
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (3, 32, 32, 3) and labels.shape == (3,)
    assert (out.with_suffix(".png")).is_file()

    model = load_model(latest_checkpoint(latent_run))[0]
    vae = AutoencoderKL.from_pretrained(vae_dir).requires_grad_(False)  # CPU convolutions differ a little with grads
    expected, expected_labels = flow.sample_batch(model, range(3), 0, "euler", 2,
                                                    decode=lambda z: vae.decode(z / 0.18215).sample)
    assert np.array_equal(images, expected.permute(0, 2, 3, 1).numpy()) and labels.tolist() == expected_labels.tolist()

    moved = tmp_path / "vae-copy"
    shutil.copytree(vae_dir, moved)
    other = tmp_path / "other.npz"
    sample.main(["--ckpt", str(latent_run), "--num-samples", "3", "--sampler", "euler", "--steps", "2",
                 "--out", str(other), "--vae", str(moved)])
    with np.load(other) as f:
        assert np.array_equal(f["arr_0"], images)
    with pytest.raises(OSError, match="--vae .*missing.*cannot load an AutoencoderKL"):
        sample.main(["--ckpt", str(latent_run), "--num-samples", "1", "--out", str(other),
                     "--vae", str(tmp_path / "missing")])


def test_missing_diffusers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails
    with pytest.raises(ImportError, match="pip install diffusers"):
        data.load_vae("stabilityai/sd-vae-ft-ema")
