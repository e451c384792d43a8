"""The datasets of train.py (also read by sample.py, fid.py and diagnose.py), SD-VAE latent extraction,
and the way back from model space to images (uint8, PNG grids, VAE decoding).

Not a script: the scripts import it; the extraction runs as
    python train.py --extract-latents --data /path/to/imagenet/train --out latents/
    torchrun --nproc_per_node 8 train.py --extract-latents --data /path/to/imagenet/train --out latents/
and `python train.py --data latents/` trains on its output.

    Fashion-MNIST (IDX .gz files, found or downloaded)   load_fashion_mnist
    an image folder in ImageNet layout root/<class>/...   load_image_folder
    SD-VAE latents of an image folder                     extract_latents, LatentSet
    what train.py --data trains on, with its split        load_data
    model space -> uint8 images, a PNG grid, VAE decoding to_uint8, save_grid, latent_decoder
    sample.py's npz files, read back                      read_npz, check_images

Images are NCHW uint8 here; in model space they are float in [-1, 1] (to_model_space).

A latents directory (flat: files only) holds, for shard k (--shard-size consecutive images in sorted
class/file order):
    <k:05d>.moments.npy  float32 [n, 2, 2C, h, w]: for the image (copy 0) and its mirror image (copy 1),
                         the mean (channels :C) and std (C:) of the VAE posterior, times the VAE's scale
    <k:05d>.pixels.npy   uint8 [n, 3, S, S]: the ADM center crop the VAE encoded (for REPA's encoder)
    <k:05d>.labels.npy   int64 [n]
and meta.json: the settings (data, vae, scale, image_size, latent_shape, pixels, shard_size, class_names,
num_files) and, once every shard is written, complete, shard_counts and num_images.
"""
import copy
import gzip
import json
import math
import os
import struct
import sys
import time
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from checkpoint import write_atomically, write_json_atomically

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
REPO_DIR = Path(__file__).resolve().parent
# Searched after --data-dir, in this order. The repository ships the test split in data/fashion-mnist.
FASHION_MNIST_DIRS = [Path("data/fashion-mnist"), REPO_DIR / "data" / "fashion-mnist",
                      Path("/usr/share/datasets/fashion-mnist")]
SHIPPED_SPLIT_HOLDOUT = 1000  # the last images of the test split held out when it is all we have


