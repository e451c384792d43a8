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

import router_cpu

ROUTERS = ("residual", "unet", "dar")
QUERIES = ("static", "timestep", "dynamic")
KERNELS = ("auto", "torch", "cpu", "triton")  # how DAR computes Eq. 5: see mix_sources
KERNEL_HELP = ("how DAR computes Eq. 5: auto (the C++ kernel on CPU, fused Triton on CUDA), torch (the plain PyTorch "
               "reference), cpu or triton")  # the --kernel of train.py, sample.py, diagnose.py
LOGIT_SCALES = ("inv-sqrt-d", "one")  # z_i = q . k_i / sqrt(d) (method.md) or q . k_i (AttnRes), an ablation
RMS_EPS = 1e-6
GROUP_SIZE = 8  # at most this many DAR consumers share one pass over their common sources (DARRoute._group)


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


def check_chunk(chunk, depth, model):
    """A DAR chunk S of 2L or more never closes: every consumer reads v_0 and every output so far, which is dense
    DAR (S = 1) under another name. Legal for build_router (tests use it for models of a few blocks); train.py and
    distill.py refuse it on their command line with this error (`model` names the model in it)."""
    if chunk >= 2 * depth:
        raise ValueError(f"--chunk {chunk}: {model} has {2 * depth} sublayers, and a chunk of {2 * depth} or more "
                         f"never closes: that is dense DAR, --chunk 1. Pass --chunk 1, or a chunk in [2, {2 * depth - 1}]")


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


def mix_sources(sources, query, gain, kernel="auto", need_alpha=True, gradient_sums=None):
    """Eq. 5 with the chosen implementation: kernel "torch" is dar_mix, "cpu" cpu_dar_mix (the C++ kernel of
    router_cpu.cpp, below; router_cpu.py builds and binds it), "triton" the fused kernel of router_triton
    (imported only here, so that the rest of the project never needs triton), "auto" the fused kernel for CUDA
    sources and cpu_dar_mix elsewhere (dar_mix where the C++ kernel cannot be built). alpha may be None when
    need_alpha is False. gradient_sums: one SourceGradient per source, or None; dar_mix ignores them (see cpu_dar_mix)."""
    kernel = chosen_kernel(kernel, sources[0])
    if kernel == "torch":
        return dar_mix(sources, query, gain)
    if kernel == "cpu":
        return cpu_dar_mix(sources, query, gain, gradient_sums=gradient_sums)
    from router_triton import fused_dar_mix
    return fused_dar_mix(sources, query, gain, RMS_EPS, return_alpha=need_alpha, gradient_sums=gradient_sums)


def check_kernel(kernel, device):
    """A --kernel that cannot run on `device` (the model's: "cpu", "cuda", ...) is an error naming it, before any
    work: the C++ kernel reads CPU tensors, the Triton one CUDA tensors (CPU tensors in Triton's interpreter,
    TRITON_INTERPRET=1, which the tests use: router_triton.kernel_device)."""
    device = torch.device(device).type
    if kernel == "cpu" and device != "cpu":
        raise ValueError(f"--kernel cpu computes on the CPU, and the model is on {device}: use auto, triton or torch")
    if kernel == "triton":
        try:
            from router_triton import kernel_device
        except ImportError as err:
            raise ValueError(f"--kernel triton needs the triton package ({err}): use auto, cpu or torch") from None
        if device != kernel_device():
            where = "in Triton's interpreter (TRITON_INTERPRET=1)" if kernel_device() == "cpu" else "compiled"
            raise ValueError(f"--kernel triton runs on {kernel_device()} here ({where}), and the model is on "
                             f"{device}: use auto, cpu or torch")


