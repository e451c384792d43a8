"""The C++ kernel of router_cpu.cpp from Python: its build, the shapes and autograd of its functional ops (what
torch.compile sees), and the autograd.Function through which eager mode calls its group ops.

Not a script: router.py calls it (router.cpu_dar_mix, router.cpu_dar_mix_group); the formulas are in
router_cpu.cpp's header, the design and measurements in docs/kernel.md. Like router_triton.py it imports nothing
from the project, so that the kernel's binding can be read and replaced on its own.

    import router_cpu
    router_cpu.cpu_kernel_available()  # compiles router_cpu.cpp once per machine (about a minute), then loads it
"""
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import torch

STALE_BUILD_LOCK_S = 600  # router_cpu.cpp compiles in about a minute; a build lock this old was abandoned


def require_cpu_kernel():
    """A clear error where kernel 'cpu' is asked for and router_cpu.cpp cannot be built."""
    if not cpu_kernel_available():
        raise RuntimeError("kernel 'cpu' needs router_cpu.cpp compiled (a C++ compiler and ninja); "
                           "use kernel 'torch' or 'auto'")


NO_SECOND_DERIVATIVE = ("kernel 'cpu' has no second derivative (its backward is written by hand): use kernel 'torch' "
                        "to differentiate through a gradient (create_graph=True)")


class MixGroup(torch.autograd.Function):
    """dar::mix_group forward (G consumers, or one after a prefix); backward, dar::mix_group_backward_into: dL/ds_i
    into the sources' gradient sums (router.SourceGradient), each consumer's dL/dq and dL/dg, and with a prefix
    dL/dP and dL/dlse_P. Outputs: each consumer's mix of the sources (see router.cpu_dar_mix_group), their lse
    [G, B, T], alpha [B, T, G, items]."""

    @staticmethod
    def forward(ctx, eps, gradient_sums, consumers, prefix, prefix_logit, *tensors):
        queries, gains, sources = tensors[:consumers], tensors[consumers:2 * consumers], tensors[2 * consumers:]
        outputs, lse, alpha, logits, inv_rms = torch.ops.dar.mix_group(list(sources), list(queries), list(gains),
                                                                       prefix, prefix_logit, eps)
        kept = outputs[0] if prefix is not None else None  # with a prefix, dh . h is read from h, P not being kept
        ctx.save_for_backward(kept, alpha, logits, inv_rms, *tensors)
        ctx.consumers, ctx.gradient_sums = consumers, gradient_sums
        ctx.mark_non_differentiable(alpha)
        return (*outputs, lse, alpha)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph: this backward records no graph; refuse, not miss this path
            raise RuntimeError(NO_SECOND_DERIVATIVE)
        kept, alpha, logits, inv_rms, *tensors = ctx.saved_tensors
        consumers = ctx.consumers
        queries, gains, sources = tensors[:consumers], tensors[consumers:2 * consumers], tensors[2 * consumers:]
        buffers, accumulate = zip(*(gradient_sum.buffer_for(s) for gradient_sum, s in zip(ctx.gradient_sums, sources)))
        grad_queries, grad_gains, grad_prefix = torch.ops.dar.mix_group_backward_into(
            sources, queries, gains, kept, alpha, logits, inv_rms, list(grads[:consumers]), grads[consumers],
            list(buffers), list(accumulate))
        return (None, None, None, *(grad_prefix or (None, None)), *grad_queries, *grad_gains,
                *(None for _ in sources))


_cpu_kernel_loaded = {}  # {"ok": bool} once router_cpu.cpp has been loaded, or has failed to build


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing instead of tracing into it
def cpu_kernel_available():
    """Compile and load router_cpu.cpp once per process (the build is cached per torch version, Python version,
    kernel source and compiler flags: _cpu_kernel_build_dir, so only the first process waits for the compiler).
    False, with the reason printed once per process, where it cannot be built."""
    if "ok" not in _cpu_kernel_loaded:
        _cpu_kernel_loaded["ok"] = _load_cpu_kernel()
    return _cpu_kernel_loaded["ok"]


CPU_KERNEL_SOURCE = Path(__file__).with_name("router_cpu.cpp")
# OpenMP lets at::parallel_for spread the tokens over torch's threads; on Linux the extension then links the
# libgomp torch has loaded already (same soname). Elsewhere the kernel runs on one thread.
CPU_KERNEL_OPENMP = ["-fopenmp"] if sys.platform == "linux" else []