def read_idx(path):
    """An IDX file of unsigned bytes (gzipped if it ends in .gz) as a numpy array of its shape."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read this IDX file ({err})") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic number 0x0000 08 nn)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise ValueError(f"{path}: shape {shape} needs {math.prod(shape)} bytes of data, the file has "
                         f"{len(data) - header} (truncated?)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _read_split(directory, split):
    image_file, label_file = FASHION_MNIST_FILES[split]
    images, labels = read_idx(directory / image_file), read_idx(directory / label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{directory}: {image_file} {images.shape} and {label_file} {labels.shape} do not "
                         f"form a split of [N, H, W] images with N labels")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def fit_to_size(images, image_size):
    """[N, C, H, W] uint8 -> [N, C, S, S]: zero-pad (Fashion-MNIST's black background) when S >= H, else
    area-resize."""
    pad = image_size - images.shape[-1]
    if pad >= 0:
        return F.pad(images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    resized = F.interpolate(images.float(), size=(image_size, image_size), mode="area")
    return resized.round().clamp(0, 255).to(torch.uint8)


def _download(url, destination):
    """Download to destination + '.part', then rename, so an interrupted download is never mistaken for data."""
    partial = destination.with_name(destination.name + ".part")
    with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        while chunk := response.read(1 << 20):
            f.write(chunk)
            done += len(chunk)
            print(f"\rdownloading {url}: {done / 1e6:.1f} / {total / 1e6:.1f} MB", end="", flush=True)
    print()
    os.replace(partial, destination)


def load_fashion_mnist(data_dir=None, image_size=32):
    """Fashion-MNIST as dict(train=(uint8 [N, 1, S, S], int64 [N]), val=(...), note=str, path=str).

    The full set (train + test files) is looked for in data_dir, ./data/fashion-mnist, the repository's
    data/fashion-mnist, /usr/share/datasets/fashion-mnist; if absent, downloaded into data_dir (default
    ./data/fashion-mnist). val is the official test split. Offline without the training split, it trains
    on the test split shipped with the repository, holding out its last 1,000 images, and says so in note.
    """
    search = ([Path(data_dir)] if data_dir else []) + FASHION_MNIST_DIRS
    has = lambda d, split: all((d / f).is_file() for f in FASHION_MNIST_FILES[split])  # noqa: E731
    full = next((d for d in search if has(d, "train") and has(d, "test")), None)
    download_error = None
    if full is None:
        target = search[0]
        try:
            target.mkdir(parents=True, exist_ok=True)
            for name in FASHION_MNIST_FILES["train"] + FASHION_MNIST_FILES["test"]:
                if not (target / name).is_file():
                    _download(FASHION_MNIST_URL + name, target / name)
            full = target
        except OSError as err:
            download_error = err
    if full is not None:
        train, val = _read_split(full, "train"), _read_split(full, "test")
        note = f"Fashion-MNIST from {full}: {len(train[1])} training images, {len(val[1])} validation (test split)"
        path = full
    else:
        path = next((d for d in search if has(d, "test")), None)
        if path is None:
            raise ValueError(f"Fashion-MNIST not found in {', '.join(map(str, search))} and the download failed "
                             f"({download_error}); put the four .gz files from "
                             f"https://github.com/zalandoresearch/fashion-mnist in --data-dir")
        images, labels = _read_split(path, "test")
        keep = len(labels) - SHIPPED_SPLIT_HOLDOUT
        train, val = (images[:keep], labels[:keep]), (images[keep:], labels[keep:])
        note = (f"Fashion-MNIST training split not found and not downloadable ({download_error}): training on "
                f"the {keep} first images of the test split in {path}, validating on its last "
                f"{SHIPPED_SPLIT_HOLDOUT}; for the full 60k set install the dataset-fashion-mnist package or "
                f"put train-*-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist in --data-dir")
    fit = lambda split: (fit_to_size(split[0], image_size), split[1])  # noqa: E731
    return dict(train=fit(train), val=fit(val), note=note, path=str(path))


#################################################################################
#                                 Image folders                                  #
#################################################################################

UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)  # what PIL raises for a file it cannot decode
DEFAULT_IMAGE_SIZE = 32  # --image-size for Fashion-MNIST (padded from 28) and image folders


def image_files(path):
    """(files, int64 labels, class names) of an image folder in ImageNet layout (root/<class>/<image>):
    classes are the sorted subfolder names, files sorted within each; hidden files are ignored."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--data {path}: not a directory; expected an image folder with one subfolder per class")
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise ValueError(f"--data {path}: no class subfolders; expected ImageNet layout {path}/<class>/<image>")
    files, labels = [], []
    for label, name in enumerate(class_names):
        found = sorted(p for p in (root / name).rglob("*") if p.is_file() and not p.name.startswith("."))
        files += found
        labels += [label] * len(found)
    return files, torch.tensor(labels, dtype=torch.int64), class_names


def load_image_folder(path, image_size):
    """An image folder in ImageNet layout (root/<class>/<image>) as (uint8 [N, 3, S, S], int64 [N], class names).

    Class indices follow the sorted folder names; every image is center-cropped to a square and resized
    to S x S in RGB. Unreadable files are skipped and counted; hidden files are ignored.
    """
    files, all_labels, class_names = image_files(path)
    images, labels, skipped = [], [], []
    for file, label in zip(files, all_labels.tolist()):
        try:
            with Image.open(file) as image:
                image = ImageOps.fit(image.convert("RGB"), (image_size, image_size), Image.Resampling.BICUBIC)
        except UNREADABLE:
            skipped.append(file)
            continue
        images.append(np.asarray(image))
        labels.append(label)
    if skipped:
        print(f"--data {path}: skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
    if not images:
        raise ValueError(f"--data {path}: no readable image in its {len(class_names)} class folder(s)")
    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(labels, dtype=torch.int64), class_names)


