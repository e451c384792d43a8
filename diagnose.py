"""Diagnose cross-layer routing in trained SiT checkpoints: the paper's three symptoms and its timestep routing.

The paper's diagnostic study (its Figs. 2 and 3, docs/method.md section 6) for any checkpoints, side by side, measured
on held-out images (the validation split of each checkpoint's dataset) noised to every t of a grid:
  1. forward magnitude: RMS of the hidden state each block hands on (for DAR the aggregated state the next
     block reads; for the last block h_final), per token over channels, averaged over tokens and images;
  2. backward magnitude: norm of dLoss/dh for the same hidden states, per image;
  3. redundancy: per-token cosine similarity of consecutive block outputs (block 1 against its input v_0);
  each overall (mean over the t grid) and per t; and
  4. routing against t: for DAR the weights alpha per (sublayer, source); for the residual baseline the
     counterfactual importance of each source, dLoss/dg for a scalar gate g = 1 on every term of the running
     sum (the forward is numerically unchanged).
The loss is the velocity MSE of the linear interpolant (method.md section 5), one per image, so dLoss/dh and dLoss/dg
do not depend on the batch size.

    python diagnose.py                          # the newest checkpoint of every run under results/
    python diagnose.py --ckpt results/SiT-T-4-residual --ckpt results/SiT-T-4-dar-static-c4/checkpoints/0001500.pt
    python diagnose.py --num-images 256 --t-grid 0.1,0.5,0.9 --layers 3,23,final

Prints a table (one row per block, one column group per checkpoint) and writes to --out-dir: diagnose.json
(every number), symptoms.png (Fig. 2 layout), symptoms_by_t.png, and routing_<run>_<step>.png per checkpoint
(Fig. 3 layout).

    python diagnose.py --curves residual=results/a-s0 residual=results/a-s1 "dar c4"=results/b-s0

draws the EMA validation curves of runs (from their log.jsonl) into <out-dir>/val_loss.png instead.

    python diagnose.py --redraw docs/study-deep/depth/diagnose.json

draws the figures of a diagnose.json again, without the checkpoints (routing figures only for the reports
that kept the consumers they draw).

    python diagnose.py --spectrum teacher=results/A/samples/X.npz "one-step G"=results/B/samples/Y.npz

measures high-frequency detail instead: the radially averaged power spectrum of generated images (sample.py
npz files) against real ones (--spectrum-ref: the Fashion-MNIST test split or an images npz), and the share of
spectral energy above half the Nyquist frequency (0.25 cycles/pixel) as a ratio to the real images' share
(1: as much fine detail as the data; below 1: smoother). Writes <out-dir>/spectrum.json and spectrum.png.
"""
import argparse
import functools
import json
import os
from contextlib import contextmanager

import torch
import torch.nn as nn

from checkpoint import (default_device, device_arg, in_range, latest_checkpoints, load_model, resolve_checkpoint,
                        validation_curve, write_json_atomically)
from data import check_images, load_data, read_npz, to_model_space
from flow import flow_matching_loss
from plot import draw_curves, draw_figures, draw_spectrum
from router import KERNEL_HELP, KERNELS, DARRouter, ResidualRouter, Route, Trace, check_kernel, chunk_sources

STATISTICS = ("rms", "grad_norm", "cosine")


#################################################################################
#             Counterfactual importance: the residual sum with gates             #
#################################################################################

class GatedResidualRouter(nn.Module):
    """The residual baseline written as h_l = sum_i g_{l,i} v_i, with every gate g_{l,i} = 1 (one per image).

    Summed left to right with unit gates, this is bit for bit the running stream of router.ResidualRouter, so
    the forward is unchanged, while dLoss/dg_{l,i} = <dLoss/dh_l, v_i> says how much consumer l's loss would
    move if source i were turned up. After a forward, gates[l-1] is consumer l's [N_l, B, 1, 1] gate tensor
    (l = 2L + 1 is the final layer). Holds no parameters: swap it in for a residual model's router.
    """

    def __init__(self, depth):
        super().__init__()
        self.depth = depth
        self.gates = []

    def start(self, v0, t_emb, trace=None, keep_hidden=None):
        self.gates = []
        return GatedResidualRoute(self.depth, v0, self.gates, trace, keep_hidden)


