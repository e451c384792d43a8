"""Sample images from a train.py checkpoint with SiT's samplers; write an ADM-style npz and a PNG grid.

    python sample.py                                          # newest checkpoint under results/, EMA weights
    python sample.py --ckpt results/SiT-T-4-dar-static-c4 --sampler sde --steps 250 --num-samples 10000
    python sample.py --class-labels 0 3 7 --num-samples 48 --cfg-scale 2 --cfg-interval 0.1 1
    torchrun --nproc_per_node 8 sample.py --ckpt CKPT --num-samples 50000 --steps 250 --batch-size 256

Samplers (flow.py; docs/method.md section 5, SiT's conventions; t = 0 is noise, t = 1 is data): euler and heun
ODEs on --steps equal steps (heun: 2 evaluations a step), and sde, Euler-Maruyama with SiT's final mean step.
Guidance: v = v_u + s (v_c - v_u) on every channel; --cfg-channels 3 guides only channels 0-2, as SiT's
released sampler does for its 4-channel latents (use it to compare with SiT's published numbers).

Sample i draws its noise (and its class when --class-labels is not given) from a generator seeded with
--seed + i, and batches are cut from the global sample order, so the output does not depend on the number
of processes. Under torchrun each process samples every world-size-th batch and rank 0 merges one npz.

Outputs, next to the checkpoint's run (results/<run>/samples/), unless --out names the npz:
  <step>-<sampler>-<steps>[-cfg<s>[-<lo>-<hi>]][-ch<k>][-raw][-seed<k>]-n<N>[-classes<a_b_c>].npz
      arr_0: uint8 [N, H, W, 3] (NHWC; a 1-channel model's gray repeated to 3 channels, so the ADM
      evaluator reads it unchanged), arr_1: int64 [N] class labels
  the same name .png: a grid, one row per class when --class-labels is given (grayscale for 1-channel models)
A distilled generator (a distill.py checkpoint, which holds "generator": its gen_steps K) is sampled with
its K network evaluations, no ODE: the euler sampler with K steps (flow.generate), from the same seeded
noise, so fid.py and the ADM evaluator read its npz unchanged; --sampler / --steps / --cfg-scale do not apply.
A model trained on SD-VAE latents (train.py --data latents/) has its samples decoded by the checkpoint's
VAE (--vae: another copy of it, e.g. a local folder; needs diffusers) before both are written.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from checkpoint import (default_device, device_arg, in_range, keep_freed_memory, load_model, load_torch_file,
                        resolve_checkpoint, run_distributed, write_atomically)
from data import latent_decoder, save_grid
from flow import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, sample_batch
from router import KERNEL_HELP, KERNELS, check_kernel

#################################################################################
#                                 Command line                                  #
#################################################################################

def output_path(args, checkpoint_path, step, generator=False):
    """results/<run>/samples/<name>.npz for results/<run>/checkpoints/<step>.pt (for a checkpoint elsewhere,
    samples/ beside it); a distilled generator's is named <step>-generator-<K>..."""
    if args.out:
        return Path(args.out).with_suffix(".npz")
    ckpt = Path(checkpoint_path).resolve()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    name = f"{step:07d}-{args.sampler}-{args.steps}" if not generator else f"{step:07d}-generator-{args.steps}"
    if args.cfg_scale != 1:
        name += f"-cfg{args.cfg_scale:g}" + (f"-{args.cfg_interval[0]:g}-{args.cfg_interval[1]:g}"
                                              if args.cfg_interval else "")
    name += f"-ch{args.cfg_channels}" if args.cfg_channels is not None and args.cfg_scale != 1 else ""
    name += "-raw" if args.no_ema else ""
    name += f"-kernel-{args.kernel}" if args.kernel != "auto" else ""  # beside, not over, the default kernel's
    name += f"-seed{args.seed}" if args.seed else ""
    name += f"-n{args.num_samples}"
    if args.class_labels:
        labels = args.class_labels
        name += "-classes" + ("_".join(map(str, labels)) if len(labels) <= 8 else f"{labels[0]}-etc{len(labels)}")
    return run_dir / "samples" / f"{name}.npz"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    at_least_1 = in_range(int, 1)
    add("--ckpt", default=None, help="checkpoint file or run directory (default: newest under --results-dir)")
    add("--results-dir", default="results")
    add("--no-ema", action="store_true", help="sample with the raw weights instead of the EMA")
    # None: the checkpoint decides (a distilled generator its own K steps); "%(default).0s" prints nothing,
    # so that the help formatter does not add "(default: None)"
    add("--sampler", default=None, choices=list(SAMPLERS),
        help=f"(default: {DEFAULT_SAMPLER}; a distilled generator: euler)%(default).0s")
    add("--steps", type=at_least_1, default=None, help=f"integration steps (heun: 2 velocity evaluations each) "
        f"(default: {DEFAULT_STEPS}; a distilled generator: its K)%(default).0s")
    add("--cfg-scale", type=in_range(float, 0), default=1.0, help="classifier-free guidance scale s (1: none)")
    add("--cfg-interval", type=in_range(float, 0, 1), nargs=2, default=None, metavar=("LO", "HI"),
        help="guide only for t in [LO, HI] (t = 0 noise, 1 data)")
    add("--cfg-channels", type=at_least_1, default=None, metavar="K",
        help="guide only the first K channels (default: all); 3 is SiT's released sampler on 4-channel latents")
    add("--class-labels", type=in_range(int, 0), nargs="+", default=None, help="cycle through these classes (default: uniform)")
    add("--num-samples", type=at_least_1, default=1000)
    add("--batch-size", type=at_least_1, default=125, help="samples per forward pass (per process)")
    add("--seed", type=in_range(int, 0), default=0, help="sample i uses seed + i")
    add("--out", default=None, help="npz path (the PNG goes beside it)")
    add("--vae", default=None, metavar="PATH_OR_ID",
        help="for a model trained on latents: the AutoencoderKL that decodes them (default: the checkpoint's)")
    add("--device", type=device_arg, default=default_device())
    add("--kernel", default="auto", choices=KERNELS,
        help=KERNEL_HELP + "; a kernel other than auto is added to the default npz name")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < (2 if args.sampler == "sde" else 1):
        parser.error(f"--steps must be >= {2 if args.sampler == 'sde' else 1} for --sampler "
                     f"{args.sampler or DEFAULT_SAMPLER}")
    try:
        check_kernel(args.kernel, args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.cfg_interval and args.cfg_interval[0] > args.cfg_interval[1]:
        parser.error(f"--cfg-interval LO HI needs 0 <= LO <= HI <= 1, got {args.cfg_interval}")
    return args


def choose_sampler(args, checkpoint):
    """Fill in --sampler and --steps: a distilled generator's own K Euler steps, else the flags or defaults."""
    generator = checkpoint.get("generator")
    if generator is None:
        args.sampler, args.steps = args.sampler or DEFAULT_SAMPLER, args.steps or DEFAULT_STEPS
        return
    steps = generator["gen_steps"]
    if (args.sampler or "euler") != "euler" or (args.steps or steps) != steps or args.cfg_scale != 1:
        raise ValueError(f"--ckpt is a distilled {steps}-step generator: it samples with its own {steps} Euler "
                         f"step(s) and no guidance; drop --sampler, --steps and --cfg-scale")
    args.sampler, args.steps = "euler", steps


def check_model(model, args):
    """Clear errors for flags this checkpoint cannot honour."""
    bad = [c for c in args.class_labels or [] if not 0 <= c < model.num_classes]
    if bad:
        raise ValueError(f"--class-labels {bad}: the model has classes 0..{model.num_classes - 1}")
    if args.cfg_channels is not None and not 1 <= args.cfg_channels <= model.in_channels:
        raise ValueError(f"--cfg-channels {args.cfg_channels}: the model has {model.in_channels} channels")
    if args.cfg_scale != 1 and model.y_embedder.dropout_prob == 0:
        raise ValueError("--cfg-scale needs a model trained with label dropout (it has no null class)")


def main(argv=None):
    args = parse_args(argv)
    run_distributed(run, args, args.device)


def run(args, rank, world_size, device):
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_memory()  # each evaluation reuses the last one's memory instead of faulting pages in again
    checkpoint_path = resolve_checkpoint(args.ckpt, args.results_dir)
    model, checkpoint = load_model(checkpoint_path, ema=not args.no_ema, device=device, kernel=args.kernel,
                                   what="--ckpt")
    choose_sampler(args, checkpoint)
    check_model(model, args)
    decode = latent_decoder(checkpoint["data"], args.vae, device)
    out = output_path(args, checkpoint_path, checkpoint["step"], "generator" in checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        print(f"sampling {args.num_samples} images from {checkpoint_path} (step {checkpoint['step']}, "
              f"{'raw' if args.no_ema else 'EMA'} weights) with "
              f"{'its generator: ' if 'generator' in checkpoint else ''}{args.sampler}, {args.steps} steps, "
              f"cfg {args.cfg_scale:g}, {world_size} process(es) on {device.type}")

    batches = [range(s, min(s + args.batch_size, args.num_samples)) for s in range(0, args.num_samples, args.batch_size)]
    mine = batches[rank::world_size]
    images, labels, done, start = [], [], 0, time.time()
    for indices in mine:
        x, y = sample_batch(model, indices, args.seed, args.sampler, args.steps, args.cfg_scale,
                            args.cfg_interval, args.class_labels, device, decode, args.cfg_channels)
        images.append(x)
        labels.append(y)
        done += len(indices)
        if rank == 0:
            total = min(done * world_size, args.num_samples)
            print(f"\rsampled ~{total}/{args.num_samples} ({total / (time.time() - start):.1f} img/s)",
                  end="", file=sys.stderr, flush=True)
    if rank == 0:
        print(file=sys.stderr)
    images = torch.cat(images) if images else torch.zeros(0, dtype=torch.uint8)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)

    if world_size > 1:  # every rank writes its shard (a shared file system, as torchrun samplers assume)
        shard = out.with_name(f".{out.stem}.rank{rank}.pt")
        torch.save(dict(images=images, labels=labels), shard)
        dist.barrier()
        if rank != 0:
            return
        shards = [load_torch_file(out.with_name(f".{out.stem}.rank{r}.pt"), "cpu", f"the samples of rank {r}")
                  for r in range(world_size)]
        parts = [(s["images"].split(args.batch_size), s["labels"].split(args.batch_size)) for s in shards]
        # batch b was made by rank b % world_size, as its (b // world_size)-th batch
        images = torch.cat([parts[b % world_size][0][b // world_size] for b in range(len(batches))])
        labels = torch.cat([parts[b % world_size][1][b // world_size] for b in range(len(batches))])
        for r in range(world_size):
            out.with_name(f".{out.stem}.rank{r}.pt").unlink()

    nhwc = images.permute(0, 2, 3, 1)
    # atomically: a kill mid-write leaves no half-written npz, which study.py (that skips sampling when it exists)
    # and fid.py would take for the samples
    write_atomically(out, lambda f: np.savez(f, arr_0=nhwc.expand(*nhwc.shape[:3], 3).numpy(), arr_1=labels.numpy()),
                     "samples")
    save_grid(images, labels, out.with_suffix(".png"), by_class=bool(args.class_labels))
    print(f"wrote {out} ({len(images)} images, {images.shape[2]}x{images.shape[3]}) and {out.with_suffix('.png')}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError) as err:
        sys.exit(f"error: {err}")