def center_crop_adm(image, size):
    """ADM's ImageNet preprocessing (used by DiT, SiT and REPA, and by the ADM reference batches): halve
    with a box filter while the short side is at least 2 * size, resize (bicubic) so that the short
    side is size, then cut out the central size x size square."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


#################################################################################
#                     SD-VAE latents (the paper's ImageNet setting)              #
#################################################################################

META_FILE = "meta.json"
SHARD_PARTS = ("moments", "pixels", "labels")  # written in this order: labels last


def shard_path(directory, shard, part):
    return Path(directory) / f"{shard:05d}.{part}.npy"


def load_vae(name, device="cpu"):
    """diffusers' AutoencoderKL `name` (a Hugging Face id such as stabilityai/sd-vae-ft-ema, or a folder
    written by save_pretrained), frozen, in eval mode. Only here (and so in what calls it) is diffusers needed."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError("SD-VAE latents need the diffusers package, which is not installed: "
                          "pip install diffusers") from None
    try:
        vae = AutoencoderKL.from_pretrained(str(name), low_cpu_mem_usage=False)
    except OSError as err:  # diffusers reports a missing folder, a bad id and no network alike as OSError
        reason = " ".join(str(err).split())  # one line: diffusers' messages span several
        raise OSError(f"--vae {name}: cannot load an AutoencoderKL from it ({reason}). A Hugging Face id needs "
                      f"network access the first time (then it is cached); or pass a save_pretrained folder") from None
    return vae.to(device).eval().requires_grad_(False)


class CroppedImages(Dataset):
    """(index, the ADM center crop as uint8 [S, S, 3], or None for an unreadable file) for a list of files;
    decoded in DataLoader workers."""

    def __init__(self, files, image_size):
        self.files, self.image_size = files, image_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        try:
            with Image.open(self.files[index]) as image:
                return index, np.asarray(center_crop_adm(image.convert("RGB"), self.image_size))
        except UNREADABLE:
            return index, None


@torch.no_grad()
def encode_moments(vae, pixels, scale):
    """uint8 [B, 3, S, S] -> float32 [B, 2, 2C, h, w]: the mean and std of the VAE posterior of each image
    (copy 0) and of its mirror image (copy 1), times scale.

    Moments rather than one sample, as REPA stores them: training draws z = mean + std * eps afresh at
    every step, like DiT encoding with a posterior sample on the fly (fast-DiT keeps a single sample)."""
    x = to_model_space(pixels)
    posterior = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    moments = torch.cat([posterior.mean, posterior.std], dim=1).float() * scale
    return moments.unflatten(0, (2, len(x))).transpose(0, 1)


def extraction_settings(args, vae):
    """What a latents directory must agree on to be resumed, and what meta.json records."""
    downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.image_size % downsampling:
        raise ValueError(f"--image-size {args.image_size}: must be a multiple of {downsampling}, the VAE's "
                         f"downsampling factor (256 for ImageNet 256)")
    latent_side = args.image_size // downsampling
    vae_name = str(Path(args.vae).resolve()) if Path(args.vae).is_dir() else args.vae
    return dict(data=str(Path(args.data).resolve()), vae=vae_name,
                scale=vae.config.scaling_factor,  # 0.18215 for the SD VAEs: latents of about unit variance
                image_size=args.image_size, latent_shape=[vae.config.latent_channels, latent_side, latent_side],
                pixels=not args.no_pixels, shard_size=args.shard_size)