class GatedResidualRoute(Route):
    def __init__(self, depth, v0, gates, trace, keep_hidden):
        super().__init__(depth, trace, keep_hidden)
        self.sources = [v0]
        self.gates = gates

    def aggregate(self, l, shift, scale, final=False):
        v0 = self.sources[0]
        g = torch.ones(len(self.sources), v0.shape[0], 1, 1, dtype=v0.dtype, device=v0.device, requires_grad=True)
        self.gates.append(g)
        h = g[0] * v0
        for i in range(1, len(self.sources)):
            h = h + g[i] * self.sources[i]  # h_l = sum_i g_{l,i} v_i, in the order the running stream adds them
        return h

    def add(self, v):
        self.sources.append(v)


class InputRecorder(nn.Module):
    """Wraps a model's router and keeps v_0 (what block 1 reads), the reference of block 1's cosine."""

    def __init__(self, router):
        super().__init__()
        self.inner = router
        self.v0 = None

    def start(self, v0, t_emb, trace=None, keep_hidden=None):
        self.v0 = v0
        return self.inner.start(v0, t_emb, trace=trace, keep_hidden=keep_hidden)


@contextmanager
def swapped_router(model, router):
    original = model.router
    model.router = router
    try:
        yield router
    finally:
        model.router = original


#################################################################################
#                                  Measurements                                  #
#################################################################################

def token_rms(h):
    """[B]: RMS over channels of every token, averaged over tokens."""
    return h.pow(2).mean(dim=-1).sqrt().mean(dim=-1)


def token_cosine(a, b):
    """[B]: cosine similarity of a and b per token, averaged over tokens."""
    return torch.cosine_similarity(a, b, dim=-1).mean(dim=-1)


def block_statistics(model, x, y, t, noise):
    """One forward/backward on clean images x noised to t: {rms, grad_norm, cosine} as [L, B] tensors, and
    trace.alpha (DAR: [B, N_l] per consumer). The loss is a sum of per-image losses: dLoss/dh_b is image b's."""
    trace = Trace()
    with swapped_router(model, InputRecorder(model.router)) as recorder:
        loss = flow_matching_loss(functools.partial(model, trace=trace), x, y, t, noise)[0].sum()
    grads = torch.autograd.grad(loss, trace.hidden)
    hidden = [h.detach() for h in trace.hidden]
    previous = [recorder.v0.detach()] + hidden[:-1]
    stats = {
        "rms": torch.stack([token_rms(h) for h in hidden]),
        "grad_norm": torch.stack([g.flatten(1).norm(dim=1) for g in grads]),
        "cosine": torch.stack([token_cosine(h, p) for h, p in zip(hidden, previous)]),
    }
    return stats, [a.detach() for a in trace.alpha]


def gate_gradients(model, x, y, t, noise):
    """Residual models: dLoss_b/dg_{l,i} for every consumer l, as a list of [N_l, B] tensors."""
    with swapped_router(model, GatedResidualRouter(model.depth)) as gated:
        loss = flow_matching_loss(model, x, y, t, noise)[0].sum()
    return [g.flatten(1) for g in torch.autograd.grad(loss, gated.gates)]


