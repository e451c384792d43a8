"""Train a SiT whose cross-layer routing is residual, U-Net or DAR, on Fashion-MNIST, an image folder or SD-VAE latents.

    python train.py --router dar --chunk 4                      # tiny SiT-T/4 on Fashion-MNIST, 2 CPU cores
    python train.py --router residual                           # the SiT baseline, same budget
    python train.py --router dar --chunk 4 --resume auto        # continue from the newest checkpoint of the run
    torchrun --nproc_per_node 8 train.py --model SiT-B/2 --data /data/imagenet/train --image-size 64
        --global-batch-size 256 --max-steps 400000 --router dar --chunk 4 --precision bf16 --compile
        --repa-encoder dinov2-vitb14 --ckpt-every 20000 --eval-every 5000    # (one command line)
    torchrun --nproc_per_node 8 train.py --extract-latents --data /data/imagenet/train --out latents/
    torchrun --nproc_per_node 8 train.py --model SiT-XL/2 --data latents/ --router dar --chunk 4 ...
    python train.py --model SiT-XL/2 --data latents/ --router dar --chunk 4 --init-from SiT-XL-2-256x256.pt

--extract-latents (data.py) center-crops an image folder ADM's way, encodes the images and their mirrors
with an SD VAE (diffusers) and stores the posterior moments, labels and crops in a resumable, sharded
latents directory; training on it draws the mirror copy by a coin and a posterior sample at every step,
and REPA's encoder sees the stored crops. --init-from starts a new run (step 0, fresh optimizer, EMA =
the loaded weights) from SiT weights under any router (model.load_backbone; the router starts fresh).

Objective (docs/method.md section 5): the SiT linear interpolant x_t = t x + (1 - t) noise, t ~ U(0, 1) (t = 0 is
noise, t = 1 is data), and the MSE between the predicted velocity and u = x - noise; AdamW, EMA of the
weights, label dropout for classifier-free guidance (done by the model's label embedder in train mode),
optionally plus lambda * REPA loss (method.md section 4).

Every random draw is derived from (--seed, step): the data order from (seed, epoch) through a
DistributedSampler, t and noise for the whole global batch from (seed, step), label dropout from
(seed, step, rank). So a resumed run repeats the uninterrupted one exactly, and N processes under
torchrun see the same global batches (images, t, noise; label dropout is drawn per rank) as one process. Their weights are close to one process's but not
bit-identical: gradients are averaged across ranks in another order of floating-point sums (measured on
a tiny model: 2 ranks vs 1, max abs weight difference 0.014 after 10 steps).

Run layout (checkpoint.py): results/<run-name>/log.jsonl (one JSON record per log or eval line) and
results/<run-name>/checkpoints/<step:07d>.pt, written atomically, the newest --keep-ckpts kept. A run stops
before saving weights that diverged; what a kill, a full disk, a divergence or a dead torchrun rank does, and
what to do next: docs/failures.md.
"""
import argparse
import copy
import math
import resource
import socket
import statistics
import sys
import time
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from checkpoint import (RunLog, default_device, in_range, latest_checkpoint, load_checkpoint, load_torch_file,
                        remove_partial_files, run_distributed, save_checkpoint, step_seed)
from data import LatentSet, extract_latents, format_duration, latent_decoder, load_data, to_model_space
from flow import flow_matching_loss, write_sample_grid
from model import SIT_SIZES, TINY_SIZES, SiT_models, create_model, load_backbone, update_ema
from router import (KERNEL_HELP, KERNELS, LOGIT_SCALES, QUERIES, ROUTERS, REPAProjector, check_chunk, check_kernel,
                    repa_loss)

#################################################################################
#                                    Batches                                     #
#################################################################################