def chosen_kernel(kernel, source):
    """The kernel that computes Eq. 5 for sources like `source`: kernel itself, unless it is "auto"."""
    if kernel != "auto":
        return kernel
    if source.is_cuda:
        return "triton"
    return "cpu" if source.is_cpu and router_cpu.cpu_kernel_available() else "torch"


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
        u = modulate(F.layer_norm(s_last, s_last.shape[-1:], eps=1e-6), shift, scale)
        return self.query_proj(u)


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, with one (shift, scale) per sample broadcast over tokens (model.py's
    blocks and the dynamic query's u_l)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


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
    filled (at most 1 + M + S tensors); a raw output is dropped once its chunk is summarized.

    In eager training with a fast kernel (C++ or Triton) every source also has a SourceGradient: the kernel's
    backward adds each consumer's dL/ds_i into it, and autograd receives one gradient per source instead of one
    per (consumer, source) pair to add up.

    With the C++ kernel and a shared query (static, timestep), consumers also mix in groups (_group): the first
    consumer of a group reads the sources they all start with once for all of them, and each later one mixes
    what it computed for it with the sources written since (cpu_dar_mix_group). Same numbers, fewer passes over
    memory: at chunk 4 a source is otherwise read by about seven consumers, each reading it forward and backward."""

    def __init__(self, router, v0, t_emb, trace, keep_hidden):
        super().__init__(router.depth, trace, keep_hidden)
        self.mixers = router.mixers
        self.chunk = router.chunk
        self.kernel = router.kernel
        self.query_multiplier = router.query_multiplier
        self.t_emb = t_emb
        # torch.compile traces the functional custom ops instead (their autograd returns every gradient)
        kernel, eager = chosen_kernel(router.kernel, v0), not torch.compiler.is_compiling()
        sums_gradients = torch.is_grad_enabled() and eager and kernel in ("cpu", "triton")
        self.gradient_sums = {} if sums_gradients else None  # (first, last) -> SourceGradient
        # Consumers mix in groups (_group) with the C++ kernel in eager mode, for shared queries (a dynamic query
        # depends on the sources written after a group's first consumer), when no routing weights are asked for
        self.groups = kernel == "cpu" and eager and router.query != "dynamic" and trace is None
        self.prefixes = {}  # consumer -> (P, lse_P, how many sources P mixes), from its group's first consumer
        self.stored = {}  # (first, last) sublayer range -> v_0, a raw output or a summary
        self.v0 = _as_source(v0)  # h_1, which is v_0 itself, not its `collect` (see _store)
        # the dtype each h is handed on in (aggregate): the model's, or under autocast the kernel's own
        self.hand_on_dtype = None if torch.is_autocast_enabled(v0.device.type) else self.v0.dtype
        self._store((0, 0), self.v0)

    def aggregate(self, l, shift, scale, final=False):
        """h_{l+1} (h_final when final): the input of the consumer after the l sublayer outputs written so far.
        Every kernel returns h in its accumulation dtype (float32 for bf16 or fp16 sources): under autocast the next
        sublayer takes it so, but a model cast to bf16 or fp16 needs its own dtype back."""
        h = self._mix(l, shift, scale)
        return h if self.hand_on_dtype in (None, h.dtype) else h.to(self.hand_on_dtype)

    def _mix(self, l, shift, scale):
        consumer = l + 1
        ranges = chunk_sources(consumer, self.depth, self.chunk)
        for first, last in ranges:
            if (first, last) not in self.stored:  # chunk first..last has just finished
                summary = self._take((first, first))
                for i in range(first + 1, last + 1):
                    summary = summary + self._take((i, i))  # c_n = sum of the v_i in chunk n
                self._store((first, last), summary)
        sources = [self.stored[r] for r in ranges]
        if consumer == 1:
            self.record_alpha(torch.ones(*self.v0.shape[:-1], 1, dtype=self.v0.dtype, device=self.v0.device))
            return self.v0  # h_1 = v_0: one source, alpha = 1
        mixer = self.mixers[consumer - 2]
        query = self._query(consumer, sources, shift, scale)
        gradient_sums = None  # the functional backward, also where a source needs no gradient (it has no sum)
        if self.gradient_sums is not None and all(r in self.gradient_sums for r in ranges):
            gradient_sums = [self.gradient_sums[r] for r in ranges]
        prefix = self.prefixes.pop(consumer, None)
        if self.groups and (gradient_sums is not None or not torch.is_grad_enabled()):
            if prefix is not None:  # a later consumer of a group: the group's prefix, then its own newer sources
                rows, logit, shared = prefix
                (h,), _ = cpu_dar_mix_group(sources[shared:], [query], [mixer.gain],
                                            gradient_sums and gradient_sums[shared:], prefix=(rows, logit))
                return h
            group = self._group(consumer, ranges)
            if len(group) > 1:  # the first consumer of a group: every member's prefix, and its own h
                # a shared query needs neither the member's sources nor its shift and scale (a dynamic one would)
                queries = [query] + [self._query(c, sources, shift, scale) for c in group[1:]]
                outputs, lse = cpu_dar_mix_group(sources, queries, [self.mixers[c - 2].gain for c in group],
                                                 gradient_sums)
                self.prefixes = {c: (rows, logit, len(sources))
                                 for c, rows, logit in zip(group[1:], outputs[1:], lse[1:])}
                return outputs[0]
        h, alpha = mix_sources(sources, query, mixer.gain, self.kernel, need_alpha=self.trace is not None,
                               gradient_sums=gradient_sums)
        self.record_alpha(alpha)
        return h

    def _query(self, consumer, sources, shift, scale):
        query = self.mixers[consumer - 2].make_query(sources, shift, scale, self.t_emb)
        return query if self.query_multiplier is None else query * self.query_multiplier

    def _group(self, consumer, ranges):
        """The consumers that share one pass of the kernel over `ranges`, consumer's sources: consumer and the ones
        after it whose sources start with the same ranges, at most GROUP_SIZE. After a chunk's first consumer (which
        reads v_0 and the summaries) that is every later consumer, across chunks; after any other, the rest of its
        chunk (and the final aggregator after the last chunk); with chunk 1, every later consumer. The first
        consumer mixes the shared sources for all of them; each later one mixes that prefix with its own newer
        sources (cpu_dar_mix_group). Reading each shared source once per group instead of once per consumer is what
        makes it faster. A later member whose newer sources lack a gradient sum while training (something detached
        them) mixes alone; its prefix then gets a zero gradient, and its query and gain a zero one where they would
        otherwise get none."""
        group = [consumer]
        while len(group) < GROUP_SIZE and group[-1] <= 2 * self.depth:
            if chunk_sources(group[-1] + 1, self.depth, self.chunk)[:len(ranges)] != ranges:
                break
            group.append(group[-1] + 1)
        return group

    def add(self, v):
        self._store((self.written + 1, self.written + 1), v)

    def _store(self, key, source):
        """Keep a source; with gradient sums, as its SourceGradient's `collect`, which must not leave the route
        (a gradient read at it would miss every consumer's share). A source that needs no gradient gets none:
        its consumers use the functional backward."""
        if self.gradient_sums is not None and source.requires_grad:
            self.gradient_sums[key] = SourceGradient()
            source = self.gradient_sums[key].collect(source)
        self.stored[key] = source

    def _take(self, key):
        """The raw output `key`, no longer kept: its chunk is being summarized."""
        if self.gradient_sums is not None:
            self.gradient_sums.pop(key, None)
        return self.stored.pop(key)


#################################################################################
#    dar: Eq. 5 by a compiled C++ kernel, custom ops dar::mix, dar::mix_group   #
#################################################################################

def cpu_dar_mix(sources, query, gain, eps=RMS_EPS, gradient_sums=None):
    """Eq. 5 for one consumer, as dar_mix (same arguments and results), by the C++ kernel of router_cpu.cpp.

    dar_mix leaves autograd to record about ten ops on [B, T, d] tensors per source, each a pass over
    memory that allocates a fresh temporary; on a CPU that traffic, not the arithmetic, is what DAR costs.
    The kernel works one token at a time: each source's d features are read from memory once, and the norm,
    logit, softmax and weighted sum (forward) or every gradient (backward, written by hand: the formulas are
    in router_cpu.cpp) work on them in cache. Without gradient sums it is the custom op dar::mix with its autograd
    registered, so that torch.compile captures a whole DAR model and calls it as it is. bf16/fp16 sources are read
    as they are and accumulated in float32. The kernel is compiled the first time it is needed (cpu_kernel_available).

    gradient_sums: None, or one SourceGradient per source, each source being its SourceGradient's `collect`. The
    backward then adds dL/ds_i into gradient_sums[i] instead of returning it (eager mode: router_cpu.MixGroup, a
    group of one).
    """
    router_cpu.require_cpu_kernel()
    dtype = _mix_dtype(sources, query, gain)
    source_dtype = dtype if dtype == torch.float64 else sources[0].dtype  # float64 accumulation: float64 sources
    if any(s.dtype != source_dtype for s in sources):
        sources, gradient_sums = [s.to(dtype) for s in sources], None  # converted: not the sources the sums are of
    sources = [s.contiguous() for s in sources]
    if gradient_sums is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        h, _, alpha = router_cpu.MixGroup.apply(eps, gradient_sums, 1, None, None, query, gain, *sources)
        alpha = alpha[:, :, 0]
    else:
        h, alpha, _, _ = torch.ops.dar.mix(sources, query, gain, eps)
    return h, alpha


def cpu_dar_mix_group(sources, queries, gains, gradient_sums=None, prefix=None, eps=RMS_EPS):
    """Eq. 5 for G consumers that read the same sources, in one pass over them (see DARRoute._group): returns each
    consumer's mix of these sources (a group's first consumer's h, its later members' P) and the log-sum-exp of
    their logits, lse [G, B, T]. Or, given prefix = (P, lse_P), for one consumer whose sources are the ones a
    group's first consumer read, which P mixes, followed by `sources`: P is then one more item, of logit lse_P (a
    softmax over every source splits into the two parts' softmaxes), and the result is the consumer's h.

    Shared queries only (static, timestep); sources of one dtype, which sets the accumulation dtype (float64 only
    for float64 sources). gradient_sums: one SourceGradient per source, each source being its `collect`; required
    when a gradient will be taken (the backward adds into them)."""
    router_cpu.require_cpu_kernel()
    if torch.is_grad_enabled() and gradient_sums is None:
        raise ValueError("cpu_dar_mix_group: gradient_sums are required when a gradient may be taken "
                         "(or call it under torch.no_grad)")
    if any(s.dtype != sources[0].dtype for s in sources):
        raise ValueError(f"cpu_dar_mix_group: sources of one dtype, got {sorted({str(s.dtype) for s in sources})}")
    sources = [s.contiguous() for s in sources]
    prefix_rows, prefix_logit = prefix if prefix is not None else (None, None)
    if not torch.is_grad_enabled():  # sampling: the op alone, without autograd.Function's ~40 us per call
        outputs, lse, *_ = torch.ops.dar.mix_group(sources, list(queries), list(gains), prefix_rows, prefix_logit, eps)
        return outputs, lse
    *outputs, lse, _ = router_cpu.MixGroup.apply(eps, gradient_sums, len(queries), prefix_rows, prefix_logit,
                                                 *queries, *gains, *sources)
    return outputs, lse


class SourceGradient:
    """dL/ds of one source s, summed over its consumers by the backward of the fast kernels (C++, Triton).

    Autograd would receive one gradient tensor per (consumer, source) pair and add them up, a pass over
    memory for each; here each consumer's backward adds its term into one buffer per source, as it computes
    it, and `collect(s)`, the s the consumers read, hands the total to autograd once. A total belongs to one
    backward pass (autograd's graph task): a pass that stopped short of s (torch.autograd.grad of an
    intermediate tensor, retain_graph) leaves nothing for the next pass to add to."""

    def __init__(self):
        self.total = None
        self.graph_task = None  # the backward pass whose terms `total` holds; None: nothing added yet

    def collect(self, source):
        return _HandOnGradientSum.apply(self, source)

    def buffer_for(self, source):
        """(buffer, accumulate): where a consumer's backward puts its dL/ds, and whether it adds to what the
        buffer holds (an earlier consumer of this backward pass wrote it) or writes over it."""
        if self.total is None:
            self.total = torch.empty_like(source)
        graph_task = torch._C._current_graph_task_id()
        accumulate, self.graph_task = self.graph_task == graph_task, graph_task
        return self.total, accumulate

    def take(self):
        """The total of this backward pass (None if no consumer added to it), no longer kept. (Whenever autograd
        reaches a source, its consumers have run in the same pass; the graph-task check is a guard.)"""
        total = self.total if self.graph_task == torch._C._current_graph_task_id() else None
        self.total, self.graph_task = None, None
        return total


class _HandOnGradientSum(torch.autograd.Function):
    """s itself forward; backward, dL/ds: the SourceGradient's total, plus what reached s through autograd (a
    raw output read also through its chunk's summary). Not once_differentiable: under create_graph the gradient
    that reaches s through autograd keeps its graph, so that a second derivative meets the kernels' refusal
    instead of silently missing this path (a total only exists where a kernel's backward, which refuses
    create_graph, added to it)."""

    @staticmethod
    def forward(ctx, gradient_sum, source):
        ctx.set_materialize_grads(False)  # the consumers' backward returns no gradient for s: None, not zeros
        ctx.gradient_sum = gradient_sum
        return source.view_as(source)

    @staticmethod
    def backward(ctx, grad):
        total = ctx.gradient_sum.take()
        if total is None:
            return None, grad
        if grad is not None:
            total.add_(grad)
        return None, total


def _as_source(v0):
    """v_0 in the layout and dtype of the other sources: one copy per forward pass instead of one per consumer.
    Under autocast v_0 comes in float32 (the position embedding is) while every v_l is in the autocast dtype;
    and a v_0 transposed in memory would be read against the grain by every consumer (SiT's patch embedding
    hands it over so; model.PatchEmbed does not)."""
    device = v0.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else v0.dtype
    return v0.contiguous().to(dtype)


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