def _cpu_kernel_cflags():
    """-O3 and OpenMP, and 8-wide vectors (AVX2 with FMA, and F16C for float16 rows) where torch's own CPU kernels
    use them: CPU_CAPABILITY_AVX2 selects the AVX2 version of ATen's vector class, in which the kernel's inner
    loops are written. Without it (an x86 CPU without AVX2, Windows) that class is plain C++ loops and the kernel
    measured 5x slower, though still faster than dar_mix (docs/kernel.md); on ARM it is NEON either way. torch's
    CPU capability is the CPU's, or lower when ATEN_CPU_CAPABILITY says so."""
    avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and sys.platform != "win32"  # GCC/Clang flags
    vectors = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"] if avx2 else []
    return ["-O3", *CPU_KERNEL_OPENMP, *vectors]


def _cpu_kernel_build_dir():
    """One build per torch and Python version (an extension built against another torch would not load), per
    content of router_cpu.cpp (so that checkouts with different kernels never load each other's build) and per
    compiler flags (so that a CPU without AVX2 sharing the cache never loads a build that needs it)."""
    from torch.utils import cpp_extension
    version = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "-")
    content = hashlib.sha256(CPU_KERNEL_SOURCE.read_bytes() + " ".join(_cpu_kernel_cflags()).encode()).hexdigest()[:12]
    return Path(cpp_extension.get_default_build_root()) / f"dar_cpu-{version}-{content}"


def _build_failure(error):
    """The line of a failed build that says why (the compiler's error, a missing program), not ninja's last."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "error:" in line.lower() or "not found" in line.lower()]
    return (telling or lines or [type(error).__name__])[0]


def _load_cpu_kernel():
    """Compile (or find compiled) and load router_cpu.cpp, and register the autograd and shapes of its ops."""
    from torch.utils import cpp_extension
    build_dir = _cpu_kernel_build_dir()
    if not any(build_dir.glob("dar_cpu*.so")):
        print("router: compiling the CPU routing kernel router_cpu.cpp (once per machine, about a minute)",
              file=sys.stderr, flush=True)
    try:
        lock = build_dir / "lock"  # left by a process killed while compiling: later loads would wait forever
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_BUILD_LOCK_S:
            lock.unlink(missing_ok=True)
        build_dir.mkdir(parents=True, exist_ok=True)
        # the flag lists are copies: the loader appends torch's own link flags to the list it is given
        cpp_extension.load(name="dar_cpu", sources=[str(CPU_KERNEL_SOURCE)], extra_cflags=_cpu_kernel_cflags(),
                           extra_ldflags=list(CPU_KERNEL_OPENMP), build_directory=str(build_dir),
                           is_python_module=False)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        print(f"router: the CPU routing kernel could not be built ({_build_failure(error)}); kernel 'auto' uses "
              "the plain PyTorch dar_mix instead (install a C++ compiler and ninja for the fast path)", file=sys.stderr)
        return False
    torch.library.register_fake("dar::mix", _mix_shapes)
    torch.library.register_fake("dar::mix_backward", _mix_backward_shapes)
    torch.library.register_autograd("dar::mix", _mix_gradients, setup_context=_save_for_mix_backward)
    torch.library.register_autograd("dar::mix_backward", _no_second_derivative)
    return True


def _mix_shapes(sources, query, gain, eps):
    """dar::mix returns (h [B, T, d], alpha, z, r), the last three [B, T, N], in the accumulation dtype."""
    dtype = torch.float64 if sources[0].dtype == torch.float64 else torch.float32
    stats = [sources[0].new_empty((*sources[0].shape[:-1], len(sources)), dtype=dtype) for _ in range(3)]
    return sources[0].new_empty(sources[0].shape, dtype=dtype), *stats


def _mix_backward_shapes(sources, query, gain, alpha, logits, inv_rms, grad_h):
    """dar::mix_backward returns (dL/ds_i for every source, dL/dq, dL/dg)."""
    return [torch.empty_like(s) for s in sources], torch.empty_like(query), torch.empty_like(gain)


def _save_for_mix_backward(ctx, inputs, output):
    sources, query, gain, _ = inputs
    _, alpha, logits, inv_rms = output
    ctx.save_for_backward(query, gain, alpha, logits, inv_rms, *sources)
    ctx.mark_non_differentiable(alpha, logits, inv_rms)


def _mix_gradients(ctx, grad_h, *_):
    query, gain, alpha, logits, inv_rms, *sources = ctx.saved_tensors
    grad_sources, grad_query, grad_gain = torch.ops.dar.mix_backward(sources, query, gain, alpha, logits, inv_rms,
                                                                     grad_h)
    return grad_sources, grad_query, grad_gain, None


def _no_second_derivative(ctx, *grads):
    """A gradient taken through the hand-written backward (create_graph=True, then differentiated again). Without
    this, autograd would only warn and treat dar::mix_backward as a constant: a wrong second derivative, not an
    error. (MixGroup, in eager mode, refuses create_graph itself.)"""
    raise RuntimeError(NO_SECOND_DERIVATIVE)