def extract_latents(args, rank=0, world_size=1, device="cpu"):
    """train.py --extract-latents: encode the image folder --data into the latents directory --out.

    Shard k goes to process k mod world size. Every file is written atomically and a shard whose files
    all exist is skipped, so rerunning the same command after an interruption finishes the job. Whichever
    process finds every shard written when it is done writes the final meta.json (complete: true, which
    training requires), so no process waits for the others at the end (no collective timeout).
    """
    out = Path(args.out)
    files, labels, class_names = image_files(args.data)
    vae = load_vae(args.vae, device)
    settings = dict(extraction_settings(args, vae), class_names=class_names, num_files=len(files))
    meta_path = out / META_FILE
    if meta_path.is_file():
        previous = json.loads(meta_path.read_text())
        changed = [f"{key} {previous.get(key)!r} there, {value!r} now" for key, value in settings.items()
                   if key != "class_names" and previous.get(key) != value]
        changed += ["other class folders"] if previous.get("class_names") != class_names else []
        if changed:
            raise ValueError(f"--out {out} holds an extraction with other settings ({'; '.join(changed)}): "
                             f"choose another --out, or delete it to start over")
    elif out.is_dir() and any(not p.name.endswith(".tmp") for p in out.iterdir()):  # .tmp: a killed first write
        raise ValueError(f"--out {out}: not empty and without {META_FILE}, so not a latents directory: "
                         f"choose an empty or new directory")
    if dist.is_initialized():
        dist.barrier()  # every process has checked --out before any writes to it
    if not meta_path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomically(meta_path, dict(settings, complete=False), "latents metadata")

    num_shards = math.ceil(len(files) / args.shard_size)
    parts = [part for part in SHARD_PARTS if part != "pixels" or settings["pixels"]]
    shard_done = lambda k: all(shard_path(out, k, part).is_file() for part in parts)  # noqa: E731
    todo = [k for k in range(rank, num_shards, world_size) if not shard_done(k)]
    rows_of = lambda k: range(k * args.shard_size, min((k + 1) * args.shard_size, len(files)))  # noqa: E731
    total = sum(len(rows_of(k)) for k in todo)
    if rank == 0:
        print(f"--extract-latents: {len(files)} images in {len(class_names)} classes -> {num_shards} shards in "
              f"{out} ({sum(shard_done(k) for k in range(num_shards))} already written), "
              f"{world_size} process(es) on {torch.device(device).type}; {args.vae}, {args.image_size}px -> "
              f"{settings['latent_shape']} latents", flush=True)
    done, start = 0, time.time()
    for k in todo:
        rows = rows_of(k)
        loader = DataLoader(CroppedImages([files[i] for i in rows], args.image_size), batch_size=args.vae_batch_size,
                            num_workers=args.num_workers, collate_fn=list)
        moments, pixels, kept = [], [], []
        for batch in loader:
            readable = [(i, image) for i, image in batch if image is not None]
            if readable:
                batch_pixels = torch.from_numpy(np.stack([image for _, image in readable])).permute(0, 3, 1, 2)
                moments.append(encode_moments(vae, batch_pixels.to(device), settings["scale"]).cpu())
                pixels += [batch_pixels] if settings["pixels"] else []
                kept += [rows[i] for i, _ in readable]
            done += len(batch)
            if rank == 0:
                rate = done / max(time.time() - start, 1e-9)
                print(f"\rshard {k}: {done}/{total} images of this process ({rate:.1f} img/s, ~{rate * world_size:.1f} "
                      f"in all) | ETA {format_duration((total - done) / rate)}", end="", file=sys.stderr, flush=True)
        channels, side = 2 * settings["latent_shape"][0], settings["latent_shape"][1]
        arrays = dict(moments=torch.cat(moments) if moments else torch.zeros(0, 2, channels, side, side),
                      pixels=torch.cat(pixels) if pixels else torch.zeros(0, 3, args.image_size, args.image_size,
                                                                           dtype=torch.uint8),
                      labels=labels[kept])
        for part in parts:
            write_atomically(shard_path(out, k, part), lambda f: np.save(f, arrays[part].numpy()), "latents shard")
    if rank == 0 and todo:
        print(file=sys.stderr)

    if all(shard_done(k) for k in range(num_shards)):  # the last process to finish writes the final meta.json
        counts = [len(np.load(shard_path(out, k, "labels"), mmap_mode="r")) for k in range(num_shards)]
        meta = dict(settings, complete=True, shard_counts=counts, num_images=sum(counts))
        write_json_atomically(meta_path, meta, "latents metadata")
        for stale in out.glob(".[0-9]*.tmp"):  # shard files of killed runs; every shard is written by now
            stale.unlink(missing_ok=True)
        print(f"rank {rank}: {out} is complete: {sum(counts)} images"
              + (f" ({len(files) - sum(counts)} unreadable files skipped)" if sum(counts) < len(files) else ""))
    else:
        print(f"rank {rank}: done with its shards; the last process to finish completes {meta_path}")