class ShardedBatches:
    """This process's share of the global batch of a given step.

    The order of the training images depends only on (seed, epoch) (DistributedSampler, drop_last), so
    batch `step` is the same whether the run was resumed or not. Rank r of W takes global positions
    r, r + W, r + 2W, ... of each global batch, and the same positions of the step's t and noise, drawn
    for the whole global batch from (seed, step): W processes together see the images, t and noise one
    process sees (label dropout is drawn per rank).
    Latents (a LatentSet) take two more draws per sample from that generator: a coin that picks the image
    or its mirror, and the eps of the posterior sample z = mean + std * eps.
    """

    def __init__(self, data, labels, global_batch, seed, rank=0, world_size=1, pixels=False):
        """data: uint8 images [N, C, S, S] or a LatentSet; pixels: also return a latent batch's images."""
        self.data, self.labels, self.seed, self.pixels = data, labels, seed, pixels
        self.latents = isinstance(data, LatentSet)
        self.sample_shape = data.sample_shape if self.latents else data.shape[1:]
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.local_batch = global_batch // world_size
        self.sampler = DistributedSampler(range(len(labels)), num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.local_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"--global-batch-size {global_batch} is larger than the {len(labels)} training images")
        self.epoch, self.order = None, None

    def get(self, step, device):
        """(x, y, t, noise, the images for a REPA encoder or None) of this process at `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.sampler.set_epoch(epoch)
            self.order, self.epoch = torch.tensor(list(self.sampler)), epoch
        index = self.order[position * self.local_batch:(position + 1) * self.local_batch]
        generator = torch.Generator().manual_seed(step_seed(self.seed, step, 0))
        t = torch.rand(self.global_batch, generator=generator)
        noise = torch.randn(self.global_batch, *self.sample_shape, generator=generator)
        mine = slice(self.rank, None, self.world_size)
        y, t, noise = self.labels[index].to(device), t[mine].to(device), noise[mine].to(device)
        if not self.latents:
            x = to_model_space(self.data[index]).to(device)
            return x, y, t, noise, x
        flip = torch.randint(2, (self.global_batch,), generator=generator)[mine]
        eps = torch.randn(self.global_batch, *self.sample_shape, generator=generator)[mine]
        mean, std = self.data.moments(index, flip)
        pixels = to_model_space(self.data.pixels(index, flip)).to(device) if self.pixels else None
        return (mean + std * eps).to(device), y, t, noise, pixels


#################################################################################
#                            Objective, EMA, validation                          #
#################################################################################

T_BINS = 4  # losses are also reported per t-bin [0, 1/4), ..., [3/4, 1]


def t_bin_sums(per_sample, t):
    """(sum of the per-sample losses, number of samples) in each of the T_BINS bins of t."""
    bins = (t * T_BINS).long().clamp(0, T_BINS - 1)
    sums = torch.zeros(T_BINS, device=t.device, dtype=torch.float64).index_add_(0, bins, per_sample.detach().double())
    return sums, torch.bincount(bins, minlength=T_BINS).double()


class Objective(nn.Module):
    """What DDP wraps: the SiT and, with REPA, its projector, so that both have their gradients averaged."""

    def __init__(self, model, projector=None, repa_depth=None):
        super().__init__()
        self.model, self.projector, self.repa_depth = model, projector, repa_depth

    def forward(self, x, y, t, noise, target_features=None):
        """(per-sample flow loss [B], REPA loss or None)."""
        if self.projector is None:
            return flow_matching_loss(self.model, x, y, t, noise)[0], None
        per_sample, hidden = flow_matching_loss(self.model, x, y, t, noise, return_hidden=self.repa_depth)
        return per_sample, repa_loss(self.projector(hidden), target_features)


def validation_batch(data, labels, size):
    """The fixed held-out batch: the first `size` validation images (for latents, the posterior means of
    the unmirrored images) with evenly spaced t = (i + 1/2) / n and noise from seed 0, independent of
    --seed, so the number is comparable across runs and routers."""
    if isinstance(data, LatentSet):
        index = torch.arange(min(size, len(data)))
        x = data.moments(index, torch.zeros_like(index))[0]
    else:
        x = to_model_space(data[:size])
    t = (torch.arange(len(x), dtype=torch.float32) + 0.5) / len(x)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return x, labels[:size], t, noise


def log_validation(log, step, model, ema, batch, micro_batch, device, autocast):
    """Validation loss of the raw and the EMA weights on the fixed batch, into the run's log."""
    val, val_bins = validation_loss(model, batch, micro_batch, device, autocast)
    val_ema, val_ema_bins = validation_loss(ema, batch, micro_batch, device, autocast)
    log.write(dict(step=step, val_loss=val, val_loss_t_bins=val_bins, val_loss_ema=val_ema,
                   val_loss_ema_t_bins=val_ema_bins),
              f"step {step}: validation loss {val:.4f} (EMA {val_ema:.4f}) | t-bins "
              + " ".join(f"{b:.3f}" for b in val_ema_bins) + " (EMA)")


