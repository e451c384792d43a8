"""Distill a trained SiT teacher into a one-step (or K-step) generator with Distribution Matching Distillation.

    python distill.py --teacher results/SiT-T-4-residual                      # one-step G, the teacher's router
    python distill.py --teacher results/SiT-T-4-dar-static-c4 --gen-steps 2   # a 2-step generator
    python distill.py --teacher results/SiT-T-4-residual --router dar --chunk 4   # residual teacher -> DAR student
    python distill.py --teacher results/SiT-T-4-residual --regression-weight 0.25  # DMD's regression loss too
    python distill.py --teacher results/SiT-T-4-residual --resume auto        # continue the run exactly
    python sample.py --ckpt results/distill-SiT-T-4-residual-k1               # K network evaluations, no ODE

DMD (Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation"), written for SiT's linear
interpolant x_t = t x + (1 - t) eps (t = 0 noise, t = 1 data, velocity v; flow.py), where the data
prediction is x_hat = x_t + (1 - t) v and the score is s(x_t) = -(x_t - t x_hat) / (1 - t)^2:
  - the generator G (flow.generate): K Euler steps of its own velocity on the grid t_k = k / K, i.e. DDIM
    jumps through data predictions; K = 1 is G(z) = z + v_G(z, 0). G starts as the teacher, so at step 0 it
    is the teacher's K-step Euler sampler (for K = 1 its one-step prediction).
  - the real model: the teacher's EMA weights, frozen. The fake model: initialized from the teacher (under
    G's router), trained online on G's outputs with the flow-matching loss (DMD Eq. 6 for our interpolant),
    with its own AdamW; --fake-updates N makes N fake updates per generator update (DMD2's two time-scale
    rule), the first on the batch G just made, the others on fresh batches.
  - the generator's loss: the distribution-matching gradient (DMD Eq. 7) at t ~ U(--t-min, --t-max),
    alpha_t w_t (s_fake - s_real) with s_fake - s_real = t (x_hat_fake - x_hat_real) / (1 - t)^2 (alpha_t = t,
    sigma_t = 1 - t) and DMD Eq. 8's w_t = (1 - t)^2 / t * C / |x_hat_real - G(z)|_1 (C the number of pixels),
    which leaves t (x_hat_fake - x_hat_real) / mean|G(z) - x_hat_real|. DMD's ImageNet model is EDM's
    (alpha_t = 1), and the authors' code (tianweiy/DMD2, main/sd_guidance.py) uses
    grad = (x_hat_fake - x_hat_real) / mean|G(z) - x_hat_real| per sample for its VP schedule too; so do we
    (no factor t). It is applied as in that code:
    loss = 0.5 * mean (G(z) - stopgrad(G(z) - grad))^2, so G moves along -grad, from the fake distribution
    towards the real one;
  - optionally plus --regression-weight lambda times DMD Eq. 9's regression loss on (noise, teacher ODE
    sample) pairs made once with sample.py's sampler (--regression-sampler / --regression-steps) and cached
    in the run directory. The distance is the plain pixel MSE (in latent space for a latent teacher): DMD's
    LPIPS needs VGG weights we cannot fetch offline, and at 32 x 32 the Inception features would cost a
    299 x 299 Inception pass per generated image per step, about a hundred times G itself on a CPU.
Router of G and of the fake model: the teacher's own (--router teacher, the default; the teacher's weights
load as they are), or another one (--router dar --chunk 4 ...): the teacher's backbone is loaded through
model.load_backbone and the router starts fresh, so a residual teacher is fine-tuned into a DAR student
during distillation (a static DAR loaded this way starts as the teacher up to LayerNorm eps).

As train.py: EMA of G, every random draw from (--seed, step), atomic checkpoints and an exact --resume,
results/<run>/log.jsonl, a sample grid (one row per class) at the end. A checkpoint is a train.py checkpoint
of G (model, ema, opt, model_config, data: the teacher's) plus "generator" (gen_steps, teacher), "fake" and
"fake_opt": load_model, sample.py, fid.py read it unchanged, and sample.py samples it with K evaluations.
"""
import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint import (RunLog, default_device, device_arg, in_range, latest_checkpoint, load_checkpoint, load_model,
                        on_this_machine, resolve_checkpoint, save_checkpoint, step_seed)
