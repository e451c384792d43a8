"""Tests of train.py and data.py on tiny data and tiny models: data loading, the loss, EMA, exact resume after a real
kill, a log cut short, a full disk, clear errors, NaN and divergence stops, 2-process DDP == 1 process, a rank
killed under torchrun, REPA.

    python -m pytest -q test_train.py

Runs of train.py happen in subprocesses where a real kill or torchrun is needed, else in-process. They use
SiT-T/8 at 16 x 16 (4 tokens) on a Fashion-MNIST-shaped IDX set written here (32 training images, 16 test).
"""
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import data
import sample
import train
from checkpoint import latest_checkpoint, load_checkpoint, load_model
from model import create_model

REPO = Path(__file__).resolve().parent
TINY = ["--model", "SiT-T/8", "--image-size", "16", "--global-batch-size", "8", "--log-every", "1",
        "--eval-batch-size", "8", "--sample-grid", "0"]
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def write_idx(path, array):
    """The IDX format: 0x0000, type 0x08 (unsigned byte), ndim, big-endian dims, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fashion_split(directory, split, count, seed):
    """`count` 28 x 28 images whose brightness encodes the label (so that there is something to learn)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count).astype(np.uint8)
    images = rng.integers(0, 60, (count, 28, 28)) + labels[:, None, None] * 19
    directory.mkdir(parents=True, exist_ok=True)
    image_file, label_file = data.FASHION_MNIST_FILES[split]
    write_idx(directory / image_file, images)
    write_idx(directory / label_file, labels)
    return images.astype(np.uint8), labels