@torch.no_grad()
def validation_loss(model, batch, micro_batch, device, autocast):
    """(mean loss, mean loss per t-bin) of `model` in eval mode (no label dropout) on the fixed batch."""
    was_training = model.training
    model.eval()
    sums = counts = 0
    for start in range(0, len(batch[0]), micro_batch):
        x, y, t, noise = (part[start:start + micro_batch].to(device) for part in batch)
        with autocast:
            per_sample = flow_matching_loss(model, x, y, t, noise)[0]
        bin_sums, bin_counts = t_bin_sums(per_sample, t)
        sums, counts = sums + bin_sums, counts + bin_counts
    model.train(was_training)
    return (sums.sum() / counts.sum()).item(), (sums / counts.clamp(min=1)).tolist()


# A run has diverged when its loss exceeds DIVERGED_FACTOR x the median of the last RECENT_INTERVALS logged
# interval losses. Healthy flow-matching training only lowers its loss (from about E|x - noise|^2 ~ 1.5 at
# the start); intervals of a few tiny batches scatter within 2-3x of each other, while a diverging update
# multiplies the loss by orders of magnitude (lr 1e6: 1.5 -> 1e15). The median ignores a single outlier.
DIVERGED_FACTOR, RECENT_INTERVALS = 10, 10


def divergence(what, loss, recent, grad_norm=None):
    """Why `loss` (named `what`) and the gradient norm, if given, look diverged next to the recent interval
    losses; None when they look healthy."""
    if not math.isfinite(loss) or not math.isfinite(grad_norm if grad_norm is not None else 0.0):
        return f"{what} is {loss}" + (f" (gradient norm {grad_norm})" if grad_norm is not None else "")
    if recent and loss > DIVERGED_FACTOR * statistics.median(recent):
        return (f"{what} is {loss:.4g}, over {DIVERGED_FACTOR}x the median {statistics.median(recent):.4g} of "
                f"the last {len(recent)} logged")
    return None


def loss_on_batch(model, batch, world_size, device, autocast):
    """The mean loss of `model` (eval mode) on this step's batch, over all processes: the loss of the weights
    its update produced, which the step's training loss (computed before the update) cannot show."""
    loss = torch.tensor(validation_loss(model, batch, len(batch[0]), device, autocast)[0], device=device)
    if world_size > 1:
        dist.all_reduce(loss)
    return loss.item() / world_size


def stop_message(step, problem, good):
    """The one line of a run stopped at `step` before saving, naming the last good checkpoint (path, step, loss)."""
    advice = "a lower --lr, --grad-clip 1.0 or --precision fp32"
    if good is None:
        return f"step {step}: {problem}; stopped before any checkpoint was saved: start again with {advice}"
    path, good_step, loss = good
    return (f"step {step}: {problem}; stopped without saving. The last good checkpoint, {path} (step "
            f"{good_step}, loss {'not recorded' if loss is None else f'{loss:.4f}'}), is untouched: resume from "
            f"it (--resume auto) with {advice}")


#################################################################################
#                               REPA target encoders                             #
#################################################################################

class DINOv2Encoder(nn.Module):
    """Frozen DINOv2 ViT-B/14 patch tokens on the SiT's token grid (method.md section 4).

    Images in [-1, 1] are mapped to [0, 1], repeated to RGB, resized to 224 and ImageNet-normalized; the
    16 x 16 patch tokens are resampled (bilinear, antialiased) to the model's grid if it differs.
    """
    z_dim = 768
    hub_repo, hub_model = "facebookresearch/dinov2:main", "dinov2_vitb14"

    def __init__(self, grid_size):
        super().__init__()
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)  # an unreachable network is an error, not a hang
        try:
            self.net = torch.hub.load(self.hub_repo, self.hub_model, trust_repo=True, skip_validation=True)
        except Exception as err:  # torch.hub raises many kinds (URLError, HTTPError, RuntimeError, zip errors)
            raise OSError(
                f"--repa-encoder dinov2-vitb14: could not load {self.hub_model} through torch.hub "
                f"({type(err).__name__}: {err}). The first use needs network access (github.com, "
                f"dl.fbaipublicfiles.com); later runs load it from {torch.hub.get_dir()}") from None
        finally:
            socket.setdefaulttimeout(previous_timeout)
        self.net.requires_grad_(False).eval()
        self.grid_size = grid_size
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, x):
        x = ((x.float() + 1) / 2).expand(-1, 3, -1, -1) if x.shape[1] == 1 else (x.float() + 1) / 2
        x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
        tokens = self.net.forward_features((x - self.mean) / self.std)["x_norm_patchtokens"]
        side = math.isqrt(tokens.shape[1])
        if side != self.grid_size:
            grid = tokens.transpose(1, 2).reshape(len(x), -1, side, side)
            grid = F.interpolate(grid, size=(self.grid_size, self.grid_size), mode="bilinear", antialias=True)
            tokens = grid.flatten(2).transpose(1, 2)
        return tokens