def measure(model, images, labels, t_grid, batch_size=64, seed=0):
    """All numbers for one model on uint8 images [N, C, S, S] with labels [N], at every t of t_grid.

    Every image is noised once per t, with noise drawn from `seed` (the same for every checkpoint of a
    dataset). Returns means over the images: {"blocks": {statistic: [T][L]}, "routing": "alpha" (DAR),
    "importance" (residual) or None, and per consumer l = 1..2L+1: "by_consumer": [T][N_l] (alpha, or
    |dLoss/dg|), "signed_by_consumer": [T][N_l] (dLoss/dg, residual only)}.
    """
    param = next(model.parameters())
    routing = "alpha" if isinstance(model.router, DARRouter) else (
        "importance" if isinstance(model.router, ResidualRouter) else None)
    sums = {}  # key -> [T, ...] float64 sums over images

    def add(key, ti, values):
        if key not in sums:
            sums[key] = torch.zeros(len(t_grid), *values.shape, dtype=torch.float64)
        sums[key][ti] += values.detach().double().cpu()

    generator = torch.Generator().manual_seed(seed)
    for ti, t_value in enumerate(t_grid):
        noise = torch.randn(images.shape, generator=generator)
        for start in range(0, images.shape[0], batch_size):
            x = to_model_space(images[start:start + batch_size]).to(param.device, param.dtype)
            e = noise[start:start + batch_size].to(param.device, param.dtype)
            y = labels[start:start + batch_size].to(param.device)
            t = torch.full((x.shape[0],), t_value, device=param.device, dtype=param.dtype)
            stats, alpha = block_statistics(model, x, y, t, e)
            for name in STATISTICS:
                add(name, ti, stats[name].sum(dim=1))
            if routing == "alpha":
                for l, a in enumerate(alpha, start=1):
                    add(("by_consumer", l), ti, a.sum(dim=0))
            elif routing == "importance":
                for l, g in enumerate(gate_gradients(model, x, y, t, e), start=1):
                    add(("by_consumer", l), ti, g.abs().sum(dim=1))
                    add(("signed_by_consumer", l), ti, g.sum(dim=1))
    mean = {key: (total / images.shape[0]).tolist() for key, total in sums.items()}
    result = {"blocks": {name: mean[name] for name in STATISTICS}, "routing": routing}
    for kind in ("by_consumer", "signed_by_consumer"):
        if (kind, 1) in mean:
            result[kind] = [mean[(kind, l)] for l in range(1, 2 * model.depth + 2)]
    return result


def consumer_name(l, depth):
    if l == 2 * depth + 1:
        return "final aggregator"
    return f"sublayer {l} (block {(l + 1) // 2} {'attention' if l % 2 else 'MLP'})"


def source_labels(model, l):
    """Names of the sources consumer l reads (router.chunk_sources): v0 (the patch embedding), v_i (sublayer
    i's output), and for chunked DAR "c_n (v_a-v_b)", the summary of finished chunk n."""
    if not isinstance(model.router, DARRouter):
        return [f"v{i}" for i in range(l)]
    chunk = model.router.chunk
    return [f"v{first}" if first == last else f"c{last // chunk} (v{first}-v{last})"
            for first, last in chunk_sources(l, model.depth, chunk)]


#################################################################################
#                         Checkpoints and held-out images                        #
#################################################################################

def describe(path, ckpt):
    """A short name for a checkpoint: its run directory and step, e.g. SiT-T-4-residual@20000."""
    parent = os.path.dirname(os.path.abspath(path))
    run = os.path.basename(os.path.dirname(parent)) if os.path.basename(parent) == "checkpoints" else \
        os.path.splitext(os.path.basename(path))[0]
    return f"{run}@{ckpt['step']}"


def held_out_images(data, num_images, data_dir=None):
    """The first num_images images and labels of the validation split train.py made of a checkpoint's data."""
    name, path = data.get("name"), data_dir or data.get("path")
    if name not in ("fashion-mnist", "folder"):
        raise ValueError(f"checkpoint data {name!r}: diagnose.py reads 'fashion-mnist' or 'folder' data")
    images, labels = validation_split(name, path, data["image_size"])
    return images[:num_images], labels[:num_images]


@functools.lru_cache(maxsize=2)  # checkpoints compared side by side usually share their data
def validation_split(name, path, image_size):
    split = argparse.Namespace(data=path if name == "folder" else None,
                               data_dir=path if name == "fashion-mnist" else None, image_size=image_size)
    _, _, images, labels, _, _ = load_data(split)
    return images, labels