@pytest.fixture(scope="module")
def tiny_fashion(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fashion")
    write_fashion_split(directory, "train", 32, seed=1)
    write_fashion_split(directory, "test", 16, seed=2)
    return directory


def run_train(*args, wrapper=None, check=True, env=None):
    """train.py in a fresh process (or a wrapper script that imports it, with the arguments in sys.argv)."""
    command = [sys.executable, "-c", wrapper] if wrapper else [sys.executable, str(REPO / "train.py")]
    result = subprocess.run(command + [str(a) for a in args], env=dict(SUBPROCESS_ENV, **(env or {})),
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def read_log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def checkpoint_path(run_dir, step):
    return Path(run_dir) / "checkpoints" / f"{step:07d}.pt"


# --------------------------------------------------------------------------------------------- data


def test_fashion_mnist_from_idx_files(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", [])
    train_images, train_labels = write_fashion_split(tmp_path, "train", 12, seed=3)
    test_images, test_labels = write_fashion_split(tmp_path, "test", 5, seed=4)
    fashion = data.load_fashion_mnist(tmp_path, image_size=32)
    images, labels = fashion["train"]
    assert images.dtype == torch.uint8 and images.shape == (12, 1, 32, 32)
    assert torch.equal(images[:, 0, 2:30, 2:30], torch.from_numpy(train_images))  # padded 2 pixels each side
    assert images[:, :, :2].sum() == 0 and images[:, :, :, 30:].sum() == 0
    assert labels.dtype == torch.int64 and labels.tolist() == train_labels.tolist()
    assert torch.equal(fashion["val"][0][:, 0, 2:30, 2:30], torch.from_numpy(test_images))
    assert fashion["val"][1].tolist() == test_labels.tolist()
    assert fashion["path"] == str(tmp_path) and "12 training images" in fashion["note"]
    assert data.load_fashion_mnist(tmp_path, image_size=14)["train"][0].shape == (12, 1, 14, 14)


def test_idx_errors(tmp_path):
    write_idx(tmp_path / "good.gz", np.zeros((3, 4, 4)))
    raw = gzip.decompress((tmp_path / "good.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "short.gz")
    (tmp_path / "text.gz").write_bytes(gzip.compress(b"hello world"))
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "text.gz")
    (tmp_path / "broken.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="cannot read"):
        data.read_idx(tmp_path / "broken.gz")


def test_fashion_mnist_download_then_offline_fallback(tmp_path, monkeypatch, capsys):
    mirror = tmp_path / "mirror"
    write_fashion_split(mirror, "train", 6, seed=5)
    write_fashion_split(mirror, "test", 1003, seed=6)
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", [])
    monkeypatch.setattr(data, "FASHION_MNIST_URL", mirror.as_uri() + "/")
    fashion = data.load_fashion_mnist(tmp_path / "downloaded", image_size=28)
    assert "downloading" in capsys.readouterr().out
    assert len(fashion["train"][1]) == 6 and len(fashion["val"][1]) == 1003
    assert sorted(p.name for p in (tmp_path / "downloaded").iterdir()) == sorted(
        data.FASHION_MNIST_FILES["train"] + data.FASHION_MNIST_FILES["test"])

    # Offline, with only the test split (as shipped in the repository): train on it minus its last 1,000.
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name in data.FASHION_MNIST_FILES["test"]:
        (shipped / name).write_bytes((mirror / name).read_bytes())
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", [shipped])
    monkeypatch.setattr(data, "FASHION_MNIST_URL", (tmp_path / "offline").as_uri() + "/")
    fashion = data.load_fashion_mnist(tmp_path / "empty", image_size=28)
    test_images = fashion["train"][0].tolist() + fashion["val"][0].tolist()
    assert len(fashion["train"][1]) == 3 and len(fashion["val"][1]) == 1000
    assert test_images == [[image] for image in data.read_idx(shipped / "t10k-images-idx3-ubyte.gz").tolist()]
    assert "not found" in fashion["note"] and "last 1000" in fashion["note"] and "\n" not in fashion["note"]
    assert fashion["path"] == str(shipped)


def test_shipped_test_split_is_the_official_one():
    shipped = REPO / "data" / "fashion-mnist"
    images = data.read_idx(shipped / "t10k-images-idx3-ubyte.gz")
    labels = data.read_idx(shipped / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10


def test_image_folder(tmp_path, capsys):
    for name, color in (("cat", (255, 0, 0)), ("ant", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for i in range(2):
            # 40 x 20: the centered 20 x 20 square has the class color, the sides are green.
            image = np.zeros((20, 40, 3), np.uint8)
            image[:, :, 1] = 255
            image[:, 10:30] = color
            Image.fromarray(image).save(tmp_path / name / f"{i}.png")
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "ant" / ".DS_Store").write_bytes(b"hidden")
    images, labels, class_names = data.load_image_folder(tmp_path, 8)
    assert class_names == ["ant", "cat"] and labels.tolist() == [0, 0, 1, 1]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8)
    # center crop: class color everywhere, the green sides cropped away (bicubic blurs the border a little)
    assert (images[:2, 2] > 230).all() and (images[:2, :2] < 30).all()  # ant: blue
    assert (images[2:, 0] > 230).all() and (images[2:, 1:] < 30).all()  # cat: red
    assert "skipped 1 unreadable file" in capsys.readouterr().out

    with pytest.raises(ValueError, match="not a directory"):
        data.load_image_folder(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        data.load_image_folder(tmp_path / "empty", 8)
    (tmp_path / "empty" / "dog").mkdir()
    (tmp_path / "empty" / "dog" / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="no readable image"):
        data.load_image_folder(tmp_path / "empty", 8)


# ------------------------------------------------------------------------------- objective and EMA


def test_flow_matching_loss_by_hand():
    class Affine(nn.Module):  # v = 0.5 x_t + t + y, a model whose output is easy to write down
        def forward(self, x, t, y, return_hidden=None):
            return 0.5 * x + t.view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1).float()

    generator = torch.Generator().manual_seed(0)
    x, noise = torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 2, 4, 4, generator=generator)
    t, y = torch.tensor([0.0, 0.3, 1.0]), torch.tensor([0, 1, 2])
    loss, hidden = train.flow_matching_loss(Affine(), x, y, t, noise)
    for i in range(3):
        ti = t[i].item()
        x_t = ti * x[i].numpy() + (1 - ti) * noise[i].numpy()
        velocity = 0.5 * x_t + ti + y[i].item()
        expected = np.mean((velocity - (x[i].numpy() - noise[i].numpy())) ** 2)
        assert loss[i].item() == pytest.approx(expected, rel=1e-5)
    assert hidden is None and loss.shape == (3,)


def test_t_bins():
    sums, counts = train.t_bin_sums(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([0.0, 0.2, 0.5, 0.99, 1.0]))
    assert sums.tolist() == [3.0, 0.0, 3.0, 9.0] and counts.tolist() == [2, 0, 1, 2]


def test_ema_update_rule():
    torch.manual_seed(0)
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in ema.parameters()]
    train.update_ema(ema, model, 0.9)
    for old, new, param in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * param)
    train.update_ema(ema, model, 0.0)
    for new, param in zip(ema.parameters(), model.parameters()):
        assert torch.equal(new, param)


def test_defaults_and_run_name():
    args = train.parse_args(["--router", "dar", "--chunk", "4"])
    assert (args.model, args.lr, args.ema_decay, args.run_name) == ("SiT-T/4", 1e-3, 0.995, "SiT-T-4-dar-static-c4")
    args = train.parse_args(["--model", "SiT-XL/2"])
    assert (args.lr, args.ema_decay, args.run_name) == (1e-4, 0.9999, "SiT-XL-2-residual")
    args = train.parse_args(["--model", "SiT-N48/4"])  # the deep study's depth series: CPU configs too
    assert (args.lr, args.ema_decay, args.run_name) == (1e-3, 0.995, "SiT-N48-4-residual")
    args = train.parse_args(["--router", "dar", "--query", "timestep", "--logit-scale", "one"])
    assert args.run_name == "SiT-T-4-dar-timestep-c1-logit-one"
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "x", "--data-dir", "y"])


def test_a_chunk_that_never_closes_is_refused(capsys):
    """SiT-T/4 has 24 sublayers: --chunk 23 is a chunk, --chunk 24 would be dense DAR under another name."""
    assert train.parse_args(["--router", "dar", "--chunk", "23"]).chunk == 23
    with pytest.raises(SystemExit):
        train.parse_args(["--router", "dar", "--chunk", "24"])
    assert "--chunk 24: SiT-T/4 has 24 sublayers, and a chunk of 24 or more never closes" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- checkpoints


KILL_AFTER_CHECKPOINT = """
import os, signal, sys, train
save = train.save_checkpoint
def save_then_die(checkpoint, *args, **kwargs):
    path = save(checkpoint, *args, **kwargs)
    if checkpoint["step"] == int(os.environ["KILL_AFTER_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return path
train.save_checkpoint = save_then_die
sys.argv[0] = "train.py"
train.main()
"""


@pytest.fixture(scope="module")
def finished_run(tiny_fashion, tmp_path_factory):
    """A tiny DAR run of 6 steps (crossing an epoch: 32 images / 8 = 4 steps per epoch), checkpoints at 3, 6."""
    results = tmp_path_factory.mktemp("results")
    args = [*TINY, "--data-dir", tiny_fashion, "--results-dir", results, "--router", "dar", "--chunk", "2",
            "--max-steps", "6", "--ckpt-every", "3", "--eval-every", "3", "--keep-ckpts", "0"]
    run_train(*args, "--run-name", "uninterrupted")
    return dict(args=args, run_dir=results / "uninterrupted", results=results)


def test_exact_resume_after_kill(finished_run):
    args, results = finished_run["args"], finished_run["results"]
    killed = run_train(*args, "--run-name", "killed", wrapper=KILL_AFTER_CHECKPOINT, check=False,
                       env={"KILL_AFTER_STEP": "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = results / "killed"
    assert latest_checkpoint(run_dir) == str(checkpoint_path(run_dir, 3))
    assert "resuming from" in run_train(*args, "--run-name", "killed", "--resume", "auto").stdout

    timing = ("images_per_s", "peak_mem_mb", "time_s")
    without_timing = lambda log: [{k: v for k, v in r.items() if k not in timing} for r in log]  # noqa: E731
    log, reference_log = read_log(run_dir), read_log(finished_run["run_dir"])
    assert without_timing(log) == without_timing(reference_log)  # every loss, t-bin, grad norm, val loss
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    ours = load_checkpoint(checkpoint_path(run_dir, 6))
    reference = load_checkpoint(checkpoint_path(finished_run["run_dir"], 6))
    for key in ("model", "ema"):
        for name, tensor in reference[key].items():
            assert torch.equal(ours[key][name], tensor), (key, name)
    for state, reference_state in zip(ours["opt"]["state"].values(), reference["opt"]["state"].values()):
        assert all(torch.equal(state[k], reference_state[k]) for k in reference_state)


def test_resume_survives_a_partial_last_log_line(tiny_fashion, tmp_path):
    base = [*TINY, "--data-dir", str(tiny_fashion), "--results-dir", str(tmp_path), "--run-name", "cut",
            "--ckpt-every", "2", "--eval-every", "100"]
    train.main(base + ["--max-steps", "3"])
    with open(tmp_path / "cut" / "log.jsonl", "a") as f:
        f.write('{"loss": 1.2345, "loss_t_bins": [1.0,')  # a crash or a full disk in the middle of a record
    train.main(base + ["--max-steps", "4", "--resume", "auto"])
    assert [r["step"] for r in read_log(tmp_path / "cut") if "loss" in r] == [1, 2, 3, 4]


def test_resume_before_the_first_checkpoint_restarts_the_log(tiny_fashion, tmp_path, capsys):
    base = [*TINY, "--data-dir", str(tiny_fashion), "--results-dir", str(tmp_path), "--run-name", "early",
            "--max-steps", "3", "--eval-every", "100"]
    train.main(base)
    for path in (tmp_path / "early" / "checkpoints").iterdir():  # as if killed before its first checkpoint
        path.unlink()
    capsys.readouterr()
    train.main(base + ["--resume", "auto"])
    assert "dropped the 4 record(s) after step 0" in capsys.readouterr().out
    assert [(r["step"], "loss" in r) for r in read_log(tmp_path / "early")] == [(1, True), (2, True), (3, True),
                                                                                  (3, False)]


def test_full_disk_during_a_save_keeps_the_run_resumable(tiny_fashion, tmp_path, monkeypatch, capsys):
    base = [*TINY, "--data-dir", str(tiny_fashion), "--results-dir", str(tmp_path), "--run-name", "full",
            "--max-steps", "3", "--ckpt-every", "1", "--keep-ckpts", "1", "--eval-every", "100"]
    run_dir, real_save = tmp_path / "full", torch.save

    def disk_full_at_step_2(checkpoint, f):  # torch.save's error when the disk fills up under it
        if checkpoint["step"] != 2:
            return real_save(checkpoint, f)
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1138")

    monkeypatch.setattr(torch, "save", disk_full_at_step_2)
    with pytest.raises(OSError, match=r"could not write checkpoint .*0000002.pt .*unexpected pos.*"
                                      r"a checkpoint needs about \d+ MB, \d+ MB are free there"):
        train.main(base)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["0000001.pt"]
    monkeypatch.setattr(torch, "save", real_save)

    # A kill left temp files, and the disk is still full: the error names the file it could not write.
    (run_dir / "checkpoints" / ".0000002.pt.tmp").write_bytes(b"x" * 1000)
    (run_dir / ".log.jsonl.tmp").write_text("partial")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match=r"could not write the log .*full/log.jsonl \(OSError: \[Errno 28\]"):
        train.main(base + ["--resume", "auto"])
    assert "removed" in capsys.readouterr().out and not list(run_dir.rglob("*.tmp"))
    monkeypatch.undo()
    train.main(base + ["--resume", "auto"])
    assert [r["step"] for r in read_log(run_dir) if "loss" in r] == [1, 2, 3]
    assert latest_checkpoint(run_dir) == str(checkpoint_path(run_dir, 3))


def test_resume_with_another_config_is_a_clear_error(finished_run):
    path = checkpoint_path(finished_run["run_dir"], 6)
    base = [str(a) for a in finished_run["args"]] + ["--run-name", "other"]
    with pytest.raises(ValueError, match=r"router: checkpoint 'dar', this run 'residual'"):
        train.main(base + ["--router", "residual", "--resume", str(path)])
    with pytest.raises(ValueError, match=r"chunk: checkpoint 2, this run 4"):
        train.main(base + ["--chunk", "4", "--resume", str(path)])
    result = run_train(*base, "--model", "SiT-T/4", "--resume", path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --resume")
    assert "name: checkpoint 'SiT-T/8', this run 'SiT-T/4'" in result.stderr


def test_corrupt_checkpoint_is_a_clear_error(finished_run, tmp_path):
    good = checkpoint_path(finished_run["run_dir"], 6).read_bytes()
    truncated, garbage = tmp_path / "truncated.pt", tmp_path / "garbage.pt"
    truncated.write_bytes(good[: len(good) * 2 // 3])
    garbage.write_bytes(os.urandom(1000))
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match="truncated or corrupt"):
            load_model(path)
    base = [str(a) for a in finished_run["args"]] + ["--run-name", "corrupt"]
    with pytest.raises(ValueError, match="^--resume .*truncated.pt is truncated or corrupt"):
        train.main(base + ["--resume", str(truncated)])
    with pytest.raises(ValueError, match="^--resume .* is a directory; expected a checkpoint file"):
        train.main(base + ["--resume", str(finished_run["run_dir"])])
    with pytest.raises(ValueError, match="^--ckpt .*truncated.pt is truncated or corrupt"):  # sample.py's flag
        sample.main(["--ckpt", str(truncated), "--out", str(tmp_path / "x.npz")])
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")


def test_load_model_and_fresh_run_guard(finished_run):
    model, checkpoint = load_model(checkpoint_path(finished_run["run_dir"], 6))
    assert not model.training and checkpoint["step"] == 6 and checkpoint["data"]["name"] == "fashion-mnist"
    assert checkpoint["model_config"]["name"] == "SiT-T/8" and checkpoint["args"]["router"] == "dar"
    for name, tensor in checkpoint["ema"].items():
        assert torch.equal(model.state_dict()[name], tensor)
    x = torch.zeros(2, 1, 16, 16)
    assert model(x, torch.rand(2), torch.tensor([1, 10])).shape == x.shape  # label 10: the null class
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train.main([str(a) for a in finished_run["args"]] + ["--run-name", "uninterrupted"])


# ------------------------------------------------------------------------------------------ --init-from


def test_init_from_sit_weights_into_dar(tiny_fashion, tmp_path, capsys):
    base = [*TINY, "--data-dir", str(tiny_fashion), "--results-dir", str(tmp_path), "--eval-every", "100"]
    train.main(base + ["--router", "residual", "--max-steps", "2", "--ckpt-every", "2"])
    source = load_checkpoint(checkpoint_path(tmp_path / "SiT-T-8-residual", 2))
    raw = tmp_path / "SiT-T-8.pt"  # a bare state dict, as SiT's released checkpoints are
    torch.save(source["ema"], raw)
    config = dict(source["model_config"], router="dar", chunk=2)
    torch.manual_seed(0)  # as train.py seeds before it creates the model
    fresh = create_model(config.pop("name"), **config)
    fresh_router = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("router.")}

    # lr 0: the weights a run starts from are the weights it saves after its first step
    for path, run in ((checkpoint_path(tmp_path / "SiT-T-8-residual", 2), "from-checkpoint"), (raw, "from-raw")):
        train.main(base + ["--router", "dar", "--chunk", "2", "--init-from", str(path), "--lr", "0",
                           "--max-steps", "1", "--ckpt-every", "1", "--run-name", run])
        assert f"initialized from {path}" in capsys.readouterr().out
        started = load_checkpoint(checkpoint_path(tmp_path / run, 1))
        assert started["step"] == 1 and started["model_config"]["router"] == "dar"
        for key in ("model", "ema"):
            for name, tensor in started[key].items():
                if name.startswith("router."):
                    assert torch.equal(tensor, fresh_router[name]), name
                else:
                    assert torch.equal(tensor, source["ema"][name]), (key, name)
        assert fresh_router and all(k in started["model"] for k in fresh_router)

    # Uniform routing weights give the running sum over the source count, which every reader's LayerNorm
    # undoes: a static DAR started from residual weights computes what they compute, up to LayerNorm's eps.
    residual = load_model(checkpoint_path(tmp_path / "SiT-T-8-residual", 2))[0].double()
    with torch.no_grad():  # away from adaLN-Zero's zeros, which would hide any difference
        for parameter in residual.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    torch.save(residual.state_dict(), tmp_path / "perturbed.pt")
    x, t, y = torch.randn(4, 1, 16, 16, dtype=torch.float64), torch.rand(4, dtype=torch.float64), torch.arange(4)
    outputs = {}
    for query in ("static", "timestep"):
        dar = create_model(source["model_config"]["name"], **dict(config, query=query)).double().eval()
        train.init_from(dar, tmp_path / "perturbed.pt")
        outputs[query] = dar(x, t, y)
    torch.testing.assert_close(outputs["static"], residual(x, t, y), rtol=0, atol=1e-4)
    assert not torch.allclose(outputs["timestep"], residual(x, t, y), atol=1e-2)  # e(t) moves its queries

    train.main(base + ["--router", "dar", "--chunk", "2", "--init-from", str(raw), "--max-steps", "2",
                       "--run-name", "trains"])
    log = read_log(tmp_path / "trains")
    with pytest.raises(ValueError, match="pass --resume auto instead of --init-from"):  # the same command again
        train.main(base + ["--router", "dar", "--chunk", "2", "--init-from", str(raw), "--run-name", "trains"])
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and np.isfinite(log[-1]["val_loss"])

    with pytest.raises(FileNotFoundError, match="--init-from .*missing.pt does not exist"):
        train.main(base + ["--init-from", str(tmp_path / "missing.pt"), "--run-name", "x"])
    (tmp_path / "garbage.pt").write_bytes(os.urandom(100))
    with pytest.raises(ValueError, match="--init-from .*garbage.pt is truncated or corrupt"):
        train.main(base + ["--init-from", str(tmp_path / "garbage.pt"), "--run-name", "x"])
    with pytest.raises(ValueError, match=r"--init-from .*shapes differ.*Is --model its config"):
        train.main(base + ["--model", "SiT-T/4", "--init-from", str(raw), "--run-name", "x"])
    torch.save({"step": 3}, tmp_path / "not-weights.pt")
    with pytest.raises(ValueError, match="neither a state dict nor a checkpoint"):
        train.main(base + ["--init-from", str(tmp_path / "not-weights.pt"), "--run-name", "x"])
    with pytest.raises(SystemExit):
        train.parse_args(["--init-from", str(raw), "--resume", "auto"])


# ------------------------------------------------------------------------------------ NaN, precision


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_fashion, tmp_path, monkeypatch):
    real_loss, calls = train.flow_matching_loss, []

    def poisoned_from_fourth_step(model, *args, **kwargs):
        calls.extend([1] if model.training else [])  # training steps (not the checks of the weights saved)
        loss, hidden = real_loss(model, *args, **kwargs)
        return (loss * float("nan") if len(calls) >= 4 else loss), hidden

    monkeypatch.setattr(train, "flow_matching_loss", poisoned_from_fourth_step)
    args = [*TINY, "--data-dir", str(tiny_fashion), "--results-dir", str(tmp_path), "--run-name", "nan",
            "--max-steps", "8", "--ckpt-every", "2", "--eval-every", "100"]
    with pytest.raises(SystemExit, match=r"step 4: the loss is nan.*0000002.pt \(step 2, loss [0-9.]+\), is untouched"):
        train.main(args)
    run_dir = tmp_path / "nan"
    assert latest_checkpoint(run_dir) == str(checkpoint_path(run_dir, 2))
    model, _ = load_model(checkpoint_path(run_dir, 2), ema=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["step"] for r in read_log(run_dir)] == [1, 2, 3]


def test_divergence_is_stopped_before_it_is_saved(tiny_fashion, tmp_path):
    base = [*TINY, "--data-dir", str(tiny_fashion), "--results-dir", str(tmp_path), "--run-name", "diverge",
            "--ckpt-every", "1", "--keep-ckpts", "2", "--eval-every", "100"]
    run_dir = tmp_path / "diverge"
    train.main(base + ["--max-steps", "2"])
    good = {step: load_checkpoint(checkpoint_path(run_dir, step)) for step in (1, 2)}
    # lr 1e6: step 3's update explodes the weights, which step 3's own loss (before the update) cannot show
    with pytest.raises(SystemExit, match=r"step 3: after the update, the loss on the step's batch is "
                                         r"\S+(, over 10x the median .*)?; stopped without saving. The last good checkpoint, .*0000002.pt \(step 2, loss "
                                         + f"{good[2]['loss']:.4f}" + r"\), is untouched"):
        train.main(base + ["--max-steps", "8", "--resume", "auto", "--lr", "1e6"])
    assert latest_checkpoint(run_dir) == str(checkpoint_path(run_dir, 2))
    for step, checkpoint in good.items():
        for name, tensor in load_checkpoint(checkpoint_path(run_dir, step))["model"].items():
            assert torch.equal(tensor, checkpoint["model"][name])
    with pytest.raises(SystemExit, match="step 1: after the update.*stopped before any checkpoint was saved"):
        train.main(base + ["--run-name", "diverge-at-once", "--max-steps", "8", "--lr", "1e6"])
    assert latest_checkpoint(tmp_path / "diverge-at-once") is None


def test_bf16_run_and_final_sample_grid(tiny_fashion, tmp_path):
    train.main([*TINY, "--data-dir", str(tiny_fashion), "--results-dir", str(tmp_path), "--router", "dar",
                "--precision", "bf16", "--max-steps", "2", "--ckpt-every", "2", "--eval-every", "2",
                "--sample-grid", "3"])
    run_dir = tmp_path / "SiT-T-8-dar-static-c1"
    log = read_log(run_dir)
    assert np.isfinite(log[-1]["val_loss"]) and len(log) == 3
    with Image.open(run_dir / "samples.png") as grid:  # sample.py's grid: 10 rows of 3, 16 x 16 with 2-pixel gaps
        assert grid.size == (3 * 18 + 2, 10 * 18 + 2) and grid.mode == "L"


# ---------------------------------------------------------------------------------------------- DDP


def test_two_process_ddp_equals_one_process(tiny_fashion, tmp_path):
    # Label dropout is drawn by the model from each process's own generator, so its masks differ with the
    # number of processes by design; everything else (data shards, t, noise, gradient averaging) must agree.
    args = [*TINY, "--data-dir", tiny_fashion, "--results-dir", tmp_path, "--router", "dar", "--chunk", "2",
            "--max-steps", "3", "--ckpt-every", "3", "--eval-every", "3", "--label-dropout", "0"]
    run_train(*args, "--run-name", "one")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "train.py"), *map(str, args), "--run-name", "two"],
                            env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("step 3/3") == 1  # only rank 0 logs
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    reference = load_checkpoint(checkpoint_path(tmp_path / "one", 3))["model"]
    for name, tensor in load_checkpoint(checkpoint_path(tmp_path / "two", 3))["model"].items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6)