from data import format_duration, latent_decoder
from flow import (DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, data_prediction, flow_matching_loss, generate,
                  interpolate, sample_latents, seeded_noise_and_labels, write_sample_grid)
from model import create_model, load_backbone, update_ema
from router import LOGIT_SCALES, QUERIES, ROUTERS, check_chunk

PAIR_SEED_OFFSET = 10 ** 6  # regression pairs use seeds --seed + 10^6 + i, away from sample.py's seed + i
PAIRS_FILE = "regression_pairs.pt"

#################################################################################
#                          Distribution matching (DMD)                           #
#################################################################################

def distribution_matching_loss(x, t, noise, real_velocity, fake_velocity):
    """(loss, grad) for generator outputs x [B, ...] (with their graph) at times t [B] and noise [B, ...].

    real_velocity / fake_velocity: (x_t, t) -> velocity. DMD Eq. 7 in our parameterization: the score is
    s = -(x_t - t x_hat) / (1 - t)^2, so s_fake - s_real = t (x_hat_fake - x_hat_real) / (1 - t)^2, and with
    alpha_t = t and DMD Eq. 8's weight w_t = (1 - t)^2 / t * C / |x_hat_real - x|_1 the gradient is
    t (x_hat_fake - x_hat_real) / mean|x - x_hat_real|. As the authors' code (tianweiy/DMD2) does for every
    schedule (and as DMD's EDM setting, alpha_t = 1, gives) we use grad = (x_hat_fake - x_hat_real) /
    mean|x - x_hat_real|, without the t. The loss
    0.5 * mean (x - stopgrad(x - grad))^2 has dloss/dx = grad / numel: gradient descent moves x along
    -(fake - real), towards the real distribution.
    """
    with torch.no_grad():
        x_t, _ = interpolate(x.detach(), noise, t)  # DMD Eq. 7: x_t ~ q_t(x_t | x), the forward diffusion of G(z)
        real = data_prediction(real_velocity(x_t, t), x_t, t)
        fake = data_prediction(fake_velocity(x_t, t), x_t, t)
        dims = tuple(range(1, x.dim()))
        normalizer = (x.detach() - real).abs().mean(dim=dims, keepdim=True).clamp(min=1e-8)
        grad = (fake - real) / normalizer
    return 0.5 * F.mse_loss(x, (x - grad).detach()), grad


def conditional_velocity(model, y):
    """(x_t, t [B]) -> model(x_t, t, y): a model's velocity for fixed labels."""
    return lambda x_t, t: model(x_t, t, y)


#################################################################################
#                      Teacher, student and regression pairs                     #
#################################################################################

def load_teacher(path, device):
    """(the teacher's EMA model, frozen, its checkpoint): a train.py checkpoint, not a distilled generator."""
    try:
        teacher, checkpoint = load_model(path, ema=True, device=device)
    except ValueError as err:
        raise ValueError(f"--teacher: {err}") from None
    if "generator" in checkpoint:
        raise ValueError(f"--teacher {path} is a distilled generator (distill.py), not a train.py teacher")
    return teacher.requires_grad_(False), checkpoint


def student_config(teacher_config, args):
    """G's (and the fake model's) model_config: the teacher's as checkpoint.load_model builds it, under --router
    unless it is 'teacher'."""
    config = on_this_machine(teacher_config)
    if args.router != "teacher":
        config.update(router=args.router, query=args.query, chunk=args.chunk, logit_scale=args.logit_scale)
    return config