# --repa-encoder name -> factory(grid_size) returning a frozen module with .z_dim that maps images in
# [-1, 1] to [B, grid_size**2, z_dim] patch features. Tests register small ones here.
REPA_ENCODERS = {"dinov2-vitb14": DINOv2Encoder}


def default_repa_depth(depth):
    """REPA's choices: block 4 of 12, block 8 of 24 or 28."""
    return 8 if depth >= 24 else max(1, depth // 3)


#################################################################################
#                           Starting from other weights                          #
#################################################################################

def init_from(model, path):
    """Load the SiT weights of `path` (--init-from) into `model` through model.load_backbone, and say what
    was loaded. path: a state dict (the released SiT-XL-2-256x256.pt) or a checkpoint with "ema" (taken
    first) or "model", as train.py writes. The router always starts fresh, as when the paper starts DAR
    from a residual SiT: router weights in the file are ignored."""
    state = load_torch_file(path, "cpu", "--init-from")
    source = next((key for key in ("ema", "model") if isinstance(state, dict) and isinstance(state.get(key), dict)), None)
    state = state[source] if source else state
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--init-from {path}: neither a state dict nor a checkpoint with 'ema' or 'model' weights")
    backbone = {name: tensor for name, tensor in state.items() if not name.startswith("router.")}
    try:
        fresh = load_backbone(model, backbone)
    except ValueError as err:
        raise ValueError(f"--init-from {path}: {err}. Is --model its config, and are the data's channels, "
                         f"size and classes those it was trained on?") from None
    return (f"initialized from {path} ({f'its {source!r} weights' if source else 'a state dict'}): "
            f"{len(backbone)} backbone tensors; {len(fresh)} router tensors freshly initialized, "
            f"{len(state) - len(backbone)} in the file ignored")


def resume(args, run_dir, device, model_config, data_info, states):
    """Load the checkpoint --resume names (--resume auto: the run's newest, if any) into `states` (model, ema,
    opt, repa_projector: what has a state dict, or None). Returns (its step, its recent logged losses, the
    good checkpoint as (path, step, loss), a line saying what was resumed) or a fresh start's (0, [], None, ...)."""
    path = latest_checkpoint(run_dir) if args.resume == "auto" else args.resume
    recent = deque(maxlen=RECENT_INTERVALS)
    if not path:
        if latest_checkpoint(run_dir) is not None:
            raise ValueError(f"{run_dir} already holds checkpoints: pass --resume auto "
                             f"{'instead of --init-from ' if args.init_from else ''}to continue that run, "
                             f"or choose another --run-name / --results-dir")
        note = f"--resume auto: no checkpoint in {run_dir / 'checkpoints'} yet, starting from scratch"
        return 0, recent, None, note if args.resume == "auto" else None
    checkpoint = load_checkpoint(path, device, "--resume")
    check_resume_compatible(checkpoint, path, model_config, data_info, states["repa_projector"] is not None)
    for name, module in states.items():
        if module is not None:
            module.load_state_dict(checkpoint[name])
    for group in states["opt"].param_groups:  # the saved state holds the old --lr: a resume may lower it
        group["lr"] = args.lr
    recent.extend(checkpoint.get("recent_losses", []))
    changed = {k: (v, vars(args)[k]) for k, v in checkpoint["args"].items()
               if k != "resume" and k in vars(args) and vars(args)[k] != v}
    note = f"resuming from {path} at step {checkpoint['step']}"
    note += f"; flags changed since: {changed}" if changed else ""
    return checkpoint["step"], recent, (path, checkpoint["step"], checkpoint.get("loss")), note


def check_resume_compatible(checkpoint, path, model_config, data_info, repa_on):
    """A checkpoint must come from the same model, router and data; say exactly what differs."""
    ignored = {"kernel"}  # how DAR is computed, not what it computes
    differences = [f"{key}: checkpoint {checkpoint['model_config'].get(key)!r}, this run {value!r}"
                   for key, value in model_config.items()
                   if key not in ignored and checkpoint["model_config"].get(key) != value]
    differences += [f"data {key}: checkpoint {checkpoint['data'].get(key)!r}, this run {data_info[key]!r}"
                    for key in ("name", "channels", "num_classes", "image_size")
                    if checkpoint["data"].get(key) != data_info[key]]
    if ("repa_projector" in checkpoint) != repa_on:
        differences.append(f"REPA: checkpoint {'with' if 'repa_projector' in checkpoint else 'without'}, "
                           f"this run {'with' if repa_on else 'without'}")
    if differences:
        raise ValueError(f"--resume {path}: the checkpoint does not match this run's configuration: "
                         + "; ".join(differences) + ". Pass the flags it was trained with, or start a new run.")


#################################################################################
#                                    Training                                    #
#################################################################################

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    at_least_1, at_least_0, number_at_least_0 = in_range(int, 1), in_range(int, 0), in_range(float, 0)
    add("--model", default="SiT-T/4", choices=list(SiT_models), metavar="NAME",
        help="SiT config: SiT-{XL,L,B,S,T,D,N6,N12,N24,N48}/{2,4,8} (default %(default)s)")
    add("--router", default="residual", choices=ROUTERS, help="cross-layer routing (default %(default)s)")
    add("--query", default="static", choices=QUERIES, help="DAR query, Eq. 6 (default %(default)s)")
    add("--chunk", type=at_least_1, default=1,
        help="DAR chunk size S, 1 is dense, below the 2L sublayers (default %(default)s)")
    add("--kernel", default="auto", choices=KERNELS, help=KERNEL_HELP)
    add("--logit-scale", default="inv-sqrt-d", choices=LOGIT_SCALES,
        help="DAR logits q . k / sqrt(d) (Eq. 5, default) or q . k ('one', AttnRes's choice; an ablation)")
    add("--data", default=None, help="an image folder in ImageNet layout, or a latents directory written by "
        "--extract-latents (default: Fashion-MNIST)")
    add("--data-dir", default=None, help="where to look for, or download, the Fashion-MNIST .gz files first")
    add("--image-size", type=at_least_1, default=None, help="default 32 (Fashion-MNIST's 28 x 28 is padded); 256 "
        "for --extract-latents; a latents directory fixes its own")
    add("--max-steps", type=at_least_1, default=1500, help="(default %(default)s)")
    add("--global-batch-size", type=at_least_1, default=64, help="summed over all processes (default %(default)s)")
    add("--lr", type=number_at_least_0, default=None,
        help="AdamW learning rate (default 1e-4; 1e-3 for the tiny T/D/N configs)")
    add("--ema-decay", type=in_range(float, 0, 1, high_excluded=True), default=None,
        help="default 0.9999; 0.995 for the tiny T/D/N configs")
    add("--label-dropout", type=in_range(float, 0, 1), default=0.1,
        help="class label dropout for CFG (default %(default)s)")
    add("--grad-clip", type=number_at_least_0, default=0.0, help="max gradient norm; 0: no clipping (default)")
    add("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast (default %(default)s)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--seed", type=at_least_0, default=0,
        help="every random draw derives from it and the step (default %(default)s)")
    add("--repa-encoder", default="none", choices=["none", *REPA_ENCODERS],
        help="REPA target encoder (default: none, REPA off)")
    add("--repa-coeff", type=number_at_least_0, default=0.5, help="REPA loss weight lambda (default %(default)s)")
    add("--repa-depth", type=at_least_1, default=None,
        help="the block aligned by REPA (default: 4 of 12 blocks, 8 of 24+)")
    add("--results-dir", default="results", help="(default %(default)s)")
    add("--run-name", default=None, help="default: <model>-<router>[-<query>-c<chunk>[-logit-one]], '/' -> '-'")
    add("--resume", default=None, help="a checkpoint path, or 'auto' for the newest in the run directory")
    add("--init-from", default=None, metavar="PATH", help="start a new run from these SiT weights: a state dict "
        "(e.g. the released SiT-XL-2-256x256.pt) or a checkpoint (its EMA); the router starts fresh")
    add("--log-every", type=at_least_1, default=20, help="(default %(default)s)")
    add("--eval-every", type=at_least_1, default=250, help="validation loss every N steps (default %(default)s)")
    add("--eval-batch-size", type=at_least_1, default=512,
        help="size of the fixed validation batch (default %(default)s)")
    add("--ckpt-every", type=at_least_1, default=500, help="(default %(default)s)")
    add("--keep-ckpts", type=at_least_0, default=3,
        help="keep the newest k checkpoints; 0: all (default %(default)s)")
    add("--sample-grid", type=in_range(int, 0, 16), default=10,
        help="samples per class (at most 16) in the grid written at the end; 0: none (default %(default)s)")
    extraction = parser.add_argument_group("SD-VAE latents: train.py --extract-latents --data FOLDER --out DIR, "
                                           "then train.py --data DIR")
    extraction.add_argument("--extract-latents", action="store_true", help="encode the image folder --data into --out")
    extraction.add_argument("--out", default=None, help="the latents directory to write (resumed if interrupted)")
    extraction.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                            help="diffusers AutoencoderKL: a Hugging Face id or a local folder (default %(default)s)")
    extraction.add_argument("--shard-size", type=at_least_1, default=5000,
                            help="images per shard (default %(default)s)")
    extraction.add_argument("--vae-batch-size", type=at_least_1, default=32,
                            help="images per VAE call (twice that with the mirrors), per process (default %(default)s)")
    extraction.add_argument("--num-workers", type=at_least_0, default=8,
                            help="image decoding processes, per process (default %(default)s)")
    extraction.add_argument("--no-pixels", action="store_true",
                            help="do not store the cropped images (saves 192 KB per 256px image; no REPA then)")
    args = parser.parse_args(argv)
    if args.extract_latents:
        if not (args.data and args.out) or args.data_dir:
            parser.error("--extract-latents needs --data (an image folder) and --out (the latents directory), "
                         "and no --data-dir")
        args.image_size = args.image_size or 256
        return args
    if args.out:
        parser.error("--out is the output of --extract-latents (training writes to --results-dir)")
    if args.init_from and args.resume:
        parser.error("--init-from starts a new run, --resume continues one: to continue a run started with "
                     "--init-from, pass --resume alone")
    size = args.model.split("-")[1].split("/")[0]
    tiny, depth = size in TINY_SIZES, SIT_SIZES[size][0]
    if args.lr is None:
        args.lr = 1e-3 if tiny else 1e-4
    if args.ema_decay is None:
        args.ema_decay = 0.995 if tiny else 0.9999
    if args.run_name is None:
        args.run_name = f"{args.model.replace('/', '-')}-{args.router}"
        if args.router == "dar":
            args.run_name += f"-{args.query}-c{args.chunk}"
            if args.logit_scale != "inv-sqrt-d":
                args.run_name += f"-logit-{args.logit_scale}"
    if args.router == "dar":
        try:
            check_chunk(args.chunk, depth, args.model)
            check_kernel(args.kernel, default_device())
        except ValueError as err:
            parser.error(str(err))
    if args.repa_depth is not None and args.repa_depth > depth:
        parser.error(f"--repa-depth {args.repa_depth}: {args.model} has blocks 1..{depth}")
    if args.data and args.data_dir:
        parser.error("--data (an image folder) and --data-dir (Fashion-MNIST files) exclude each other")
    return args


