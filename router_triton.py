"""The fused DAR aggregation (paper Eq. 5, Appendix E): Triton forward and backward kernels as torch.library custom ops.

    from router_triton import fused_dar_mix
    h, alpha = fused_dar_mix(sources, query, gain, eps, return_alpha=True)   # same contract as router.dar_mix

router.py calls this when a DAR model is built with kernel="triton" (or "auto" on CUDA); it imports this file
only then, so nothing else in the project needs triton. On CPU the kernels run in Triton's interpreter, which
triton selects when a kernel is defined: set TRITON_INTERPRET=1 before this file is first imported (tests).

What one consumer computes, per token, over its N sources s_i (docs/method.md section 3; eps: the RMSNorm's):
    k_i = g * s_i / rms(s_i),  z_i = q . k_i / sqrt(d),  alpha = softmax_i(z),  h = sum_i alpha_i s_i
The forward kernel streams the sources once with an online softmax (running max m, running sum l, running
weighted sum of the raw sources), so the normalized keys, logits and weights stay in registers (the logits
are stored only when a Trace asks for alpha); it writes h and the per-token log-sum-exp lse = m + log l.
The backward kernel reads every source once more, recomputes z_i and alpha_i = exp(z_i - lse), and with
delta = dh . h (because dz_i = alpha_i (dh . s_i - delta)) writes the gradient of every source and
accumulates those of the query and of the gain in registers.

Memory, per consumer (B samples, T tokens, width d, N sources):
  * No copy of the history. The router keeps its sources as separate tensors (v_0, the chunk summaries, the
    raw outputs of the current chunk); stacking them into one [N, B, T, d] tensor for a kernel would copy
    all of them at every consumer. Instead the kernel gets the first source and a table of N element offsets
    of the others from it (8N bytes), so the sources are read where they already are.
  * Saved for backward: the sources and h (referenced, not copied: they are alive anyway, as the router's
    history and as the input the next sublayer's LayerNorm keeps), the query, the gain and lse [B, T].
    dar_mix keeps per-token norms and weights too, and for bf16/fp16 sources a float32 copy of every source
    (N x [B, T, d] x 4 bytes: 128 MiB for N = 57, 512 tokens, d = 1152); its forward also allocates several
    [B, T, d] temporaries per source, which the kernel keeps in registers. bench.py --op router measures both.
  * The backward allocates only the N source gradients it returns (one tensor each, so that each is freed
    as soon as autograd has used it) plus per-block partial sums [B, blocks, d] for the query and the gain;
    no [N, tokens, d] intermediate. In eager training the router gives it one buffer per source instead
    (router.SourceGradient), and the kernel adds each source's gradient into it: autograd then receives one
    gradient per source instead of one per consumer to add up.
Precision: bf16/fp16 inputs are accumulated in float32, float64 stays float64; h, alpha and lse come out in
that accumulation dtype, as dar_mix's do. bf16 sources stay bf16, also in what is saved for the backward: the
router hands over every source in one dtype (under autocast it casts v_0, the only float32 one, once per
forward pass). Offsets are 64-bit, so tokens x d x N may pass 2^31.
torch.compile: fused_mix and its backward are custom ops (dar::fused_mix, dar::fused_mix_backward) whose real
implementations launch the kernels, so a compiled DAR model is one graph that calls them. Eager mode calls the
same two functions through a plain autograd.Function instead: the custom ops' dispatch is host work that a GPU
step waits for at every consumer.
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRETED = triton.knobs.runtime.interpret  # what triton.jit saw when the kernels below were defined
GPU_TILE = 4096  # elements of one [tokens, d] register tile on a GPU
INTERPRETER_TILE = 1 << 16  # the interpreter runs a program as numpy ops: few, large programs are fastest


@triton.jit
def _mix_forward_kernel(
    source_base, source_offsets, num_sources,
    query, query_stride_b, query_stride_t, gain,
    out, lse_out, logits_out,
    tokens, dim, eps,
    STORE_LOGITS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    acc_dtype = out.dtype.element_ty
    sample = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < tokens
    mask = row_ok[:, None] & (cols < dim)[None, :]
    token = sample * tokens + rows
    offsets = token[:, None] * dim + cols[None, :]
    query_rows = sample * query_stride_b + rows.to(tl.int64) * query_stride_t
    query_gain = (tl.load(query + query_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(acc_dtype)
                  * tl.load(gain + cols, mask=cols < dim, other=0.0).to(acc_dtype)[None, :])
    inv_sqrt_dim = 1.0 / tl.sqrt(tl.zeros([BLOCK_T], acc_dtype) + dim)  # in acc_dtype, also when dim == 1

    running_max = tl.full([BLOCK_T], float("-inf"), acc_dtype)
    running_sum = tl.zeros([BLOCK_T], acc_dtype)
    weighted = tl.zeros([BLOCK_T, BLOCK_D], acc_dtype)
    for i in range(num_sources):
        shift = tl.load(source_offsets + i)
        if ALIGNED:
            shift = tl.multiple_of(shift, 16)
        s = tl.load(source_base + shift + offsets, mask=mask, other=0.0).to(acc_dtype)
        inv_rms = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / dim + eps)
        logit = tl.sum(s * query_gain, axis=1) * inv_rms * inv_sqrt_dim  # z_i = q . k_i / sqrt(d)
        if STORE_LOGITS:
            tl.store(logits_out + token * num_sources + i, logit, mask=row_ok)
        # Eq. 5, online softmax: rescale what was summed so far to the new running maximum
        new_max = tl.maximum(running_max, logit)
        rescale = tl.exp(running_max - new_max)
        p = tl.exp(logit - new_max)
        running_sum = running_sum * rescale + p
        weighted = weighted * rescale[:, None] + p[:, None] * s
        running_max = new_max
    tl.store(out + offsets, weighted / running_sum[:, None], mask=mask)
    tl.store(lse_out + token, running_max + tl.log(running_sum), mask=row_ok)


@triton.jit
def _mix_backward_kernel(
    source_base, source_offsets, grad_base, grad_offsets, num_sources,
    query, query_stride_b, query_stride_t, gain,
    out, grad_out, lse,
    grad_query, grad_gain_partial,
    tokens, dim, eps,
    PER_TOKEN_QUERY: tl.constexpr, ACCUMULATE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    acc_dtype = lse.dtype.element_ty
    block = tl.program_id(0)
    sample = tl.program_id(1).to(tl.int64)
    rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < tokens
    col_ok = cols < dim
    mask = row_ok[:, None] & col_ok[None, :]
    token = sample * tokens + rows
    offsets = token[:, None] * dim + cols[None, :]
    query_offsets = (sample * query_stride_b + rows.to(tl.int64) * query_stride_t)[:, None] + cols[None, :]
    q = tl.load(query + query_offsets, mask=mask, other=0.0).to(acc_dtype)
    g = tl.load(gain + cols, mask=col_ok, other=0.0).to(acc_dtype)
    query_gain = q * g[None, :]
    inv_sqrt_dim = 1.0 / tl.sqrt(tl.zeros([BLOCK_T], acc_dtype) + dim)  # in acc_dtype, also when dim == 1
    dh = tl.load(grad_out + offsets, mask=mask, other=0.0).to(acc_dtype)
    delta = tl.sum(dh * tl.load(out + offsets, mask=mask, other=0.0).to(acc_dtype), axis=1)
    lse_row = tl.load(lse + token, mask=row_ok, other=0.0)

    grad_query_gain = tl.zeros([BLOCK_T, BLOCK_D], acc_dtype)  # dLoss/d(q * g), per token
    for i in range(num_sources):
        shift = tl.load(source_offsets + i)
        grad_shift = tl.load(grad_offsets + i)
        if ALIGNED:
            shift = tl.multiple_of(shift, 16)
            grad_shift = tl.multiple_of(grad_shift, 16)
        s = tl.load(source_base + shift + offsets, mask=mask, other=0.0).to(acc_dtype)
        inv_rms = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / dim + eps)
        qg_dot_s = tl.sum(s * query_gain, axis=1)
        alpha = tl.exp(qg_dot_s * inv_rms * inv_sqrt_dim - lse_row)
        grad_logit = alpha * (tl.sum(dh * s, axis=1) - delta)  # softmax backward
        # z_i = (qg . s_i) r_i / sqrt(d) with r_i = rms(s_i)^-1, dr_i/ds_i = -r_i^3 s_i / d
        c = grad_logit * inv_rms * inv_sqrt_dim
        grad_s = (alpha[:, None] * dh + c[:, None] * query_gain
                  - (c * qg_dot_s * inv_rms * inv_rms / dim)[:, None] * s)
        if ACCUMULATE:  # the table's second half: 1 where grad_s is added to what the buffer holds
            if tl.load(grad_offsets + num_sources + i) != 0:
                grad_s += tl.load(grad_base + grad_shift + offsets, mask=mask, other=0.0).to(acc_dtype)
        tl.store(grad_base + grad_shift + offsets, grad_s, mask=mask)
        grad_query_gain += c[:, None] * s
    partial = (sample * tl.num_programs(0) + block) * dim + cols
    tl.store(grad_gain_partial + partial, tl.sum(grad_query_gain * q, axis=0), mask=col_ok)
    if PER_TOKEN_QUERY:
        tl.store(grad_query + query_offsets, grad_query_gain * g[None, :], mask=mask)
    else:
        tl.store(grad_query + partial, tl.sum(grad_query_gain, axis=0), mask=col_ok)


def fused_dar_mix(sources, query, gain, eps, return_alpha=True, block_tokens=None, gradient_sums=None):
    """Eq. 5 for one consumer, as router.dar_mix: returns h [B, T, d] and alpha [B, T, N] (None unless
    return_alpha). sources: list of N tensors [B, T, d]; query: [d] (static), [B, 1, d] (one per sample,
    the timestep query) or [B, T, d] (dynamic); gain: [d]; eps: the RMSNorm's. alpha is not differentiable
    (it is for traces). block_tokens: tokens per program (a power of two), chosen from the tile size when None.
    Sources of one dtype are read where they are; mixed dtypes are first promoted to a common one (copies).
    Under torch.compile it calls the custom op dar::fused_mix, which carries its autograd, so the compiled graph
    has no break; in eager mode the same two functions run through a plain autograd.Function, because the custom
    op's dispatch costs the host about 0.2 ms per consumer, which a GPU step at SiT's batch of 32 per GPU waits
    for (docs/kernel.md). gradient_sums: None, or one router.SourceGradient per source, each source being its
    SourceGradient's `collect`: the backward then adds each source's gradient into its SourceGradient instead of
    returning it (eager mode, sources of one dtype)."""
    _check_inputs(sources, query, gain)
    dtype = sources[0].dtype
    for s in sources[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    if accumulation_dtype(query, gain) == torch.float64:  # float64 accumulation reads float64 sources (as kernel cpu)
        dtype = torch.float64
    if any(s.dtype != dtype for s in sources):
        sources, gradient_sums = [s.to(dtype) for s in sources], None  # converted: not the sources the sums are of
    sources = [s.contiguous() for s in sources]  # a no-op for the router's own sources
    query = query.contiguous()  # the kernels index the query, and write its gradient, as a contiguous tensor
    if torch.compiler.is_compiling():
        h, _, alpha = torch.ops.dar.fused_mix(sources, query, gain, eps, return_alpha, block_tokens)
    else:
        h, _, alpha = _FusedMix.apply(eps, return_alpha, block_tokens, gradient_sums, query, gain, *sources)
    return h, (alpha if return_alpha else None)


def accumulation_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def mix_forward(sources, query, gain, eps, out, lse, logits=None, block_tokens=None):
    """Launch the forward kernel into out [B, T, d] and lse [B, T] (and logits [B, T, N] when given),
    all in the accumulation dtype."""
    batch, tokens, dim = sources[0].shape
    base, offsets, aligned = _offset_table(sources)
    query, stride_b, stride_t = _query_strides(query, batch, tokens)
    block_t, block_d, num_warps = _blocks(tokens, dim, block_tokens)
    grid = (triton.cdiv(tokens, block_t), batch)
    _mix_forward_kernel[grid](
        base, offsets, len(sources), query, stride_b, stride_t, gain, out, lse,
        logits if logits is not None else lse, tokens, dim, eps,
        STORE_LOGITS=logits is not None, ALIGNED=aligned, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)


def mix_backward(sources, query, gain, eps, out, lse, grad_out, grad_sources, grad_query, grad_gain_partial,
                 block_tokens=None, accumulate=None):
    """Launch the backward kernel: writes grad_sources (one tensor per source; added to grad_sources[i] where
    accumulate[i] is true), grad_query ([B, T, d] for a per-token query, else per-block partial sums
    [B, blocks, d] of dLoss/d(q * g)) and grad_gain_partial [B, blocks, d] (per-block sums of dLoss/d(q * g) * q)."""
    batch, tokens, dim = sources[0].shape
    base, offsets, aligned = _offset_table(sources)
    grad_base, grad_offsets, grad_aligned = _offset_table(grad_sources, accumulate)
    query, stride_b, stride_t = _query_strides(query, batch, tokens)
    block_t, block_d, num_warps = _blocks(tokens, dim, block_tokens)
    grid = (triton.cdiv(tokens, block_t), batch)
    _mix_backward_kernel[grid](
        base, offsets, grad_base, grad_offsets, len(sources), query, stride_b, stride_t, gain,
        out, grad_out, lse, grad_query, grad_gain_partial, tokens, dim, eps,
        PER_TOKEN_QUERY=is_per_token(query, tokens), ACCUMULATE=accumulate is not None and any(accumulate),
        ALIGNED=aligned and grad_aligned,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)


def num_token_blocks(tokens, dim, block_tokens=None):
    return triton.cdiv(tokens, _blocks(tokens, dim, block_tokens)[0])


def is_per_token(query, tokens):
    return query.dim() == 3 and query.shape[1] == tokens and tokens > 1


def _mix(sources, query, gain, eps, store_alpha, block_tokens):
    """(h, lse, alpha), alpha empty unless store_alpha; all in the accumulation dtype."""
    out, lse, alpha = _mix_outputs(sources, query, gain, store_alpha)
    mix_forward(sources, query, gain, eps, out, lse, alpha if store_alpha else None, block_tokens)
    if store_alpha:
        alpha.sub_(lse[..., None]).exp_()  # the kernel stored the logits z_i: alpha_i = exp(z_i - lse)
    return out, lse, alpha


def _mix_outputs(sources, query, gain, store_alpha):
    batch, tokens, dim = sources[0].shape
    acc_dtype = accumulation_dtype(sources[0], query, gain)
    out = sources[0].new_empty((batch, tokens, dim), dtype=acc_dtype)
    lse = sources[0].new_empty((batch, tokens), dtype=acc_dtype)
    alpha = sources[0].new_empty((batch, tokens, len(sources)) if store_alpha else (0,), dtype=acc_dtype)
    return out, lse, alpha


def _mix_gradients(sources, query, gain, out, lse, grad_out, eps, block_tokens, into=None):
    """(the gradient of every source, of the query, of the gain); into: None, or (buffers, accumulate), the
    tensors to write (accumulate[i] false) or add (true) the source gradients to, which are then returned."""
    batch, tokens, dim = sources[0].shape
    blocks = num_token_blocks(tokens, dim, block_tokens)
    grad_sources, accumulate = into if into is not None else ([torch.empty_like(s) for s in sources], None)
    grad_gain_partial = lse.new_empty((batch, blocks, dim))
    per_token = is_per_token(query, tokens)
    grad_query = torch.empty_like(query) if per_token else lse.new_empty((batch, blocks, dim))
    mix_backward(sources, query, gain, eps, out, lse, grad_out.contiguous(), grad_sources, grad_query,
                 grad_gain_partial, block_tokens, accumulate)
    if not per_token:  # dq = g * sum over the tokens that share the query of dLoss/d(q * g)
        per_sample = grad_query.sum(dim=1, keepdim=True)
        grad_query = (per_sample.sum(dim=0).flatten() if query.dim() == 1 else per_sample) * gain
    return grad_sources, grad_query.to(query.dtype), grad_gain_partial.sum(dim=(0, 1)).to(gain.dtype)


NO_SECOND_DERIVATIVE = ("kernel 'triton' has no second derivative (its backward is written by hand): use kernel "
                        "'torch' to differentiate through a gradient (create_graph=True)")


class _FusedMix(torch.autograd.Function):
    """Eager mode: _mix forward, _mix_gradients backward, with no custom-op dispatch around them. Unlike the
    custom op it has no fake implementation: tracing outside torch.compile and export (FakeTensorMode, make_fx)
    would reach the kernels. With gradient_sums (router.SourceGradient, one per source) the backward adds each
    source's gradient into its SourceGradient and returns none for the sources."""

    @staticmethod
    def forward(ctx, eps, store_alpha, block_tokens, gradient_sums, query, gain, *sources):
        output = _mix(sources, query, gain, eps, store_alpha, block_tokens)
        _save_for_fused_backward(ctx, (sources, query, gain, eps, store_alpha, block_tokens), output)
        ctx.gradient_sums = gradient_sums
        return output

    @staticmethod
    def backward(ctx, grad_out, *_):
        if torch.is_grad_enabled():  # create_graph: this backward records no graph; refuse, not miss this path
            raise RuntimeError(NO_SECOND_DERIVATIVE)
        def gradients(sources, *arguments):
            if ctx.gradient_sums is None:
                return _mix_gradients(sources, *arguments)
            buffers, accumulate = zip(*(gradient_sum.buffer_for(s)
                                        for gradient_sum, s in zip(ctx.gradient_sums, sources)))
            _, grad_query, grad_gain = _mix_gradients(sources, *arguments, into=(list(buffers), list(accumulate)))
            return [None] * len(sources), grad_query, grad_gain
        grad_sources, grad_query, grad_gain = _saved_gradients(ctx, grad_out, gradients)
        return None, None, None, None, grad_query, grad_gain, *grad_sources