def build_student(config, teacher_checkpoint, device):
    """A model of `config` holding the teacher's EMA weights: all of them under the teacher's own router,
    else its backbone through model.load_backbone with the router freshly initialized."""
    rest = dict(config)
    model = create_model(rest.pop("name"), **rest)
    state = teacher_checkpoint["ema"]
    if config == on_this_machine(teacher_checkpoint["model_config"]):
        model.load_state_dict(state)
    else:
        load_backbone(model, {k: v for k, v in state.items() if not k.startswith("router.")})
    return model.to(device)


def regression_pairs(teacher, teacher_path, args, path, device):
    """(noise, labels, teacher samples in model space) for --regression-pairs seeds, made once with the
    teacher's ODE sampler and cached in `path` (written atomically; remade if made otherwise)."""
    recipe = dict(teacher=str(Path(teacher_path).resolve()), count=args.regression_pairs,
                  sampler=args.regression_sampler, steps=args.regression_steps, seed=args.seed + PAIR_SEED_OFFSET)
    if path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached["recipe"] == recipe:
            return cached["noise"].to(device), cached["labels"].to(device), cached["targets"].to(device)
    noise, labels, targets, start = [], [], [], time.time()
    for first in range(0, args.regression_pairs, args.batch_size):
        indices = range(first, min(first + args.batch_size, args.regression_pairs))
        z, y, _ = seeded_noise_and_labels(teacher, indices, recipe["seed"], device=device)
        x, _ = sample_latents(teacher, indices, recipe["seed"], recipe["sampler"], recipe["steps"], device=device)
        noise.append(z), labels.append(y), targets.append(x)
        print(f"regression pairs: {indices[-1] + 1}/{args.regression_pairs} teacher samples "
              f"({recipe['sampler']}, {recipe['steps']} steps) in {format_duration(time.time() - start)}", flush=True)
    pairs = dict(recipe=recipe, noise=torch.cat(noise).cpu(), labels=torch.cat(labels).cpu(),
                 targets=torch.cat(targets).cpu())
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(pairs, temporary)
    os.replace(temporary, path)
    return pairs["noise"].to(device), pairs["labels"].to(device), pairs["targets"].to(device)


def check_resume_compatible(checkpoint, path, config, teacher_path, args):
    """A distillation checkpoint of the same teacher, generator and student; say exactly what differs."""
    if "generator" not in checkpoint:
        raise ValueError(f"--resume {path} is not a distill.py checkpoint (it has no 'generator' entry)")
    differences = [f"{key}: checkpoint {checkpoint['model_config'].get(key)!r}, this run {value!r}"
                   for key, value in config.items() if key != "kernel" and checkpoint["model_config"].get(key) != value]
    generator = checkpoint["generator"]
    if generator["gen_steps"] != args.gen_steps:
        differences.append(f"--gen-steps: checkpoint {generator['gen_steps']}, this run {args.gen_steps}")
    if generator["teacher"] != str(Path(teacher_path).resolve()):
        differences.append(f"--teacher: checkpoint {generator['teacher']}, this run {Path(teacher_path).resolve()}")
    if differences:
        raise ValueError(f"--resume {path}: the checkpoint does not match this run: " + "; ".join(differences))