class LatentSet:
    """Rows of a complete latents directory (extract_latents), memory-mapped: nothing is read until asked.

    labels: int64 [N]; sample_shape: (C, h, w); moments(index, flip) and pixels(index, flip) read rows
    `index` (positions in this set), of the mirror image where flip is 1."""

    def __init__(self, directory):
        self.directory = directory = Path(directory)
        meta_path = directory / META_FILE
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--data {directory}: cannot read {META_FILE} ({err})") from None
        if not self.meta.get("complete"):
            raise ValueError(f"--data {directory}: its extraction is unfinished ({META_FILE} says so): run the "
                             f"same train.py --extract-latents command again to finish it")
        parts = ("moments", "pixels") if self.meta["pixels"] else ("moments",)
        num_shards = len(self.meta["shard_counts"])
        missing = [shard_path(directory, k, part) for k in range(num_shards) for part in (*parts, "labels")
                   if not shard_path(directory, k, part).is_file()]
        if missing:
            raise ValueError(f"--data {directory}: {len(missing)} shard file(s) missing, e.g. {missing[0].name}: "
                             f"run the train.py --extract-latents command again to rewrite them")
        self.shards = {part: [np.load(shard_path(directory, k, part), mmap_mode="r") for k in range(num_shards)]
                       for part in parts}
        self.starts = np.cumsum([0] + self.meta["shard_counts"])
        self.labels = torch.from_numpy(np.concatenate([np.load(shard_path(directory, k, "labels"))
                                                       for k in range(num_shards)]))
        self.rows = torch.arange(len(self.labels))
        self.sample_shape = tuple(self.meta["latent_shape"])

    def __len__(self):
        return len(self.rows)

    def subset(self, index):
        """The rows `index` of this set, as a LatentSet."""
        part = copy.copy(self)
        part.rows, part.labels = self.rows[index], self.labels[index]
        return part

    def locate(self, index):
        """(shard, row in the shard) of each of the rows `index`."""
        rows = self.rows[index].numpy()
        shards = np.searchsorted(self.starts, rows, side="right") - 1
        return zip(shards, rows - self.starts[shards])

    def moments(self, index, flip):
        """(mean, std), float32 [B, C, h, w] each, of the posteriors of rows `index` (flip 1: the mirror's)."""
        arrays = self.shards["moments"]
        moments = np.stack([arrays[s][i, f] for (s, i), f in zip(self.locate(index), flip.tolist())])
        return torch.from_numpy(moments).chunk(2, dim=1)

    def pixels(self, index, flip):
        """uint8 [B, 3, S, S] images of rows `index`, mirrored where flip is 1."""
        if "pixels" not in self.shards:
            raise ValueError(f"--data {self.directory}: extracted with --no-pixels, it holds no images")
        images = torch.from_numpy(np.stack([self.shards["pixels"][s][i] for s, i in self.locate(index)]))
        return torch.where(flip.view(-1, 1, 1, 1).bool(), images.flip(-1), images)


#################################################################################
#                               What train.py reads                              #
#################################################################################

