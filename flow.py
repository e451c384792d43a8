"""Flow matching for SiT: the linear interpolant, its training loss, and the samplers that integrate it.

Not a script: train.py trains with `flow_matching_loss`; sample.py generates with `sample_batch`, the
end-of-run grids of train.py and distill.py with `write_sample_grid`; diagnose.py and bench.py reuse the
loss; distill.py trains its K-step generator `generate` with `data_prediction`.

    per_sample_loss, _ = flow_matching_loss(model, x, y, t, noise)
    images, labels = sample_batch(model, range(16), seed=0, sampler="heun", steps=25)
    images, labels = sample_batch(generator, range(16), seed=0, sampler="euler", steps=1)  # a distilled G

Conventions (docs/method.md section 5, SiT's): t = 0 is noise, t = 1 is data,
x_t = t x + (1 - t) noise, and the model predicts the velocity u = dx_t/dt = x - noise.

Samplers (velocity(x, t) -> dx/dt, t a Python float in [0, 1] shared by the whole batch):
  euler  Euler ODE dx/dt = v(x, t) on `steps` equal steps (steps velocity evaluations)
  heun   Heun ODE (2nd order): the same grid, 2 * steps evaluations
  sde    Euler-Maruyama on the SDE dx = [v + w(t) s(x, t)] dt + sqrt(2 w(t)) dW, whose marginals are those
         of the ODE. s is the linear path's score from the velocity, s = (t v - x) / (1 - t), and w(t) is
         SiT's default "sigma" diffusion w(t) = sigma_t = 1 - t, so w s = t v - x has no singularity at t = 1.
         As in SiT, `steps` N makes N - 1 stochastic steps on [0, 1 - 0.04] and one final deterministic
         "mean" step of 0.04 to t = 1 (N evaluations).
(SiT's ODE `--num-sampling-steps N` is N grid points, N - 1 steps; ours counts steps.)

A K-step generator (distill.py) is the euler sampler with K steps, G(z) = euler_sample(v_G, z, K), on the
grid t_k = k / K. Each Euler step is the DDIM step through the data prediction x_hat = x_t + (1 - t) v and
the implied noise eps_hat = x_t - t v: x_{k+1} = t_{k+1} x_hat + (1 - t_{k+1}) eps_hat = x_k + (t_{k+1} - t_k) v,
and the last one lands on x_hat(x_{K-1}, t_{K-1}). So K = 1 is the one-step prediction G(z) = z + v(z, 0),
and a generator initialized from a teacher starts as the teacher's K-step Euler sampler.
"""
import math

import torch

from data import save_grid, to_uint8

SDE_LAST_STEP = 0.04  # SiT's --last-step-size
DEFAULT_SAMPLER, DEFAULT_STEPS = "heun", 25  # sample.py's defaults, also train.py's end-of-run grid

#################################################################################
#                          The interpolant and its loss                          #
#################################################################################


def interpolate(x, noise, t):
    """(x_t, u): the point of the linear path at time t (one per sample) and the target velocity."""
    t_ = t.view(-1, *([1] * (x.dim() - 1)))
    return t_ * x + (1 - t_) * noise, x - noise  # x_t = t x + (1 - t) noise, u = dx_t/dt


def data_prediction(velocity, x_t, t):
    """x_hat = E[x | x_t] = x_t + (1 - t) v: the data the velocity v at (x_t, t) points to (t one per sample)."""
    return x_t + (1 - t.view(-1, *([1] * (x_t.dim() - 1)))) * velocity


def flow_matching_loss(model, x, y, t, noise, return_hidden=None):
    """Per-sample velocity MSE |v(x_t, t, y) - u|^2 and, if asked, the hidden state block `return_hidden`
    hands on (the REPA hook)."""
    x_t, u = interpolate(x, noise, t)
    out = model(x_t, t, y, return_hidden=return_hidden)
    velocity, hidden = out if return_hidden is not None else (out, None)
    return (velocity.float() - u.float()).pow(2).mean(dim=tuple(range(1, x.dim()))), hidden


#################################################################################
#                                   Samplers                                    #
#################################################################################

def euler_sample(velocity, x, steps):
    """Euler ODE from t = 0 (noise x) to t = 1 in `steps` equal steps."""
    for i in range(steps):
        x = x + velocity(x, i / steps) / steps
    return x


def heun_sample(velocity, x, steps):
    """Heun's method (explicit trapezoid) from t = 0 to t = 1 in `steps` equal steps."""
    dt = 1 / steps
    for i in range(steps):
        t, t_next = i / steps, (i + 1) / steps
        v = velocity(x, t)
        v_next = velocity(x + dt * v, t_next)
        x = x + dt * (v + v_next) / 2
    return x


def sde_drift(velocity, x, t):
    """v + w(t) s(x, t) with w = 1 - t (SiT's "sigma" form) and s = (t v - x) / (1 - t): the (1 - t) cancels."""
    v = velocity(x, t)
    return v + (t * v - x)