#################################################################################
#                                  Command line                                  #
#################################################################################

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    at_least_1, number_at_least_0 = in_range(int, 1), in_range(float, 0)
    add("--teacher", required=True, help="a train.py checkpoint file or run directory (its newest checkpoint)")
    add("--gen-steps", type=at_least_1, default=1, help="K, the generator's network evaluations (default %(default)s)")
    add("--router", default="teacher", choices=["teacher", *ROUTERS],
        help="router of G and the fake model: the teacher's own, or another one fine-tuned from the teacher's "
        "backbone (default %(default)s)")
    add("--query", default="static", choices=QUERIES, help="DAR query, with --router dar (default %(default)s)")
    add("--chunk", type=at_least_1, default=1, help="DAR chunk size, with --router dar (default %(default)s)")
    add("--logit-scale", default="inv-sqrt-d", choices=LOGIT_SCALES, help="with --router dar (default %(default)s)")
    add("--max-steps", type=at_least_1, default=1000, help="generator updates (default %(default)s)")
    add("--batch-size", type=at_least_1, default=64, help="generated images per update (default %(default)s)")
    add("--lr", type=number_at_least_0, default=1e-4, help="AdamW learning rate of G (default %(default)s)")
    add("--fake-lr", type=number_at_least_0, default=None, help="AdamW learning rate of the fake model (default: --lr)")
    add("--fake-updates", type=at_least_1, default=1, help="fake-model updates per generator update (DMD2: 5; "
        "default %(default)s)")
    add("--t-min", type=in_range(float, 0, 1), default=0.02, help="the DM gradient's t ~ U(t-min, t-max) (DMD: [0.02, 0.98] "
        "of the schedule; default %(default)s)")
    add("--t-max", type=in_range(float, 0, 1), default=0.98, help="(default %(default)s)")
    add("--ema-decay", type=in_range(float, 0, 1, high_excluded=True), default=0.995, help="EMA of G (default %(default)s)")
    add("--regression-weight", type=in_range(float, 0), default=0.0, help="lambda of DMD's regression loss, pixel MSE "
        "(DMD: 0.25; default %(default)s, off)")
    add("--regression-pairs", type=at_least_1, default=1000, help="(noise, teacher sample) pairs (default %(default)s)")
    add("--regression-sampler", default=DEFAULT_SAMPLER, choices=list(SAMPLERS), help="(default %(default)s)")
    add("--regression-steps", type=at_least_1, default=DEFAULT_STEPS, help="(default %(default)s)")
    add("--seed", type=in_range(int, 0), default=0, help="every random draw derives from it and the step (default %(default)s)")
    add("--results-dir", default="results", help="(default %(default)s)")
    add("--run-name", default=None, help="default: distill-<teacher run>[-<router>[-c<chunk>]]-k<K>")
    add("--resume", default=None, help="a checkpoint path, or 'auto' for the newest in the run directory")
    add("--log-every", type=at_least_1, default=20, help="(default %(default)s)")
    add("--ckpt-every", type=at_least_1, default=200,
        help="(default %(default)s; a multiple of --log-every, so that a resumed run logs the same numbers)")
    add("--keep-ckpts", type=in_range(int, 0), default=3, help="keep the newest k checkpoints; 0: all (default %(default)s)")
    add("--sample-grid", type=in_range(int, 0, 16), default=10, help="samples per class (at most 16) in the grid written at the "
        "end; 0: none (default %(default)s)")
    add("--vae", default=None, metavar="PATH_OR_ID", help="for a latent teacher: its AutoencoderKL (default: the "
        "teacher checkpoint's)")
    add("--device", type=device_arg, default=default_device())
    args = parser.parse_args(argv)
    if not 0 < args.t_min < args.t_max < 1:
        parser.error(f"--t-min and --t-max need 0 < t-min < t-max < 1, got {args.t_min} and {args.t_max}")
    if args.regression_sampler == "sde" and args.regression_steps < 2:
        parser.error("--regression-steps must be >= 2 for --regression-sampler sde")
    if args.router != "dar" and (args.chunk != 1 or args.query != "static"):
        parser.error("--chunk and --query apply to --router dar only")
    args.fake_lr = args.fake_lr or args.lr
    if args.run_name is None:
        teacher_dir = Path(args.teacher).resolve()
        teacher_run = teacher_dir.parent.parent.name if teacher_dir.parent.name == "checkpoints" else teacher_dir.name
        router = "" if args.router == "teacher" else f"-{args.router}"
        router += f"-c{args.chunk}" if args.router == "dar" else ""
        args.run_name = f"distill-{teacher_run}{router}-k{args.gen_steps}"
    return args


def main(argv=None):
    distill(parse_args(argv))


#################################################################################
#                                  Distillation                                  #
#################################################################################