def parse_t_grid(text):
    """"K" -> the K bin centres (k + 0.5) / K; "0.1,0.5,0.9" -> those values."""
    try:
        if "," not in text and "." not in text:
            k = int(text)
            if k < 1:
                raise ValueError
            return [(i + 0.5) / k for i in range(k)]
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--t-grid {text!r}: expected a count (e.g. 10) or comma-separated t values in [0, 1]") from None
    if not all(0 <= v <= 1 for v in values):
        raise ValueError(f"--t-grid {text!r}: every t must lie in [0, 1] (0 = noise, 1 = data)")
    return values


def parse_layers(text, depth):
    """"shallow,deep,final" style list of consumers: sublayer numbers 1..2L or "final" (2L + 1).
    The default picks the attention sublayer of block L/4 + 1, that of the last block, and the final."""
    if text is None:
        return [2 * (depth // 4) + 1, 2 * depth - 1, 2 * depth + 1]
    layers = []
    for item in text.split(","):
        item = item.strip()
        if item == "final":
            layers.append(2 * depth + 1)
        elif item.isdigit() and 1 <= int(item) <= 2 * depth:
            layers.append(int(item))
        else:
            raise ValueError(f"--layers {text!r}: {item!r} is neither a sublayer number in 1..{2 * depth} "
                             f"(odd = attention, even = MLP) nor 'final'")
    return layers


#################################################################################
#                                     Report                                     #
#################################################################################

def diagnose_model(model, images, labels, t_grid, layers, batch_size=64, seed=0):
    """measure() arranged as a report: plain lists and numbers, JSON-ready, keyed by what they are."""
    measured = measure(model, images, labels, t_grid, batch_size=batch_size, seed=seed)
    report = {
        "depth": model.depth, "num_images": int(images.shape[0]), "t_grid": list(t_grid), "layers": layers,
        "by_t": measured["blocks"],
        "overall": {name: [sum(col) / len(col) for col in zip(*measured["blocks"][name])] for name in STATISTICS},
        "routing": measured["routing"],
    }
    if measured["routing"] is None:
        return report
    report["consumers"] = {}
    for l, per_t in enumerate(measured["by_consumer"], start=1):
        entry = {"name": consumer_name(l, model.depth), "sources": source_labels(model, l)}
        if measured["routing"] == "alpha":
            entry["alpha"] = per_t
        else:
            entry["importance_abs"] = per_t
            entry["importance_share"] = [[v / sum(row) if sum(row) > 0 else 0.0 for v in row] for row in per_t]
            entry["gate_gradient_mean"] = measured["signed_by_consumer"][l - 1]
        report["consumers"][str(l)] = entry
    return report


def diagnose_checkpoint(path, args):
    """Load one checkpoint and its held-out images, and return its report."""
    path = resolve_checkpoint(path, args.results_dir)
    model, ckpt = load_model(path, ema=args.weights == "ema", device=args.device, kernel=args.kernel,
                            what="--ckpt")
    images, labels = held_out_images(ckpt["data"], args.num_images, args.data_dir)
    layers = parse_layers(args.layers, model.depth)
    config = ckpt["model_config"]
    report = {"label": describe(path, ckpt), "checkpoint": os.path.abspath(path), "step": ckpt["step"],
              "weights": args.weights, "model": config["name"], "router": config.get("router", "residual"),
              "query": config.get("query"), "chunk": config.get("chunk"), "data": ckpt["data"]}
    report.update(diagnose_model(model, images, labels, args.t_grid, layers, args.batch_size, args.seed))
    return report


def print_table(reports):
    tags = [chr(ord("A") + k) if k < 26 else f"#{k}" for k in range(len(reports))]
    for tag, r in zip(tags, reports):
        print(f"[{tag}] {r['label']}  ({r['router']}, {r['num_images']} images x {len(r['t_grid'])} t, "
              f"{r['weights']} weights)  {r['checkpoint']}")
    print("rms: hidden-state RMS; grad: |dLoss/dh| per image; cos: cosine with the previous block; mean over t")
    header = "block" + "".join(f" | [{tag}] {'rms':>8} {'grad':>9} {'cos':>6}" for tag in tags)
    print(header)
    print("-" * len(header))
    for k in range(max(r["depth"] for r in reports)):
        cells = []
        for tag, r in zip(tags, reports):
            if k < r["depth"]:
                o = r["overall"]
                cells.append(f" | {' ' * (len(tag) + 2)} {o['rms'][k]:8.3g} {o['grad_norm'][k]:9.3g} {o['cosine'][k]:6.3f}")
            else:
                cells.append(" | " + " " * (len(tag) + 27))
        print(f"{k + 1:5d}" + "".join(cells))


#################################################################################
#                  High-frequency detail: power spectra (--spectrum)              #
#################################################################################

HIGH_FREQUENCY = 0.25  # cycles per pixel: half the Nyquist frequency


def power_spectrum(images):
    """The radially averaged power spectrum of square images [N, C, S, S] (any range; channels averaged):
    dict(frequency: the radii k / S for k = 1..S/2 in cycles per pixel, power: the mean |FFT|^2 / S^2 of the
    mean-free images over the frequencies of each radius bin, high_share: the share of all non-DC energy at
    radii above HIGH_FREQUENCY, the corners beyond Nyquist included)."""
    x = images.double().mean(dim=1)
    size = x.shape[-1]
    x = x - x.mean(dim=(-2, -1), keepdim=True)  # the DC term is brightness, not detail
    power = torch.fft.fft2(x).abs().pow(2).mean(dim=0) / size ** 2
    frequencies = torch.fft.fftfreq(size, dtype=torch.float64)
    radius = (frequencies[:, None] ** 2 + frequencies[None, :] ** 2).sqrt()
    bins = (radius * size).round().long()
    ks = range(1, size // 2 + 1)
    return dict(frequency=[k / size for k in ks], power=[power[bins == k].mean().item() for k in ks],
                high_share=(power[radius > HIGH_FREQUENCY].sum() / power.sum()).item())


def npz_images(path, count, flag="--spectrum"):
    """The first `count` images of an ADM-style npz (arr_0 uint8 NHWC) as float [N, C, S, S] in [0, 1]; errors
    name `flag`, the one that gave the path."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: no such file")
    expected = "an images npz (arr_0 uint8 [N, H, W, C], as sample.py writes)"
    try:
        names, arrays = read_npz(path, lambda names: names & {"arr_0"}, expected)
    except ValueError as err:
        raise ValueError(f"{flag} {err}") from None
    if "arr_0" not in names:
        raise ValueError(f"{flag} {path}: no arr_0; expected {expected}")
    images = check_images(arrays["arr_0"], f"{flag} {path}")[:count]
    images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"{flag} {path}: the images are {images.shape[-2]}x{images.shape[-1]}, not square")
    return images


def spectrum_report(specs, reference, count, data_dir=None):
    """--spectrum LABEL=NPZ ... against --spectrum-ref: [dict(label, frequency, power, high_share, ratio)], the
    reference first (ratio 1)."""
    sets = [(label, npz_images(path, count)) for label, path in parse_pairs(specs, "--spectrum", os.path.isfile)]
    size = sets[0][1].shape[-1]
    if any(images.shape[-1] != size for _, images in sets):
        raise ValueError("--spectrum: the npz files hold images of different sizes")
    if reference == "fashion-mnist":
        real = to_model_space(held_out_images(dict(name="fashion-mnist", image_size=size), count, data_dir)[0])
        real = (real + 1) / 2
    else:
        real = npz_images(reference, count, "--spectrum-ref")
        if real.shape[-1] != size:
            raise ValueError(f"--spectrum-ref {reference}: {real.shape[-1]}px images, the samples are {size}px")
    rows = [dict(label=f"real ({reference})", num_images=len(real), **power_spectrum(real))]
    rows += [dict(label=label, num_images=len(images), **power_spectrum(images)) for label, images in sets]
    for row in rows:
        row["ratio"] = row["high_share"] / rows[0]["high_share"]
    return rows


def parse_pairs(specs, flag, exists):
    """LABEL=PATH ... -> [(label, path)], each path passing `exists`."""
    pairs = []
    for spec in specs:
        label, separator, path = spec.rpartition("=")
        if not separator or not label or not exists(path):
            raise ValueError(f"{flag} {spec!r}: expected LABEL=PATH with an existing path")
        pairs.append((label, path))
    return pairs


def parse_curves(specs):
    """--curves LABEL=RUN_DIR ... -> [(label, run directory)]."""
    return parse_pairs(specs, "--curves", os.path.isdir)


def run_curves(runs):
    """[(label, run directory)] -> [(label, its EMA validation curve [(step, loss)])], as plot.draw_curves takes."""
    curves = []
    for label, run_dir in runs:
        curve = validation_curve(run_dir)
        if not curve:
            raise ValueError(f"--curves {label}={run_dir}: no validation records in {run_dir}/log.jsonl")
        curves.append((label, curve))
    return curves


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", action="append", help="checkpoint file or run directory to diagnose (repeat to compare); "
                        "default: the newest checkpoint of every run under --results-dir")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--out-dir", default=None, help="where the JSON and figures go (default: <results-dir>/diagnose)")
    parser.add_argument("--num-images", type=in_range(int, 1), default=128, help="held-out images per t")
    parser.add_argument("--t-grid", default="10", help="a count K (bin centres (k + 0.5) / K) or t values like 0.1,0.5,0.9")
    parser.add_argument("--layers", default=None, help="consumers whose routing to draw: sublayer numbers "
                        "1..2L (odd = attention, even = MLP) and/or 'final'; default: a shallow, a deep, final")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    parser.add_argument("--batch-size", type=in_range(int, 1), default=64)
    parser.add_argument("--seed", type=in_range(int, 0), default=0)
    parser.add_argument("--data-dir", default=None, help="override the dataset path stored in the checkpoints")
    parser.add_argument("--device", type=device_arg, default=default_device())
    parser.add_argument("--kernel", default="auto", choices=KERNELS, help=KERNEL_HELP + " (to compare, pass "
                        "another --out-dir too)")
    parser.add_argument("--curves", nargs="+", metavar="LABEL=RUN_DIR", default=None,
                        help="instead of diagnosing checkpoints: draw the validation curves of these runs into "
                        "<out-dir>/val_loss.png (runs sharing a label are seeds; the first label is the reference)")
    parser.add_argument("--curves-title", default="validation loss on the fixed held-out batch")
    parser.add_argument("--spectrum", nargs="+", metavar="LABEL=NPZ", default=None,
                        help="instead of diagnosing checkpoints: the power spectra and high-frequency ratios of these "
                        "sample.py npz files, into <out-dir>/spectrum.json and spectrum.png")
    parser.add_argument("--spectrum-ref", default="fashion-mnist", metavar="NPZ",
                        help="the real images of --spectrum: 'fashion-mnist' (its test split) or an images npz")
    parser.add_argument("--spectrum-images", type=int, default=1000, help="images of each set for --spectrum")
    parser.add_argument("--redraw", metavar="DIAGNOSE_JSON", default=None,
                        help="instead of diagnosing checkpoints: draw the figures of this diagnose.json again, into "
                        "--out-dir (default: the folder holding it)")
    args = parser.parse_args(argv)
    try:
        check_kernel(args.kernel, args.device)
    except ValueError as e:
        parser.error(str(e))
    if args.redraw:
        try:
            redraw(args.redraw, args.out_dir or os.path.dirname(os.path.abspath(args.redraw)))
        except ValueError as e:
            parser.error(str(e))
        return None
    if args.spectrum:
        if args.spectrum_images < 1:
            parser.error("--spectrum-images must be >= 1")
        if args.spectrum_ref != "fashion-mnist" and not os.path.isfile(args.spectrum_ref):
            parser.error(f"--spectrum-ref {args.spectrum_ref}: neither 'fashion-mnist' nor an existing npz file")
        try:
            rows = spectrum_report(args.spectrum, args.spectrum_ref, args.spectrum_images, args.data_dir)
        except ValueError as e:
            parser.error(str(e))
        out_dir = args.out_dir or os.path.join(args.results_dir, "diagnose")
        os.makedirs(out_dir, exist_ok=True)
        print(f"{'set':40s} {'images':>6s} {'share > ' + str(HIGH_FREQUENCY):>12s} {'ratio':>7s}")
        for row in rows:
            print(f"{row['label']:40s} {row['num_images']:6d} {row['high_share']:12.5f} {row['ratio']:7.3f}")
        with open(os.path.join(out_dir, "spectrum.json"), "w") as f:
            json.dump({"high_frequency": HIGH_FREQUENCY, "sets": rows}, f, indent=1)
        draw_spectrum(rows, os.path.join(out_dir, "spectrum.png"), HIGH_FREQUENCY)
        print(f"wrote {os.path.join(out_dir, 'spectrum.json')} and {os.path.join(out_dir, 'spectrum.png')}")
        return rows
    if args.curves:
        try:
            curves = run_curves(parse_curves(args.curves))  # a run without validation records, a broken log
        except ValueError as e:
            parser.error(str(e))
        out_dir = args.out_dir or os.path.join(args.results_dir, "diagnose")
        os.makedirs(out_dir, exist_ok=True)
        draw_curves(curves, os.path.join(out_dir, "val_loss.png"), args.curves_title)
        print(f"wrote {os.path.join(out_dir, 'val_loss.png')}")
        return None
    try:
        args.t_grid = parse_t_grid(args.t_grid)
    except ValueError as e:
        parser.error(str(e))
    paths = args.ckpt
    if not paths:
        paths = latest_checkpoints(args.results_dir)
        if not paths:
            parser.error(f"no checkpoints found under {args.results_dir}/<run>/checkpoints/: train with train.py "
                         f"or pass --ckpt")
        print("diagnosing the newest checkpoint of every run under " + args.results_dir + ":")
        for p in paths:
            print("  " + p)
    try:
        reports = [diagnose_checkpoint(p, args) for p in paths]
    except ValueError as e:
        parser.error(str(e))
    labels = [r["label"] for r in reports]
    for k, r in enumerate(reports):
        if labels.count(r["label"]) > 1:  # e.g. runs of one name under two results directories
            r["label"] += f"#{k + 1}"
    out_dir = args.out_dir or os.path.join(args.results_dir, "diagnose")
    os.makedirs(out_dir, exist_ok=True)
    print_table(reports)
    # atomically: study.py takes an existing diagnose.json for a finished job, so a kill must not leave half of one
    write_json_atomically(os.path.join(out_dir, "diagnose.json"), {"reports": reports}, "the report", indent=1)
    print("wrote " + ", ".join([os.path.join(out_dir, "diagnose.json"), *draw_figures(reports, out_dir)]))
    return reports


def redraw(path, out_dir):
    """--redraw: the figures of a diagnose.json written earlier (possibly trimmed to the consumers it draws)."""
    try:
        with open(path) as f:
            reports = json.load(f)["reports"]
        if not reports or any(key not in r for r in reports for key in ("label", "t_grid", "overall", "by_t")):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--redraw {path}: not a diagnose.json (as diagnose.py writes it)") from None
    os.makedirs(out_dir, exist_ok=True)
    print("wrote " + ", ".join(draw_figures(reports, out_dir)))


if __name__ == "__main__":
    main()