def euler_maruyama_sample(velocity, x, steps, randn_like=torch.randn_like, last_step=SDE_LAST_STEP):
    """Euler-Maruyama for dx = [v + w s] dt + sqrt(2 w) dW on steps - 1 equal steps over [0, 1 - last_step],
    then the deterministic mean step x + last_step * (v + w s) to t = 1 (SiT's "Mean" last step)."""
    if steps < 2:
        raise ValueError(f"the SDE sampler needs --steps >= 2 (one stochastic step and the mean step), got {steps}")
    t_end = 1 - last_step
    dt = t_end / (steps - 1)
    for i in range(steps - 1):
        t = i * dt
        x = x + dt * sde_drift(velocity, x, t) + math.sqrt(2 * (1 - t) * dt) * randn_like(x)
    return x + last_step * sde_drift(velocity, x, t_end)


SAMPLERS = {
    "euler": lambda velocity, x, steps, randn_like: euler_sample(velocity, x, steps),
    "heun": lambda velocity, x, steps, randn_like: heun_sample(velocity, x, steps),
    "sde": lambda velocity, x, steps, randn_like: euler_maruyama_sample(velocity, x, steps, randn_like),
}


def guided_velocity(model, y, cfg_scale=1.0, cfg_interval=None, cfg_channels=None):
    """velocity(x, t) of `model` for labels y: conditional, or with classifier-free guidance
    v = v_u + s (v_c - v_u) (model.forward_with_cfg, on the first `cfg_channels` channels, all when None)
    for the t inside cfg_interval (everywhere when None)."""
    def velocity(x, t):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        if cfg_scale != 1 and (cfg_interval is None or cfg_interval[0] <= t <= cfg_interval[1]):
            return model.forward_with_cfg(x, t_batch, y, cfg_scale, cfg_channels)
        return model(x, t_batch, y)
    return velocity


#################################################################################
#                     Per-sample noise: reproducible batches                     #
#################################################################################

def sample_generators(indices, seed):
    """One CPU generator per sample, seeded with seed + index: sample i is the same in any batch or process."""
    return [torch.Generator().manual_seed(seed + i) for i in indices]


def per_sample_randn(generators, shape, device):
    """[len(generators), *shape] standard normal, row k from generators[k]."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def generate(model, z, y, steps):
    """The K-step generator G(z, y) of a model (distill.py): its Euler sampler with `steps` = K steps, with
    gradients (see the module docstring)."""
    return euler_sample(guided_velocity(model, y), z, steps)


def seeded_noise_and_labels(model, indices, seed, class_labels=None, device="cpu"):
    """(noise [B, C, H, W], labels [B], the per-sample generators): sample i's noise from generator seed + i
    and, without class_labels, its class drawn uniformly from the same generator afterwards."""
    generators = sample_generators(indices, seed)
    shape = (model.in_channels, model.input_size, model.input_size)
    dtype = next(model.parameters()).dtype  # a float64 model samples in float64
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"a model in {dtype} cannot be sampled: the samplers integrate in the model's dtype, float32 "
                         f"or float64; keep its weights in float32 (and run it under autocast for bf16)")
    x = per_sample_randn(generators, shape, device).to(dtype)
    if class_labels:
        labels = [class_labels[i % len(class_labels)] for i in indices]
    else:
        labels = [int(torch.randint(model.num_classes, (), generator=g)) for g in generators]
    return x, torch.tensor(labels, dtype=torch.int64, device=device), generators


@torch.no_grad()
def sample_latents(model, indices, seed, sampler, steps, cfg_scale=1.0, cfg_interval=None, class_labels=None,
                   device="cpu", cfg_channels=None):
    """(float samples in model space [B, C, H, W], int64 labels [B]) for the global sample indices `indices`
    (seeded_noise_and_labels)."""
    x, y, generators = seeded_noise_and_labels(model, indices, seed, class_labels, device)
    velocity = guided_velocity(model, y, cfg_scale, cfg_interval, cfg_channels)
    randn_like = lambda z: per_sample_randn(generators, z.shape[1:], z.device).to(z.dtype)  # noqa: E731
    return SAMPLERS[sampler](velocity, x, steps, randn_like), y


@torch.no_grad()
def sample_batch(model, indices, seed, sampler, steps, cfg_scale=1.0, cfg_interval=None, class_labels=None,
                 device="cpu", decode=None, cfg_channels=None):
    """(uint8 [B, C, H, W], int64 [B]) for the global sample indices `indices` (sample_latents); `decode`
    (data.latent_decoder) maps latents to images."""
    x, y = sample_latents(model, indices, seed, sampler, steps, cfg_scale, cfg_interval, class_labels, device,
                          cfg_channels)
    return to_uint8(decode(x) if decode else x).cpu(), y.cpu()


def write_sample_grid(model, num_classes, per_class, path, device, seed, decode=None, sampler=DEFAULT_SAMPLER,
                      steps=DEFAULT_STEPS):
    """A PNG with one row per class (the first 10) of `per_class` samples (decoded by `decode`,
    data.latent_decoder, for latents); returns how they were made. train.py's end-of-run grid uses sample.py's
    default sampler, distill.py's the generator's K Euler steps."""
    classes = list(range(min(num_classes, 10)))
    images, labels = sample_batch(model.eval(), range(per_class * len(classes)), seed, sampler, steps,
                                  class_labels=classes, device=device, decode=decode)
    save_grid(images, labels, path, by_class=True)
    return f"{sampler}, {steps} steps, no guidance"