def distill(args):
    """Build, resume, loop (the order of train.py)."""
    device = torch.device(args.device)
    run_dir = Path(args.results_dir) / args.run_name
    teacher_path = resolve_checkpoint(args.teacher, args.results_dir, "--teacher")
    teacher, teacher_checkpoint = load_teacher(teacher_path, device)
    data_info = teacher_checkpoint["data"]
    try:  # now: a latent teacher without its VAE fails before any work
        decode = latent_decoder(data_info, args.vae, device)
    except (OSError, ImportError) as err:
        raise type(err)(f"--teacher {teacher_path} was trained on latents and its VAE is needed: {err}") from None
    config = student_config(teacher_checkpoint["model_config"], args)
    torch.manual_seed(args.seed)
    try:
        generator = build_student(config, teacher_checkpoint, device)
    except ValueError as err:
        raise ValueError(f"--router {args.router}: {err}") from None
    if args.router == "dar":
        check_chunk(args.chunk, generator.depth, f"the teacher {config['name']}")
    generator.eval()  # G never drops labels; SiT has no other train-mode behaviour
    fake = copy.deepcopy(generator)
    ema = copy.deepcopy(generator).requires_grad_(False)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0)
    fake_optimizer = torch.optim.AdamW(fake.parameters(), lr=args.fake_lr, betas=(0.9, 0.999), weight_decay=0)

    resume_path = latest_checkpoint(run_dir) if args.resume == "auto" else args.resume
    start_step, earlier_time = 0, 0.0
    if resume_path:
        checkpoint = load_checkpoint(resume_path, device, "--resume")
        check_resume_compatible(checkpoint, resume_path, config, teacher_path, args)
        generator.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["opt"])
        fake.load_state_dict(checkpoint["fake"])
        fake_optimizer.load_state_dict(checkpoint["fake_opt"])
        start_step, earlier_time = checkpoint["step"], checkpoint["generator"]["time_s"]
    elif latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume auto to continue that run, "
                         f"or choose another --run-name / --results-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir)
    log.keep_until(start_step)
    print(f"distilling {teacher_path} (step {teacher_checkpoint['step']}, router "
          f"{teacher_checkpoint['model_config'].get('router')}) into a {args.gen_steps}-step generator, router "
          f"{config.get('router')} (chunk {config.get('chunk')}): "
          f"{sum(p.numel() for p in generator.parameters()) / 1e6:.2f}M parameters, batch {args.batch_size}, "
          f"lr {args.lr:g} / fake {args.fake_lr:g}, {args.fake_updates} fake update(s) per step, regression weight "
          f"{args.regression_weight:g}, on {device.type}; run directory {run_dir}")
    if resume_path:
        print(f"resuming from {resume_path} at step {start_step}")
    if start_step >= args.max_steps:
        print(f"the run is already at step {start_step} (--max-steps {args.max_steps}): nothing to do")
        return
    pairs = (regression_pairs(teacher, teacher_path, args, run_dir / PAIRS_FILE, device)
             if args.regression_weight > 0 else None)

    shape = (generator.in_channels, generator.input_size, generator.input_size)
    batch, last_saved, run_start = args.batch_size, None, time.time()
    sums, interval_start = {}, time.time()
    for step in range(start_step, args.max_steps):
        draws = torch.Generator().manual_seed(step_seed(args.seed, step, 0))
        z, y = torch.randn(batch, *shape, generator=draws).to(device), torch.randint(
            generator.num_classes, (batch,), generator=draws).to(device)
        t = (args.t_min + (args.t_max - args.t_min) * torch.rand(batch, generator=draws)).to(device)
        noise = torch.randn(batch, *shape, generator=draws).to(device)

        # Generator update: DMD Eq. 7-8 (+ lambda * Eq. 9).
        x = generate(generator, z, y, args.gen_steps)
        dm_loss, grad = distribution_matching_loss(x, t, noise, conditional_velocity(teacher, y),
                                                   conditional_velocity(fake.eval(), y))
        loss = dm_loss
        if pairs is not None:
            pick = torch.randint(len(pairs[0]), (batch,), generator=draws).to(device)
            regression = F.mse_loss(generate(generator, pairs[0][pick], pairs[1][pick], args.gen_steps),
                                    pairs[2][pick])  # DMD Eq. 9 with a pixel (or latent) MSE as the distance
            loss = loss + args.regression_weight * regression
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, generator, args.ema_decay)

        # Fake-model updates: the flow-matching loss on G's outputs (DMD Eq. 6), the first on this batch.
        fake.train()  # label dropout as the teacher was trained, so that the fake model keeps its null class
        for r in range(args.fake_updates):
            if r:
                z_r = torch.randn(batch, *shape, generator=draws).to(device)
                y_r = torch.randint(generator.num_classes, (batch,), generator=draws).to(device)
                with torch.no_grad():
                    x_r = generate(generator, z_r, y_r, args.gen_steps)
            else:
                x_r, y_r = x.detach(), y
            t_r = torch.rand(batch, generator=draws).to(device)
            noise_r = torch.randn(batch, *shape, generator=draws).to(device)
            torch.manual_seed(step_seed(args.seed, step, 1 + r))  # the fake model's label dropout draws from it
            fake_loss = flow_matching_loss(fake, x_r, y_r, t_r, noise_r)[0].mean()
            fake_optimizer.zero_grad(set_to_none=True)
            fake_loss.backward()
            fake_optimizer.step()

        done = step + 1
        values = dict(dm_grad=grad.abs().mean().item(), fake_loss=fake_loss.item(), steps=1.0)
        if pairs is not None:
            values["regression"] = regression.item()
        if not all(math.isfinite(v) for v in values.values()):
            raise SystemExit(f"step {done}: a loss is not finite ({values}); stopped without saving. The last good "
                             f"checkpoint, {latest_checkpoint(run_dir) or 'none yet'}, is untouched: resume it with a "
                             f"lower --lr")
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
        is_last = done == args.max_steps
        if done % args.log_every == 0 or is_last:
            steps = sums.pop("steps")
            record = {key: value / steps for key, value in sums.items()}
            record.update(step=done, images_per_s=steps * batch / (time.time() - interval_start),
                          time_s=earlier_time + time.time() - run_start)
            eta = (args.max_steps - done) * batch / record["images_per_s"]
            log.write(record, f"step {done}/{args.max_steps} | DM |grad| {record['dm_grad']:.4f} | fake loss "
                      f"{record['fake_loss']:.4f}" + (f" | regression {record['regression']:.4f}" if pairs else "")
                      + f" | {record['images_per_s']:.0f} img/s | ETA {format_duration(eta)}")
            sums, interval_start = {}, time.time()
        if done % args.ckpt_every == 0 or is_last:
            checkpoint = dict(model=generator.state_dict(), ema=ema.state_dict(), opt=optimizer.state_dict(),
                              step=done, args=vars(args), model_config=config, data=data_info,
                              rng=dict(seed=args.seed), fake=fake.state_dict(), fake_opt=fake_optimizer.state_dict(),
                              generator=dict(gen_steps=args.gen_steps, teacher=str(Path(teacher_path).resolve()),
                                             teacher_step=teacher_checkpoint["step"],
                                             time_s=earlier_time + time.time() - run_start))
            last_saved = save_checkpoint(checkpoint, run_dir / "checkpoints", args.keep_ckpts)

    print(f"done: {args.max_steps} generator updates in {format_duration(earlier_time + time.time() - run_start)}; "
          f"checkpoint {last_saved}")
    if args.sample_grid:
        how = write_sample_grid(ema, generator.num_classes, args.sample_grid, run_dir / "samples.png", device,
                                args.seed, decode, "euler", args.gen_steps)
        print(f"sample grid (EMA generator, one row per class, {how}): {run_dir / 'samples.png'}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError) as err:
        sys.exit(f"error: {err}")