KILL_RANK_1 = """
import os, signal, sys, train
update, steps = train.update_ema, []
def update_then_die(*args):
    update(*args)
    steps.append(1)
    if os.environ["RANK"] == "1" and len(steps) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
train.update_ema = update_then_die
sys.argv[0] = "train.py"
train.main()
"""


def test_a_killed_rank_is_one_line_naming_it(tiny_fashion, tmp_path):
    (tmp_path / "kill_rank_1.py").write_text(KILL_RANK_1)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(tmp_path / "kill_rank_1.py"), *TINY, "--data-dir", str(tiny_fashion),
                             "--results-dir", str(tmp_path), "--max-steps", "50", "--ckpt-every", "1"],
                            env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "error: rank 1 (pid " in output and "continue with the same command and --resume auto" in output, output
    assert "Connection reset" not in output and "[rank0]" not in output, output


# --------------------------------------------------------------------------------------------- REPA


class PatchEncoder(nn.Module):
    """A small frozen encoder: a fixed random projection of each 8 x 8 patch, on the model's token grid."""
    z_dim = 16

    def __init__(self, grid_size):
        super().__init__()
        self.proj = nn.Conv2d(1, self.z_dim, kernel_size=16 // grid_size, stride=16 // grid_size)
        self.requires_grad_(False)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def test_repa_with_small_frozen_encoder_reduces_its_loss(tiny_fashion, tmp_path, monkeypatch):
    monkeypatch.setitem(train.REPA_ENCODERS, "patches", PatchEncoder)
    train.main([*TINY, "--data-dir", str(tiny_fashion), "--results-dir", str(tmp_path), "--run-name", "repa",
                "--router", "dar", "--chunk", "4", "--repa-encoder", "patches", "--repa-depth", "2",
                "--max-steps", "30", "--log-every", "5", "--ckpt-every", "30", "--eval-every", "30"])
    repa = [r["repa_loss"] for r in read_log(tmp_path / "repa") if "repa_loss" in r]
    assert len(repa) == 6 and repa[-1] < repa[0] - 0.1
    checkpoint = load_checkpoint(checkpoint_path(tmp_path / "repa", 30))
    assert "repa_projector" in checkpoint and checkpoint["args"]["repa_depth"] == 2


def test_dinov2_offline_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(OSError, match="could not load dinov2_vitb14 through torch.hub.*network"):
        train.DINOv2Encoder(grid_size=8)