def held_out_split(count, path):
    """(train rows, validation rows): 1,000 images (at most a tenth) picked by a seed independent of --seed."""
    if count < 2:
        raise ValueError(f"--data {path}: needs at least 2 readable images (train and validation)")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    num_val = max(1, min(1000, count // 10))
    return order[num_val:], order[:num_val]


def load_data(args):
    """(train images, train labels, val images, val labels, the checkpoint's "data" dict, a note line).

    The images are uint8 [N, C, S, S] tensors, or LatentSets for a latents directory (one with meta.json)."""
    if args.data and (Path(args.data) / META_FILE).exists():
        latents = LatentSet(args.data)
        meta = latents.meta
        if args.image_size not in (None, meta["image_size"]):
            raise ValueError(f"--image-size {args.image_size}: {args.data} holds the latents of {meta['image_size']}px "
                             f"images, which fix the size: drop --image-size")
        train, val = held_out_split(len(latents), args.data)
        info = dict(name="latents", path=str(args.data), channels=meta["latent_shape"][0],
                    num_classes=len(meta["class_names"]), image_size=meta["latent_shape"][1], vae=meta["vae"],
                    scale=meta["scale"], pixel_size=meta["image_size"], class_names=meta["class_names"])
        note = (f"latents {args.data} ({meta['image_size']}px images through {meta['vae']}, latents "
                f"{'x'.join(map(str, meta['latent_shape']))}): {len(train)} training images, {len(val)} validation, "
                f"{len(meta['class_names'])} classes")
        return latents.subset(train), latents.labels[train], latents.subset(val), latents.labels[val], info, note
    image_size = args.image_size or DEFAULT_IMAGE_SIZE
    if args.data:
        images, labels, class_names = load_image_folder(args.data, image_size)
        train, val = held_out_split(len(labels), args.data)
        info = dict(name="folder", path=str(args.data), channels=3, num_classes=len(class_names),
                    image_size=image_size, class_names=class_names)
        note = (f"image folder {args.data}: {len(train)} training images, {len(val)} validation, "
                f"{len(class_names)} classes")
        return images[train], labels[train], images[val], labels[val], info, note
    fashion = load_fashion_mnist(args.data_dir, image_size)
    info = dict(name="fashion-mnist", path=fashion["path"], channels=1, num_classes=10, image_size=image_size)
    return (*fashion["train"], *fashion["val"], info, fashion["note"])


def to_model_space(images):
    """uint8 -> float in [-1, 1] (the project's convention)."""
    return images.float() / 127.5 - 1


def format_duration(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def read_npz(path, select, expected):
    """(the names of the arrays of the npz at `path`, {name: array} of those select(names) picks); anything
    but an npz (random bytes, a pickle, a bare .npy, a truncated file) is an error naming the file and `expected`."""
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("not a zip of .npy arrays")
        with np.load(path) as f:
            names = set(f.files)
            return names, {name: f[name] for name in select(names)}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(f"{path}: not a readable npz ({err}); expected {expected}") from None


def check_images(images, what):
    """`images` if they are uint8 NHWC [N, H, W, 1 or 3], as sample.py writes them (fid.py, diagnose.py
    --spectrum); else an error naming `what` (NCHW or float images would otherwise be read as something else)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 images [N, H, W, 1 or 3] (NHWC, as sample.py writes), got "
                         f"{images.dtype} {tuple(images.shape)}")
    return images


GRID_MAX = 16  # save_grid shows at most 16 rows of 16 images


def to_uint8(x):
    """Model space [-1, 1] -> uint8 (the inverse of x = uint8 / 127.5 - 1)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images, labels, path, by_class):
    """PNG grid of uint8 NCHW images: one row per class (in order of first appearance) when by_class,
    else the first images in a near-square grid. 1-channel images give a grayscale PNG."""
    if by_class:
        classes = list(dict.fromkeys(labels.tolist()))[:GRID_MAX]
        rows = [images[labels == c][:GRID_MAX] for c in classes]
    else:
        count = min(len(images), GRID_MAX * GRID_MAX)
        columns = math.ceil(math.sqrt(count))
        rows = [images[i:i + columns] for i in range(0, count, columns)]
    columns = max(len(r) for r in rows)
    channels, height, width = images.shape[1:]
    pad = 2
    grid = torch.zeros(channels, len(rows) * (height + pad) + pad, columns * (width + pad) + pad, dtype=torch.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            grid[:, top:top + height, left:left + width] = image
    array = grid.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if channels == 1 else array).save(path)


def latent_decoder(data, vae=None, device="cpu"):
    """For a checkpoint trained on SD-VAE latents (its "data" entry): latents -> images in [-1, 1] through
    its VAE (or `vae`, a Hugging Face id or folder), undoing the scale applied at extraction. Else None."""
    if data.get("name") != "latents":
        return None
    autoencoder, scale = load_vae(vae or data["vae"], device), data["scale"]
    return lambda z: autoencoder.decode(z / scale).sample