@torch.library.custom_op("dar::fused_mix", mutates_args=())
def _fused_mix(sources: list[torch.Tensor], query: torch.Tensor, gain: torch.Tensor, eps: float, store_alpha: bool,
               block_tokens: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _mix(sources, query, gain, eps, store_alpha, block_tokens)


@_fused_mix.register_fake
def _(sources, query, gain, eps, store_alpha, block_tokens):
    return _mix_outputs(sources, query, gain, store_alpha)


@torch.library.custom_op("dar::fused_mix_backward", mutates_args=())
def _fused_mix_backward(sources: list[torch.Tensor], query: torch.Tensor, gain: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, grad_out: torch.Tensor, eps: float,
                        block_tokens: Optional[int]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    return _mix_gradients(sources, query, gain, out, lse, grad_out, eps, block_tokens)


@_fused_mix_backward.register_fake
def _(sources, query, gain, out, lse, grad_out, eps, block_tokens):
    return [torch.empty_like(s) for s in sources], torch.empty_like(query), torch.empty_like(gain)


def _save_for_fused_backward(ctx, inputs, output):
    sources, query, gain, eps, _, block_tokens = inputs
    out, lse, alpha = output
    ctx.save_for_backward(query, gain, out, lse, *sources)
    ctx.eps, ctx.block_tokens = eps, block_tokens
    ctx.mark_non_differentiable(lse, alpha)


def _saved_gradients(ctx, grad_out, gradients):
    """gradients (_mix_gradients, or the custom op around it) of what _save_for_fused_backward kept."""
    query, gain, out, lse, *sources = ctx.saved_tensors
    return gradients(sources, query, gain, out, lse, grad_out, ctx.eps, ctx.block_tokens)


def _fused_gradients(ctx, grad_out, *_):
    grad_sources, grad_query, grad_gain = _saved_gradients(ctx, grad_out, torch.ops.dar.fused_mix_backward)
    return grad_sources, grad_query, grad_gain, None, None, None


_fused_mix.register_autograd(_fused_gradients, setup_context=_save_for_fused_backward)


def _check_inputs(sources, query, gain):
    if len(sources) == 0:
        raise ValueError("fused_dar_mix needs at least one source")
    shape, device = sources[0].shape, sources[0].device
    if len(shape) != 3 or any(s.shape != shape for s in sources):
        raise ValueError(f"sources must all be [B, T, d] tensors of one shape, got {[tuple(s.shape) for s in sources]}")
    batch, tokens, dim = shape
    if tuple(query.shape) not in ((dim,), (batch, 1, dim), (batch, tokens, dim)):
        raise ValueError(f"query must be [d], [B, 1, d] or [B, T, d] with B, T, d = {batch}, {tokens}, {dim}; "
                         f"got {tuple(query.shape)}")
    if tuple(gain.shape) != (dim,):
        raise ValueError(f"gain must be [{dim}], got {tuple(gain.shape)}")
    if any(t.device != device for t in [*sources, query, gain]):
        raise ValueError("fused_dar_mix: sources, query and gain must be on one device")
    if device.type != kernel_device():
        raise RuntimeError("TRITON_INTERPRET=1 runs the fused DAR kernel on CPU tensors only; unset it to run "
                           "the compiled kernel on the GPU" if INTERPRETED else
                           f"kernel='triton' needs CUDA tensors (got {device.type}); on CPU, run Triton's "
                           "interpreter by setting TRITON_INTERPRET=1 before triton is first imported, or use "
                           "kernel='torch'")


def kernel_device():
    """The device type the fused kernels run on in this process: cpu in Triton's interpreter, else cuda."""
    return "cpu" if INTERPRETED else "cuda"


def _offset_table(tensors, flags=None):
    """The first tensor, the element offsets of all of them from it (int64, on their device; followed by the
    flags as 0 or 1 when given: one copy to the GPU for both), and whether every offset is a multiple of 16
    elements (lets the compiler vectorize the loads)."""
    base = tensors[0]
    item = base.element_size()
    distances = [t.data_ptr() - base.data_ptr() for t in tensors]
    if any(distance % item for distance in distances):
        raise ValueError("fused_dar_mix: source addresses are not aligned to their element size")
    offsets = [distance // item for distance in distances]
    aligned = all(offset % 16 == 0 for offset in offsets) and base.shape[-1] % 16 == 0
    table = torch.tensor(offsets + [int(flag) for flag in flags or ()], dtype=torch.int64)
    if base.is_cuda:  # from pinned memory the copy is asynchronous: no wait for the GPU at every consumer
        table = table.pin_memory().to(base.device, non_blocking=True)
    return base, table, aligned


def _query_strides(query, batch, tokens):
    """The query, and its strides in elements per sample and per token (0 where it is shared)."""
    query = query.contiguous()
    if query.dim() == 1:
        return query, 0, 0
    stride_b = query.stride(0) if batch > 1 else 0
    return query, stride_b, (query.stride(1) if is_per_token(query, tokens) else 0)


@functools.lru_cache(maxsize=None)  # called three times per consumer with the same few shapes
def _blocks(tokens, dim, block_tokens):
    """(tokens per program, the width padded to a power of two, warps per program)."""
    block_d = triton.next_power_of_2(dim)
    if block_tokens is None:
        tile = INTERPRETER_TILE if INTERPRETED else GPU_TILE
        block_tokens = min(triton.next_power_of_2(tokens), max(1, tile // block_d))
    elif block_tokens < 1 or block_tokens & (block_tokens - 1):
        raise ValueError(f"block_tokens must be a power of two, got {block_tokens}")
    return block_tokens, block_d, (4 if block_tokens * block_d <= 2048 else 8)