def main(argv=None):
    args = parse_args(argv)
    run_distributed(extract_latents if args.extract_latents else train, args, default_device(),
                    rerun="run the same command again: the extraction resumes" if args.extract_latents
                    else "continue with the same command and --resume auto")


def train(args, rank, world_size, device):
    """Build, resume, loop: the order of DiT's train.py."""
    if args.global_batch_size % world_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by the {world_size} processes")
    is_main = rank == 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_dir = Path(args.results_dir) / args.run_name

    # Build: data, model, EMA, REPA, optimizer.
    if world_size > 1 and not is_main:
        dist.barrier()  # rank 0 loads (and possibly downloads) the data first
    train_images, train_labels, val_images, val_labels, data_info, data_note = load_data(args)
    if world_size > 1 and is_main:
        dist.barrier()
    model_config = dict(name=args.model, input_size=data_info["image_size"], in_channels=data_info["channels"],
                        num_classes=data_info["num_classes"], router=args.router, query=args.query,
                        chunk=args.chunk, kernel=args.kernel, logit_scale=args.logit_scale, learn_sigma=False,
                        class_dropout_prob=args.label_dropout)
    torch.manual_seed(args.seed)
    model = create_model(**model_config).to(device)
    init_note = init_from(model, args.init_from) if args.init_from else None
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # EMA starts as a copy of the initial weights
    repa_encoder = projector = None
    if args.repa_encoder != "none":
        if data_info["name"] == "latents" and not train_images.meta["pixels"]:
            raise ValueError(f"--repa-encoder {args.repa_encoder}: the encoder sees images, and {args.data} was "
                             f"extracted with --no-pixels: extract it again without --no-pixels")
        args.repa_depth = args.repa_depth or default_repa_depth(model.depth)
        repa_encoder = REPA_ENCODERS[args.repa_encoder](model.grid_size).to(device).eval()
        projector = REPAProjector(model.pos_embed.shape[-1], repa_encoder.z_dim).to(device)
    objective = Objective(model, projector, args.repa_depth)
    parameters = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.999), weight_decay=0)
    decode = None
    if is_main and args.sample_grid and data_info["name"] == "latents":
        decode = latent_decoder(data_info, device=device)  # now: a missing VAE fails before training

    # Resume: the newest checkpoint of the run (--resume auto) or the one named.
    start_step, recent, good, resume_note = resume(args, run_dir, device, model_config, data_info,
                                                   dict(model=model, ema=ema, opt=optimizer, repa_projector=projector))
    log = RunLog(run_dir, enabled=is_main)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for partial in remove_partial_files(run_dir, run_dir / "checkpoints"):
            print(f"removed {partial}, left by a process killed while writing it")
        dropped = log.keep_until(start_step)  # a resumed run rewrites what came after its checkpoint; a new one, all
        print(data_note)
        print(f"{args.model} router={args.router} query={args.query} chunk={args.chunk}: "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {world_size} process(es) "
              f"on {device.type}, global batch {args.global_batch_size}, lr {args.lr:g}, EMA {args.ema_decay:g}, "
              f"run directory {run_dir}")
        if init_note:
            print(init_note)
        if resume_note:
            print(resume_note)
        if dropped:
            print(f"{log.path}: dropped the {dropped} record(s) after step {start_step}, which the run wrote "
                  f"after its last checkpoint")
    if start_step >= args.max_steps:
        if is_main:
            print(f"the run is already at step {start_step} (--max-steps {args.max_steps}): nothing to do")
        return

    # Loop.
    trained = torch.compile(objective) if args.compile else objective
    if world_size > 1:
        trained = DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    batches = ShardedBatches(train_images, train_labels, args.global_batch_size, args.seed, rank, world_size,
                             pixels=repa_encoder is not None)
    val_batch = validation_batch(val_images, val_labels, args.eval_batch_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    stats = IntervalStats(device, repa=projector is not None)
    run_start, last_saved = time.time(), None
    model.train()
    for step in range(start_step, args.max_steps):
        x, y, t, noise, pixels = batches.get(step, device)
        torch.manual_seed(step_seed(args.seed, step, 1 + rank))  # the model's label dropout draws from it
        with autocast:
            target_features = repa_encoder(pixels) if repa_encoder is not None else None
            per_sample, repa = trained(x, y, t, noise, target_features)
        loss = per_sample.mean() + (args.repa_coeff * repa if repa is not None else 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, args.grad_clip or math.inf)
        optimizer.step()
        update_ema(ema, model, args.ema_decay)
        stats.add(per_sample, t, grad_norm, repa)
        done = step + 1

        is_last = done == args.max_steps
        logging, saving = done % args.log_every == 0 or is_last, done % args.ckpt_every == 0 or is_last
        if logging or saving:  # the only places the host waits for the device, and ranks exchange statistics
            record = stats.summary(world_size, args.global_batch_size)
            problem = divergence("the loss", record["loss"], recent, record["grad_norm"])
            if saving and problem is None:  # the interval's losses predate its last update: check what is saved
                weights_loss = loss_on_batch(model, (x, y, t, noise), world_size, device, autocast)
                problem = divergence("after the update, the loss on the step's batch", weights_loss,
                                     [*recent, record["loss"]])
            if problem:
                raise SystemExit(stop_message(done, problem, good) if is_main else 1)
        if logging:
            recent.append(record["loss"])
            record.update(step=done, lr=args.lr, peak_mem_mb=peak_memory_mb(device), time_s=time.time() - run_start)
            log.write(record, training_line(record, args.max_steps, args.global_batch_size))
            stats.reset()
        if is_main and (done % args.eval_every == 0 or is_last):
            log_validation(log, done, model, ema, val_batch, args.global_batch_size, device, autocast)
        if is_main and saving:
            checkpoint = dict(model=model.state_dict(), ema=ema.state_dict(), opt=optimizer.state_dict(), step=done,
                              args=vars(args), model_config=model_config, data=data_info,
                              rng=dict(seed=args.seed, torch=torch.get_rng_state(),
                                       cuda=torch.cuda.get_rng_state_all() if device.type == "cuda" else []),
                              loss=weights_loss, recent_losses=list(recent))
            if projector is not None:
                checkpoint["repa_projector"] = projector.state_dict()
            last_saved = save_checkpoint(checkpoint, run_dir / "checkpoints", args.keep_ckpts)
            good = (last_saved, done, weights_loss)

    if is_main:
        print(f"done: {args.max_steps} steps in {format_duration(time.time() - run_start)}; checkpoint {last_saved}")
        if args.sample_grid:
            grid_path = run_dir / "samples.png"
            how = write_sample_grid(ema, data_info["num_classes"], args.sample_grid, grid_path, device, args.seed,
                                    decode)
            print(f"sample grid (EMA weights, one row per class, {how}): {grid_path}")


#################################################################################
#                           Statistics and the run's log                         #
#################################################################################

class IntervalStats:
    """Sums of one logging interval, kept on the device so that a step never waits for the host."""

    def __init__(self, device, repa):
        self.device, self.repa = device, repa
        self.reset()

    def reset(self):
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.sums = dict(loss=zeros(()), repa_loss=zeros(()), grad_norm=zeros(()), steps=zeros(()),
                         loss_by_t_bin=zeros(T_BINS), samples_by_t_bin=zeros(T_BINS))
        self.start = time.time()

    def add(self, per_sample, t, grad_norm, repa):
        """One step of this process: its per-sample losses and t, the gradient norm, the REPA loss or None."""
        bin_sums, bin_counts = t_bin_sums(per_sample, t)
        self.sums["loss"] += per_sample.detach().double().sum()
        self.sums["grad_norm"] += grad_norm.detach().double()
        if repa is not None:
            self.sums["repa_loss"] += repa.detach().double()
        self.sums["steps"] += 1
        self.sums["loss_by_t_bin"] += bin_sums
        self.sums["samples_by_t_bin"] += bin_counts

    def summary(self, world_size, global_batch_size):
        """The interval's means over all processes, as named floats (one all_reduce, one host sync)."""
        flat = torch.cat([v.reshape(-1) for v in self.sums.values()])
        if world_size > 1:
            dist.all_reduce(flat)
        sums = dict(zip(self.sums, flat.split([v.numel() for v in self.sums.values()])))
        steps = sums["steps"].item() / world_size
        elapsed = time.time() - self.start
        record = dict(loss=sums["loss"].item() / (steps * global_batch_size),
                      loss_t_bins=(sums["loss_by_t_bin"] / sums["samples_by_t_bin"].clamp(min=1)).tolist(),
                      grad_norm=sums["grad_norm"].item() / (steps * world_size),
                      images_per_s=steps * global_batch_size / elapsed)
        if self.repa:
            record["repa_loss"] = sums["repa_loss"].item() / (steps * world_size)
        return record


def training_line(record, max_steps, global_batch_size):
    """The progress line of one logging interval."""
    eta = (max_steps - record["step"]) * global_batch_size / record["images_per_s"]
    return (f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} | t-bins "
            + " ".join(f"{b:.3f}" for b in record["loss_t_bins"])
            + (f" | repa {record['repa_loss']:.4f}" if "repa_loss" in record else "")
            + f" | grad {record['grad_norm']:.3f} | {record['images_per_s']:.0f} img/s"
            f" | peak {record['peak_mem_mb']:.0f} MB | ETA {format_duration(eta)}")


def peak_memory_mb(device):
    """Peak allocated GPU memory, or peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError) as err:
        sys.exit(f"error: {err}")
