"""Cross-layer routing for SiT: how the input of every sublayer is made from the outputs before it.

Not a script: model.py builds its router with `build_router`; tests and benchmarks import the rest.
The backbone (model.py) calls, for each forward pass, `route = router.start(v0, t_emb)` and then, for
sublayers l = 1..2L in order, `h_l = route.read(shift_l, scale_l)` and `route.write(v_l)`; the final
layer calls `route.read_final(shift, scale)`. Symbols are those of docs/method.md sections 2-4.

    router = build_router("dar", depth=12, hidden_size=128, query="static", chunk=4)

Routers:
  residual  the SiT baseline: h_l = v_0 + sum_{i<l} v_i
  unet      residual plus U-ViT long skips: the second half of the blocks fuses the first half's outputs
  dar       Diffusion-Adaptive Routing (paper Eq. 5): h_l = softmax-weighted sum over the sources V_l,
            with a static, timestep or dynamic query (Eq. 6) and chunked aggregation (chunk S)
Also here: the REPA projector and loss (method.md section 4), which read the hidden state a block hands on.
"""
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTERS = ("residual", "unet", "dar")
QUERIES = ("static", "timestep", "dynamic")
KERNELS = ("auto", "torch", "cpu", "triton")  # how DAR computes Eq. 5: see mix_sources
LOGIT_SCALES = ("inv-sqrt-d", "one")  # z_i = q . k_i / sqrt(d) (method.md) or q . k_i (AttnRes), an ablation
RMS_EPS = 1e-6


def build_router(name, depth, hidden_size, query="static", chunk=1, kernel="auto", logit_scale="inv-sqrt-d"):
    """The router named as on the command line (`--router dar --query static --chunk 4 --kernel auto`)."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose one of: {', '.join(ROUTERS)}")
    if query not in QUERIES:
        raise ValueError(f"unknown query {query!r}; choose one of: {', '.join(QUERIES)}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1 (1 is dense DAR), got {chunk!r}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of: {', '.join(KERNELS)}")
    if logit_scale not in LOGIT_SCALES:
        raise ValueError(f"unknown logit scale {logit_scale!r}; choose one of: {', '.join(LOGIT_SCALES)}")
    if name == "residual":
        return ResidualRouter(depth)
    if name == "unet":
        return UNetRouter(depth, hidden_size)
    return DARRouter(depth, hidden_size, query, chunk, kernel, logit_scale)


@dataclass
class Trace:
    """What a forward pass records when asked (diagnostics, plots).

    hidden[k-1]: the hidden state block k hands on (the input of sublayer 2k+1; h_final for k = L).
    alpha[l-1]: DAR routing weights of consumer l (sublayer l, and 2L+1 for the final aggregator),
    [B, T, N] with per_token=True, else averaged over tokens to [B, N]. Empty for other routers.
    """
    per_token: bool = False
    hidden: list = field(default_factory=list)
    alpha: list = field(default_factory=list)


class Route:
    """The state of one forward pass: tracks the sublayer index and records what a Trace asks for."""

    def __init__(self, depth, trace, keep_hidden):
        self.depth = depth
        self.written = 0  # number of sublayer outputs v_1..v_l handed in so far
        self.trace = trace
        self.keep_hidden = trace is not None or keep_hidden is not None
        self.handed_on = []

    def read(self, shift, scale):
        """h_{l+1}: the input of the next sublayer."""
        h = self.aggregate(self.written, shift, scale)
        if self.written > 0 and self.written % 2 == 0:
            self._hand_on(h)
        return h

    def read_final(self, shift, scale):
        """h_final: what the final layer reads."""
        h = self.aggregate(2 * self.depth, shift, scale, final=True)
        self._hand_on(h)
        return h

    def write(self, v):
        self.add(v)
        self.written += 1

    def _hand_on(self, h):
        if self.keep_hidden:
            self.handed_on.append(h)
            if self.trace is not None:
                self.trace.hidden.append(h)

    def record_alpha(self, alpha):
        if self.trace is not None:
            self.trace.alpha.append(alpha if self.trace.per_token else alpha.mean(dim=1))


#################################################################################
#                     residual: the SiT baseline, bit for bit                    #
#################################################################################

class ResidualRouter(nn.Module):
    zero_timestep_embedding = False

    def __init__(self, depth):
        super().__init__()
        self.depth = depth

    def reset_parameters(self):
        pass

    def start(self, v0, t_emb, trace=None, keep_hidden=None):
        return ResidualRoute(self, v0, trace, keep_hidden)


class ResidualRoute(Route):
    def __init__(self, router, v0, trace, keep_hidden):
        super().__init__(router.depth, trace, keep_hidden)
        self.stream = v0

    def aggregate(self, l, shift, scale, final=False):
        return self.stream  # h_l = v_0 + sum_{i=1}^{l-1} v_i

    def add(self, v):
        self.stream = self.stream + v


#################################################################################
#                      unet: U-ViT long skips (paper Sec. 4.1)                   #
#################################################################################

class UNetRouter(nn.Module):
    """Residual stream, plus: block L-1-j (0-based) starts from skip_linears[j](concat[stream, skip_j]),
    skip_j the output of block j, for j < L // 2 (an odd L leaves the middle block without a skip)."""
    zero_timestep_embedding = False

    def __init__(self, depth, hidden_size):
        super().__init__()
        self.depth = depth
        self.skip_linears = nn.ModuleList([nn.Linear(2 * hidden_size, hidden_size) for _ in range(depth // 2)])

    def reset_parameters(self):
        # Our choice (docs/method.md section 3): [I, 0] so that the untrained model is exactly the residual baseline.
        for linear in self.skip_linears:
            d = linear.out_features
            with torch.no_grad():
                linear.weight.zero_()
                linear.weight[:, :d].copy_(torch.eye(d))
                linear.bias.zero_()

    def start(self, v0, t_emb, trace=None, keep_hidden=None):
        return UNetRoute(self, v0, trace, keep_hidden)


class UNetRoute(ResidualRoute):
    def __init__(self, router, v0, trace, keep_hidden):
        super().__init__(router, v0, trace, keep_hidden)
        self.skip_linears = router.skip_linears
        self.skips = []

    def aggregate(self, l, shift, scale, final=False):
        block = l // 2  # 0-based block that reads h_{l+1}
        j = self.depth - 1 - block
        if not final and l % 2 == 0 and j < len(self.skip_linears):
            self.stream = self.skip_linears[j](torch.cat([self.stream, self.skips[j]], dim=-1))
        return self.stream

    def add(self, v):
        super().add(v)
        block_done = (self.written + 1) % 2 == 0
        if block_done and len(self.skips) < len(self.skip_linears):
            self.skips.append(self.stream)


#################################################################################
#                   dar: Diffusion-Adaptive Routing (paper Eq. 5, 6)             #
#################################################################################

def dar_mix(sources, query, gain, eps=RMS_EPS):
    """Eq. 5 for one consumer: h = sum_i alpha_i s_i, alpha = softmax_i(q . RMSNorm(s_i) / sqrt(d)).

    sources: list of N tensors [B, T, d] (kept as a list: stacking would copy the whole history).
    query: [d] (static), [B, 1, d] (timestep) or [B, T, d] (dynamic). gain: [d], the RMSNorm gain.
    Returns h [B, T, d] and alpha [B, T, N]. Half-precision inputs are accumulated in float32.
    The key RMSNorm(s_i) = g * s_i / rms(s_i) is never materialized: q . k_i = ((q * g) . s_i) / rms(s_i).
    """
    d, dtype = sources[0].shape[-1], _mix_dtype(sources, query, gain)
    qg = (query * gain).to(dtype)
    logits = []
    for s in sources:
        s = s.to(dtype)
        inv_rms = torch.rsqrt(s.pow(2).mean(dim=-1) + eps)
        logits.append(torch.linalg.vecdot(s, qg) * inv_rms / math.sqrt(d))  # z_i = q . k_i / sqrt(d)
    alpha = torch.stack(logits, dim=-1).softmax(dim=-1)  # Eq. 5: softmax over sources, per token
    h = alpha[..., 0, None] * sources[0]
    for i in range(1, len(sources)):
        h = h + alpha[..., i, None] * sources[i]
    return h, alpha


def mix_sources(sources, query, gain, kernel="auto", need_alpha=True):
    """Eq. 5 with the chosen implementation: kernel "torch" is dar_mix, "cpu" cpu_dar_mix (a custom op with
    a hand-written backward, below), "triton" the fused kernel of router_triton (imported only here, so that
    the rest of the project never needs triton), "auto" the fused kernel for CUDA sources and cpu_dar_mix
    elsewhere. alpha may be None when need_alpha is False."""
    if kernel == "torch":
        return dar_mix(sources, query, gain)
    if kernel == "cpu" or (kernel == "auto" and not sources[0].is_cuda):
        return cpu_dar_mix(sources, query, gain)
    from router_triton import fused_dar_mix
    return fused_dar_mix(sources, query, gain, RMS_EPS, return_alpha=need_alpha)


def _mix_dtype(sources, query, gain):
    """The accumulation dtype: float32 for half-precision inputs, float64 when any input is float64."""
    return functools.reduce(torch.promote_types, [t.dtype for t in (query, gain, *sources)], torch.float32)


class SourceMixer(nn.Module):
    """The routing parameters of one consumer l: RMSNorm_l gain and query w_l (or W_l, dynamic)."""

    def __init__(self, hidden_size, query):
        super().__init__()
        self.query_kind = query
        self.gain = nn.Parameter(torch.ones(hidden_size))
        if query == "dynamic":
            self.query_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        else:
            self.query = nn.Parameter(torch.zeros(hidden_size))

    def reset_parameters(self):
        nn.init.ones_(self.gain)
        if self.query_kind == "dynamic":
            nn.init.zeros_(self.query_proj.weight)
        else:
            nn.init.zeros_(self.query)

    def make_query(self, sources, shift, scale, t_emb):
        """Eq. 6: static q_l = w_l; timestep q_l = w_l + e(t); dynamic q_l = W_l u_l per token."""
        if self.query_kind == "static":
            return self.query
        if self.query_kind == "timestep":
            return (self.query + t_emb).unsqueeze(1)
        s_last = sources[-1]
        u = F.layer_norm(s_last, s_last.shape[-1:], eps=1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return self.query_proj(u)


def chunk_sources(l, depth, chunk):
    """V_l, the sources consumer l reads (sublayers l = 1..2L, and 2L + 1 for the final aggregator), as
    (first, last) sublayer ranges: (0, 0) is v_0, (i, i) the raw output v_i, and a longer range the summary
    c_n = v_first + ... + v_last of a finished chunk (with S = 1 every summary is one raw output: dense DAR).

    Chunk n covers sublayers (n-1)S+1 .. nS, and consumer l in chunk m reads
    V_l = [v_0, c_1, ..., c_{m-1}, v_{(m-1)S+1}, ..., v_{l-1}]. The final aggregator closes no chunk: it reads
    the raw outputs of the last chunk even when S divides 2L (summaries are folded when the next chunk's
    first sublayer reads, and no sublayer comes after the last chunk).
    """
    written = l - 1  # v_1 .. v_{l-1} exist when consumer l reads
    closed = (written - 1) // chunk if l == 2 * depth + 1 else written // chunk
    summaries = [(n * chunk + 1, (n + 1) * chunk) for n in range(closed)]
    return [(0, 0)] + summaries + [(i, i) for i in range(closed * chunk + 1, written + 1)]


class DARRouter(nn.Module):
    """mixers[l - 2] holds the routing parameters of consumer l = 2..2L+1 (2L + 1: the final aggregator).

    Sublayer 1 has none: it reads v_0 alone, so alpha = 1 and h_1 = v_0 whatever its query and gain are;
    they would never receive a gradient.
    """

    def __init__(self, depth, hidden_size, query, chunk, kernel="auto", logit_scale="inv-sqrt-d"):
        super().__init__()
        self.kernel = kernel
        # Both implementations of Eq. 5 divide by sqrt(d); scaling q by sqrt(d) gives AttnRes's z_i = q . k_i.
        self.query_multiplier = math.sqrt(hidden_size) if logit_scale == "one" else None
        self.depth = depth
        self.query = query
        self.chunk = chunk
        self.zero_timestep_embedding = query == "timestep"  # e(t) = 0 at step 0: static's routing weights (c still differs)
        self.mixers = nn.ModuleList([SourceMixer(hidden_size, query) for _ in range(2 * depth)])

    def reset_parameters(self):
        for mixer in self.mixers:
            mixer.reset_parameters()

    def start(self, v0, t_emb, trace=None, keep_hidden=None):
        return DARRoute(self, v0, t_emb, trace, keep_hidden)


class DARRoute(Route):
    """Chunked aggregation: each consumer reads the sources chunk_sources lists. Only what some later consumer
    reads stays referenced: v_0, the summaries of finished chunks, and the raw outputs of the chunk being
    filled (at most 1 + M + S tensors); a raw output is dropped once its chunk is summarized."""

    def __init__(self, router, v0, t_emb, trace, keep_hidden):
        super().__init__(router.depth, trace, keep_hidden)
        self.mixers = router.mixers
        self.chunk = router.chunk
        self.kernel = router.kernel
        self.query_multiplier = router.query_multiplier
        self.t_emb = t_emb
        self.stored = {(0, 0): _as_source(v0)}  # (first, last) sublayer range -> v_0, a raw output or a summary

    def aggregate(self, l, shift, scale, final=False):
        """h_{l+1} (h_final when final): the input of the consumer after the l sublayer outputs written so far."""
        consumer = l + 1
        ranges = chunk_sources(consumer, self.depth, self.chunk)
        for first, last in ranges:
            if (first, last) not in self.stored:  # chunk first..last has just finished
                summary = self.stored.pop((first, first))
                for i in range(first + 1, last + 1):
                    summary = summary + self.stored.pop((i, i))  # c_n = sum of the v_i in chunk n
                self.stored[(first, last)] = summary
        sources = [self.stored[r] for r in ranges]
        if consumer == 1:
            self.record_alpha(torch.ones(*sources[0].shape[:-1], 1, dtype=sources[0].dtype, device=sources[0].device))
            return sources[0]  # h_1 = v_0: one source, alpha = 1
        mixer = self.mixers[consumer - 2]
        query = mixer.make_query(sources, shift, scale, self.t_emb)
        if self.query_multiplier is not None:
            query = query * self.query_multiplier
        h, alpha = mix_sources(sources, query, mixer.gain, self.kernel, need_alpha=self.trace is not None)
        self.record_alpha(alpha)
        return h

    def add(self, v):
        self.stored[(self.written + 1, self.written + 1)] = v


#################################################################################
#        dar: Eq. 5 as a custom op with a hand-written backward (CPU path)       #
#################################################################################

def cpu_dar_mix(sources, query, gain, eps=RMS_EPS):
    """Eq. 5 for one consumer, as dar_mix (same arguments and results), in few passes over each source.

    dar_mix leaves autograd to record about ten ops on [B, T, d] tensors per source, each a pass over
    memory that allocates a fresh temporary; on a CPU that traffic, not the arithmetic, is what DAR costs.
    Here one loop reads each source once, while it is in cache: its norm, a matrix-vector product for the
    logit and an in-place multiply-add into h (an online softmax); the backward, written by hand, is one such
    loop too, and keeps only h and [N, B, T] statistics besides the sources. It is the custom op dar::mix,
    so that torch.compile captures a whole DAR model and calls it as it is.
    bf16/fp16 sources are read as they are (one source at a time converted) and accumulated in float32.

    Backward, per token, with r_i = rms(s_i)^-1, z_i = (q g . s_i) r_i / sqrt(d) and upstream gradient dh:
      through h = sum_i alpha_i s_i and the softmax, dz_i = alpha_i (dh . s_i - delta) with delta = dh . h
      (h is saved: the next sublayer's LayerNorm keeps it anyway); with dr_i/ds_i = -r_i^3 s_i / d,
      dL/ds_i = alpha_i dh + c_i q g - dz_i z_i r_i^2 / d s_i,  where c_i = dz_i r_i / sqrt(d);
      dL/d(q g) = sum_i c_i s_i, summed over the tokens that share q; dq = g dL/d(q g), dg = q dL/d(q g).
    """
    h, alpha, _, _ = torch.ops.dar.mix(sources, query, gain, eps)
    return h, alpha.permute(1, 2, 0)  # [N, B, T] -> dar_mix's [B, T, N]


def _as_source(v0):
    """v_0 in the layout and dtype of the other sources: one copy per forward pass instead of one per consumer.
    The patch embedding hands it over transposed in memory, which every consumer would read against the grain,
    and under autocast in float32 (the position embedding is) while every v_l is in the autocast dtype."""
    device = v0.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else v0.dtype
    return v0.to(dtype, memory_format=torch.contiguous_format)


def _logit_dots(s, query_gain):
    """q g . s per token, [B, T], for a [d] (static), [B, 1, d] (timestep) or [B, T, d] (dynamic) query."""
    if query_gain.dim() == 1:
        return s @ query_gain
    if query_gain.shape[1] == 1:
        return (s @ query_gain.mT).squeeze(-1)
    return torch.linalg.vecdot(s, query_gain)


def _add_query_gradient(grad, s, c):
    """grad += c s summed over the tokens that share a query (c [B, T]), as a matrix product where it can."""
    if grad.dim() == 1:
        grad.addmv_(s.flatten(0, 1).T, c.flatten())
    elif grad.shape[1] == 1:
        grad.baddbmm_(c.unsqueeze(1), s)
    else:
        grad.addcmul_(s, c.unsqueeze(-1))


@torch.library.custom_op("dar::mix", mutates_args=())
def _mix(sources: list[torch.Tensor], query: torch.Tensor, gain: torch.Tensor,
         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h [B, T, d], alpha, z, r), the last three [N, B, T], in the accumulation dtype."""
    dtype, dim = _mix_dtype(sources, query, gain), sources[0].shape[-1]
    query_gain = query.to(dtype) * gain.to(dtype)
    logits = sources[0].new_empty((len(sources), *sources[0].shape[:-1]), dtype=dtype)
    inv_rms = torch.empty_like(logits)
    for i, source in enumerate(sources):
        s = source.to(dtype)
        torch.linalg.vector_norm(s, dim=-1, out=inv_rms[i])
        inv_rms[i].square_().div_(dim).add_(eps).rsqrt_()
        # z_i = q . k_i / sqrt(d) with k_i = g s_i r_i
        torch.mul(_logit_dots(s, query_gain), inv_rms[i], out=logits[i]).div_(math.sqrt(dim))
        # Eq. 5 as an online softmax: each source is added to h while it is still in cache, and what was summed
        # so far is rescaled to the running maximum of the logits
        if i == 0:
            running_max, total = logits[0].clone(), torch.ones_like(logits[0])
            h = s.clone() if s is source else s  # h must not alias a source
            continue
        new_max = torch.maximum(running_max, logits[i])
        rescale = (running_max - new_max).exp_()
        weight = (logits[i] - new_max).exp_()
        total.mul_(rescale).add_(weight)
        h.mul_(rescale[..., None]).addcmul_(s, weight[..., None])
        running_max = new_max
    h.div_(total[..., None])
    alpha = (logits - running_max - total.log()).exp_()
    return h, alpha, logits, inv_rms


@_mix.register_fake
def _(sources, query, gain, eps):
    dtype = _mix_dtype(sources, query, gain)
    stats = [sources[0].new_empty((len(sources), *sources[0].shape[:-1]), dtype=dtype) for _ in range(3)]
    return sources[0].new_empty(sources[0].shape, dtype=dtype), *stats


@torch.library.custom_op("dar::mix_backward", mutates_args=())
def _mix_backward(sources: list[torch.Tensor], query: torch.Tensor, gain: torch.Tensor, h: torch.Tensor,
                  alpha: torch.Tensor, logits: torch.Tensor, inv_rms: torch.Tensor,
                  grad_h: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(dL/ds_i for every source, dL/dq, dL/dg), from what dar::mix saved (cpu_dar_mix's docstring); one pass
    of the loop per source, so that each is read while it is in cache."""
    dtype, dim = alpha.dtype, grad_h.shape[-1]
    grad_h = grad_h.to(dtype)
    query_gain = query.to(dtype) * gain.to(dtype)
    delta = torch.linalg.vecdot(grad_h, h)
    grad_query_gain = torch.zeros_like(query_gain)
    grad_sources = []
    for i, source in enumerate(sources):
        s = source.to(dtype)
        grad = torch.mul(grad_h, s)  # first dh * s_i, for dh . s_i; then the gradient itself, in the same memory
        grad_logit = grad.sum(dim=-1).sub_(delta).mul_(alpha[i])  # dz_i = alpha_i (dh . s_i - delta)
        c = grad_logit * inv_rms[i] / math.sqrt(dim)
        rms_term = (grad_logit * logits[i]).mul_(inv_rms[i].square()).div_(dim)
        torch.mul(grad_h, alpha[i, ..., None], out=grad)
        grad.addcmul_(c[..., None], query_gain).addcmul_(s, rms_term[..., None], value=-1)
        _add_query_gradient(grad_query_gain, s, c)
        grad_sources.append(grad.to(source.dtype))
    grad_gain = (grad_query_gain * query).reshape(-1, dim).sum(dim=0)
    return grad_sources, (grad_query_gain * gain).to(query.dtype), grad_gain.to(gain.dtype)


@_mix_backward.register_fake
def _(sources, query, gain, h, alpha, logits, inv_rms, grad_h):
    return [torch.empty_like(s) for s in sources], torch.empty_like(query), torch.empty_like(gain)


def _save_for_mix_backward(ctx, inputs, output):
    sources, query, gain, _ = inputs
    h, alpha, logits, inv_rms = output
    ctx.save_for_backward(query, gain, h, alpha, logits, inv_rms, *sources)
    ctx.mark_non_differentiable(alpha, logits, inv_rms)


def _mix_gradients(ctx, grad_h, *_):
    query, gain, h, alpha, logits, inv_rms, *sources = ctx.saved_tensors
    grad_sources, grad_query, grad_gain = torch.ops.dar.mix_backward(
        sources, query, gain, h, alpha, logits, inv_rms, grad_h)
    return grad_sources, grad_query, grad_gain, None


_mix.register_autograd(_mix_gradients, setup_context=_save_for_mix_backward)


#################################################################################
#                        REPA: representation alignment hook                     #
#################################################################################

class REPAProjector(nn.Sequential):
    """Per-token MLP d -> 2048 -> 2048 -> z_dim with SiLU between (method.md section 4)."""

    def __init__(self, hidden_size, z_dim, projector_dim=2048):
        super().__init__(
            nn.Linear(hidden_size, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, z_dim),
        )


def repa_loss(projected, target):
    """Mean over batch and tokens of -cos(projected, target), both [B, T, z_dim], normalized in float32."""
    if projected.shape != target.shape:
        raise ValueError(f"REPA: projected hidden states {tuple(projected.shape)} and encoder features "
                         f"{tuple(target.shape)} must have the same [batch, tokens, z_dim] shape")
    projected = F.normalize(projected.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return -(projected * target).sum(dim=-1).mean()
