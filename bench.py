"""Benchmarks, nanoGPT style: --op picks what to time; the repeats of all implementations are interleaved,
summarized by their medians, and compared with plain PyTorch.

    python bench.py --op router                                   # SiT-XL/2-sized, on the GPU if there is one
    python bench.py --op router --device cpu --batch 2 --repeats 5
    TRITON_INTERPRET=1 python bench.py --op router --device cpu --impls torch,triton --batch 1 --sources 4
    python bench.py --op step --threads 1                         # every router, 12 and 24 blocks deep
    python bench.py --op step --threads 1 --kernel cpu,torch      # each DAR router under both kernels, interleaved
    python bench.py --op sample --threads 1 --routers "dar static c4"  # sample.py's model evaluations
    python bench.py --op step --model SiT-D/4 --routers "dar static c4" --profile 12  # where the time goes
    python bench.py --op step --threads 1 --compile --routers "dar static c4"  # each model eager and compiled
    python bench.py --op host --threads 1 --routers "dar static c4"   # DAR's host work per SiT-XL/2 step

--op router: one DAR consumer (paper Eq. 5, method.md section 3) over N sources [batch, tokens, dim] (SiT-XL/2:
256 tokens per image, d = 1152; N = 19 bounds chunk 4 (1 + M + S), 57 is dense), forward and backward, with
  torch    router.dar_mix, the plain PyTorch reference
  compile  torch.compile of it (inductor; compiled at its first call, once per source count N)
  cpu      router.cpu_dar_mix, the C++ kernel of router_cpu.cpp (kernel "cpu", "auto" on CPU)
  triton   router_triton.fused_dar_mix, the fused kernel (CUDA; on CPU only in Triton's interpreter,
           TRITON_INTERPRET=1, which checks that the benchmark runs but whose times mean nothing)
`first call s` is the first forward+backward of each implementation for each N, untimed otherwise: for
compile, its compilation time.
Memory: `saved` is what autograd keeps for the backward beyond the inputs and the output h, counted with
saved_tensors_hooks (the same on every device); `peak` is the most memory allocated during the forward,
or during forward+backward, above what was allocated before (CUDA: max_memory_allocated; CPU: the
profiler's allocation events).

--op step: one training step (forward, flow-matching loss, backward, AdamW) of a whole SiT under every
router (residual, unet, dar static / timestep / dynamic at chunk 1, 4 and 8; --routers picks some), with
--precision bf16 under autocast, as train.py; --op sample: instead one velocity evaluation as sample.py makes
them (eval mode, no grad, t = 0.5). Same weights seed and batch,
for each --model (default the 12-block SiT-T/4 and the 24-block SiT-D/4). Beside the measured ratios to
residual: the live sources (the most any consumer reads, and the sum N_l over the consumers that mix,
l = 2..2L+1, counted from a traced forward; sublayer 1 reads v_0 alone) and the theoretical extra forward FLOPs: the matmuls torch's FLOP counter
sees beyond residual's (U-Net's skip Linears, the dynamic query projections W_l u_l) plus Eq. 5's mixing,
about 6 d FLOPs per source per token (RMS 2d, q . s 2d, alpha_i s_i 2d), i.e. 6 d sum N_l per token.

--op host: the host work (Python, dispatch, autograd) DAR adds around the fused kernel in a training step,
measured on the CPU with the kernel launches stubbed (bench_host): on a GPU at SiT's batch of 32 per GPU the
step waits for it.
"""
import argparse
import functools
import itertools
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from checkpoint import default_device, in_range, keep_freed_memory
from flow import flow_matching_loss, guided_velocity
from model import SIT_SIZES, SiT, SiT_models, create_model
from router import KERNELS, QUERIES, RMS_EPS, Trace, cpu_dar_mix, dar_mix

MIB = 2 ** 20


def kernel_list(text):
    """--kernel: one of router.KERNELS, or several, comma-separated."""
    kernels = text.split(",")
    for kernel in kernels:
        if kernel not in KERNELS:
            raise argparse.ArgumentTypeError(f"{kernel!r} is not one of {', '.join(KERNELS)}")
    return kernels


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=sorted(OPS), required=True, help="what to benchmark")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda when available")
    parser.add_argument("--repeats", type=in_range(int, 1), default=10, help="timed runs of each implementation")
    parser.add_argument("--warmup", type=in_range(int, 0), default=2, help="untimed runs first (compilation, caches)")
    parser.add_argument("--seed", type=in_range(int, 0), default=0)
    parser.add_argument("--threads", type=in_range(int, 1), default=None, help="CPU threads (default: torch's choice)")
    router = parser.add_argument_group("--op router")
    router.add_argument("--batch", type=in_range(int, 1), default=None, help="images; default 32 on cuda, 2 on cpu")
    router.add_argument("--tokens", type=in_range(int, 1), default=256, help="tokens per image (SiT-XL/2: 256)")
    router.add_argument("--dim", type=in_range(int, 1), default=1152, help="width d (SiT-XL/2: 1152)")
    router.add_argument("--sources", default="19,57", type=lambda text: [in_range(int, 1)(n) for n in text.split(",")],
                        help="comma-separated source counts N")
    router.add_argument("--query", choices=QUERIES, default="static",
                        help="static: [d]; timestep: [B, 1, d]; dynamic: [B, T, d]")
    router.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32",
                        help="dtype of the sources (accumulation is float32 for half precision)")
    router.add_argument("--impls", default=None,
                        help="comma-separated from torch,compile,cpu,triton; default torch,compile and the "
                             "device's own (triton on cuda, cpu on cpu)")
    step = parser.add_argument_group("--op step, --op sample and --op host")
    step.add_argument("--model", default=None,
                      help="comma-separated SiT configs (default SiT-T/4,SiT-D/4; --op host: SiT-XL/2)")
    step.add_argument("--image-size", type=in_range(int, 1), default=32, help="(default %(default)s)")
    step.add_argument("--channels", type=in_range(int, 1), default=1, help="image channels (default %(default)s, Fashion-MNIST)")
    step.add_argument("--step-batch", type=in_range(int, 1), default=None, help="images per step; default 256 on cuda, 32 on cpu")
    step.add_argument("--kernel", default="auto", type=kernel_list,
                      help="DAR implementation, as train.py --kernel; several, comma-separated, are interleaved "
                           "in one run, each DAR router once per kernel (default %(default)s)")
    step.add_argument("--routers", default=None,
                      help="comma-separated router labels as in the table (default all; residual is always run)")
    step.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast, as train.py")
    step.add_argument("--compile", action="store_true",
                      help="also time each model torch.compile'd (train.py --compile compiles it with its loss): a "
                           "'<router> compiled' row beside each eager one, interleaved with them, its ratios to "
                           "'residual compiled' (whose are to eager residual); the compilation happens in the "
                           "warm-up, which must then be at least 1")
    step.add_argument("--profile", type=in_range(int, 1), default=None, metavar="N",
                      help="after the timings, profile one more step of each router and print its N costliest ops "
                           "and its host and device time (torch.profiler)")
    args = parser.parse_args(argv)
    if args.op == "host":  # see bench_host
        if args.device == "cuda":
            parser.error("--op host runs on the CPU (it measures the host's work with the kernels stubbed)")
        args.device, args.kernel, args.precision = "cpu", ["triton"], "fp32"
        args.image_size, args.channels, args.step_batch = 8, 4, 2
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup 1 or more: the first run of a compiled model compiles it")
    if args.compile and args.op == "host":
        parser.error("--compile: --op host times eager host work (a compiled model's host work is measured by "
                     "--op step --compile on a GPU)")
    args.model = args.model or ("SiT-XL/2" if args.op == "host" else "SiT-T/4,SiT-D/4")
    if args.device == "auto":
        args.device = default_device()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


#################################################################################
#                         timing and memory, any device                          #
#################################################################################

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def saved_bytes(run, exclude):
    """Bytes of the distinct storages autograd saves for the backward while `run()` builds its graph,
    not counting the storages of `exclude` (inputs) and of what run returns (the output)."""
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()
    kept = {t.untyped_storage().data_ptr() for t in [*exclude, output]}
    return sum(nbytes for pointer, nbytes in saved.items() if pointer not in kept)


def peak_bytes(run, device):
    """The most memory allocated while `run()` runs (its result included), above what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = run()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    del result
    events = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                    if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU)
    allocated = peak = 0
    for _, nbytes in events:
        allocated += nbytes
        peak = max(peak, allocated)
    return peak


def speedup(value, reference):
    return f"{reference / value:.2f}x"


def change(value, reference):
    return f"{100 * (value - reference) / reference:+.1f}%" if reference else "n/a"


def print_table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


#################################################################################
#                     --op router: the DAR aggregation (Eq. 5)                   #
#################################################################################

def router_implementations(names, device):
    implementations = {}
    for name in names:
        if name == "torch":
            implementations[name] = lambda sources, query, gain: dar_mix(sources, query, gain)[0]
        elif name == "compile":
            implementations[name] = torch.compile(lambda sources, query, gain: dar_mix(sources, query, gain)[0])
        elif name == "cpu":
            implementations[name] = lambda sources, query, gain: cpu_dar_mix(sources, query, gain)[0]
        elif name == "triton":
            try:
                from router_triton import fused_dar_mix, kernel_device
            except ImportError as err:
                raise SystemExit(f"--impls triton needs the triton package ({err})") from None
            if device.type != kernel_device():
                raise SystemExit(f"--impls triton: the fused kernel runs on {kernel_device()} in this process, not "
                                 f"--device {device.type} (--device cuda compiled; --device cpu in Triton's "
                                 f"interpreter, TRITON_INTERPRET=1, which times nothing useful)")
            implementations[name] = lambda sources, query, gain: fused_dar_mix(
                sources, query, gain, RMS_EPS, return_alpha=False)[0]
        else:
            raise SystemExit(f"--impls: unknown implementation {name!r}; choose from torch, compile, cpu, triton")
    return implementations


def router_inputs(args, n, device):
    """N sources of different scales, a random query of the chosen kind, a gain near 1, and dLoss/dh."""
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    shape = (args.batch, args.tokens, args.dim)
    sources = [(torch.randn(shape, device=device) * (1 + i % 3)).to(dtype).requires_grad_() for i in range(n)]
    query_shape = {"static": shape[2:], "timestep": (args.batch, 1, args.dim), "dynamic": shape}[args.query]
    query = torch.randn(query_shape, device=device).requires_grad_()
    gain = (1 + 0.1 * torch.randn(args.dim, device=device)).requires_grad_()
    grad_h = torch.randn(shape, device=device, dtype=torch.float64 if args.dtype == "float64" else torch.float32)
    return [query, gain, *sources], grad_h


def bench_router(args):
    device = torch.device(args.device)
    if args.batch is None:
        args.batch = 32 if device.type == "cuda" else 2
    names = (args.impls or ("torch,compile,triton" if device.type == "cuda" else "torch,compile,cpu")).split(",")
    if names[0] != "torch":
        names = ["torch"] + [name for name in names if name != "torch"]  # the reference of every ratio
    implementations = router_implementations(names, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"DAR aggregation, {name}, {args.dtype}: batch {args.batch} x {args.tokens} tokens, d {args.dim}, "
          f"{args.query} query; medians of {args.repeats} interleaved repeats after {args.warmup} warm-up")
    rows = []
    for n in args.sources:
        leaves, grad_h = router_inputs(args, n, device)
        query, gain, *sources = leaves

        def forward(implementation):
            return implementation(sources, query, gain)

        def forward_backward(implementation):
            return torch.autograd.grad(forward(implementation), leaves, grad_h)

        times = {name: {"fwd": [], "bwd": [], "total": []} for name in implementations}
        first_call = {}  # seconds: for compile, its compilation for this N (a new N is a recompile)
        for name, implementation in implementations.items():
            synchronize(device)
            start = time.perf_counter()
            forward_backward(implementation)
            synchronize(device)
            first_call[name] = time.perf_counter() - start
        for repeat in range(args.warmup + args.repeats):
            for name, implementation in implementations.items():
                synchronize(device)
                start = time.perf_counter()
                h = forward(implementation)
                synchronize(device)
                middle = time.perf_counter()
                torch.autograd.grad(h, leaves, grad_h)
                synchronize(device)
                end = time.perf_counter()
                del h
                if repeat >= args.warmup:
                    times[name]["fwd"].append(1e3 * (middle - start))
                    times[name]["bwd"].append(1e3 * (end - middle))
                    times[name]["total"].append(1e3 * (end - start))
        stats = {}
        for name, implementation in implementations.items():
            stats[name] = {key: statistics.median(values) for key, values in times[name].items()}
            stats[name]["saved"] = saved_bytes(lambda: forward(implementation), leaves) / MIB
            stats[name]["peak fwd"] = peak_bytes(lambda: forward(implementation), device) / MIB
            stats[name]["peak total"] = peak_bytes(lambda: forward_backward(implementation), device) / MIB
        reference = stats["torch"]
        for name, row in stats.items():
            rows.append([name, str(n), f"{first_call[name]:.2f}"]
                        + [f"{row[key]:.2f} ({speedup(row[key], reference[key])})" for key in ("fwd", "bwd", "total")]
                        + [f"{row[key]:.1f} ({change(row[key], reference[key])})"
                           for key in ("saved", "peak fwd", "peak total")])
    print_table(["impl", "N", "first call s", "fwd ms", "bwd ms", "fwd+bwd ms", "saved for bwd MiB", "peak fwd MiB",
                 "peak fwd+bwd MiB"], rows)
    return rows


#################################################################################
#                --op step: a whole training step under every router             #
#################################################################################

STEP_VARIANTS = [("residual", "residual", "static", 1), ("unet", "unet", "static", 1)] + [
    (f"dar {query} c{chunk}", "dar", query, chunk) for query in QUERIES for chunk in (1, 4, 8)]


def step_model(args, name, router, query, chunk, kernel, device):
    torch.manual_seed(args.seed)
    options = dict(input_size=args.image_size, in_channels=args.channels, num_classes=10, router=router, query=query,
                   chunk=chunk, kernel=kernel)
    if args.op == "host":  # the config's depth at width HOST_WIDTH: the arithmetic is negligible, the host work is not
        size, patch = name[len("SiT-"):].split("/")
        return SiT(depth=SIT_SIZES[size][0], hidden_size=HOST_WIDTH, num_heads=2, patch_size=int(patch),
                   **options).to(device)
    return create_model(name, **options).to(device)


def matmul_flops(model, x, t, y):
    """Forward FLOPs that torch's FLOP counter sees (matmuls, convolutions) for one batch."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops()


def live_sources(model, x, t, y):
    """(the most sources one consumer reads, the sum over the consumers that mix, i.e. read two or more) from a
    traced forward; residual: 0, 0."""
    trace = Trace()
    with torch.no_grad():
        model(x[:1], t[:1], y[:1], trace=trace)
    counts = [alpha.shape[-1] for alpha in trace.alpha if alpha.shape[-1] > 1]
    return (max(counts), sum(counts)) if counts else (0, 0)


def bench_step(args):
    """--op step (a training step) and --op sample (one of sample.py's velocity evaluations) under every router."""
    device = torch.device(args.device)
    batch = args.step_batch or (256 if device.type == "cuda" else 32)
    names = args.model.split(",")
    for name in names:
        if name not in SiT_models:
            raise SystemExit(f"--model {name!r}: choose from {', '.join(SiT_models)}")
    labels = [label for label, *_ in STEP_VARIANTS]
    chosen = ["residual"] + [label for label in (args.routers or ",".join(labels)).split(",") if label != "residual"]
    for label in chosen:
        if label not in labels:
            raise SystemExit(f"--routers {label!r}: choose from {', '.join(labels)}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    if args.op == "sample" and device.type == "cpu":
        keep_freed_memory()  # as sample.py does
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    what = {"step": "training step", "sample": "sampling (one model evaluation, no grad)",
            "host": f"host work of a training step (width {HOST_WIDTH}, the fused kernel's launches stubbed)"}[args.op]
    print(f"{what}, {where}, {args.precision}, kernel {','.join(args.kernel)}: batch {batch} of {args.channels} x "
          f"{args.image_size}^2 images; medians of {args.repeats} interleaved repeats after {args.warmup} warm-up; "
          f"ratios to residual{' (of a compiled DAR model: to residual compiled)' if args.compile else ''}")
    tables = {}
    for name in names:
        generator = torch.Generator().manual_seed(args.seed)
        x = torch.randn(batch, args.channels, args.image_size, args.image_size, generator=generator).to(device)
        noise = torch.randn(x.shape, generator=generator).to(device)
        t = torch.rand(batch, generator=generator).to(device)
        y = torch.randint(0, 10, (batch,), generator=generator).to(device)
        variants = {}
        for label, router, query, chunk in STEP_VARIANTS:
            kernels = args.kernel if router == "dar" else args.kernel[:1]  # the kernel is DAR's alone
            for kernel, compiled in itertools.product(kernels if label in chosen else [],
                                                      (False, True) if args.compile else (False,)):
                model = step_model(args, name, router, query, chunk, kernel, device)
                if args.op == "sample":
                    model.eval()
                timed = torch.compile(model) if compiled else model
                variant_label = label + (f" ({kernel})" if len(kernels) > 1 else "") + (" compiled" if compiled else "")
                variants[variant_label] = dict(model=timed, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                               velocity=guided_velocity(timed, y), flops=matmul_flops(model, x, t, y),
                                               sources=live_sources(model, x, t, y), times=[])

        def train_step(variant):
            with autocast:
                loss = flow_matching_loss(variant["model"], x, y, t, noise)[0].mean()
            variant["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
            variant["optimizer"].step()

        @torch.no_grad()
        def sample_step(variant):
            with autocast:
                variant["velocity"](x, 0.5)

        run = sample_step if args.op == "sample" else train_step
        for repeat in range(args.warmup + args.repeats):
            for variant in variants.values():
                synchronize(device)
                start = time.perf_counter()
                run(variant)
                synchronize(device)
                if repeat >= args.warmup:
                    variant["times"].append(time.perf_counter() - start)
        model = variants["residual"]["model"]
        depth, width, tokens = model.depth, model.pos_embed.shape[-1], model.grid_size ** 2
        rows = []
        for label, variant in variants.items():
            # a compiled DAR model against compiled residual (which is against eager residual)
            compiled_dar = label.endswith(" compiled") and label != "residual compiled"
            reference = variants["residual compiled" if compiled_dar else "residual"]
            variant["time"] = statistics.median(variant["times"])
            variant["peak"] = peak_bytes(lambda: run(variant), device) / MIB
            most, total = variant["sources"]
            extra = variant["flops"] - reference["flops"] + 6 * width * total * tokens * batch  # Eq. 5 mixing
            rows.append([label, str(most) if most else "-", str(total) if total else "-",
                         change(reference["flops"] + extra, reference["flops"]),
                         f"{1e3 * variant['time']:.0f}", f"{variant['time'] / reference['time']:.2f}x",
                         f"{variant['peak']:.0f}", f"{variant['peak'] / reference['peak']:.2f}x"])
        print(f"\n{name}: depth {depth} (2L + 1 = {2 * depth + 1} consumers), width {width}, {tokens} tokens")
        print_table(["router", "max N_l", "sum N_l", "extra fwd FLOPs (theory)", f"{args.op} ms", "time vs residual",
                     "peak MiB", "peak vs residual"], rows)
        tables[name] = rows
        if args.op == "host":
            reference = variants["residual"]
            for label, variant in variants.items():
                if label != "residual":
                    extra_us = 1e6 * (variant["time"] - reference["time"]) / (2 * depth)
                    print(f"{label}: {extra_us:.0f} us of host work per mixing consumer (2L = {2 * depth}) "
                          f"beyond residual's step")
        if args.profile:
            for label, variant in variants.items():
                print_profile(f"{name}, {label}", functools.partial(run, variant), device, args.profile)
    return tables


def print_profile(title, run, device, top):
    """Profile one call of run(): the time the host spent in torch's ops and, on CUDA, the time the device spent
    in kernels (a step whose host time exceeds its device time is launch-bound), and the `top` costliest ops."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        run()
        synchronize(device)
    events = prof.key_averages()
    # the closing synchronize waits for the device: not host work. Kernels are counted once, as device events
    # (their launching ops carry their time too).
    host_ms = sum(event.self_cpu_time_total for event in events if "Synchronize" not in event.key) / 1e3
    device_ms = sum(event.self_device_time_total for event in events
                    if event.device_type != torch.autograd.DeviceType.CPU) / 1e3
    print(f"\nprofile, {title}: host {host_ms:.1f} ms in ops" + (f", device {device_ms:.1f} ms in kernels"
                                                               if device.type == "cuda" else ""))
    print(events.table(sort_by="self_device_time_total" if device.type == "cuda" else "self_cpu_time_total",
                       row_limit=top, max_name_column_width=60))


#################################################################################
#     --op host: the host work around the fused kernel, measured on a CPU        #
#################################################################################

HOST_WIDTH = 64


def bench_host(args):
    """--op host: what the host (Python, the dispatcher, autograd) spends on DAR in a training step, beyond
    residual's. On a GPU at SiT's batch of 32 per GPU, the step waits for it (docs/kernel.md); it can be measured
    on any CPU. The models have the configs' depth at width 64 and 16 tokens, DAR runs kernel "triton" in
    Triton's interpreter, and the two kernel launches (router_triton.mix_forward and mix_backward) are replaced
    by functions that do nothing, so what is timed is all the work around the kernels. What only a GPU has
    (the launches, the copies of the source-offset tables, the CUDA allocator) is not in it."""
    if "router_triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when router_triton (and triton) is first imported
    import router_triton
    if not router_triton.INTERPRETED:
        raise SystemExit("--op host needs Triton's interpreter: run it without TRITON_INTERPRET=0")
    launches = router_triton.mix_forward, router_triton.mix_backward
    router_triton.mix_forward = router_triton.mix_backward = lambda *args, **kwargs: None
    try:
        return bench_step(args)
    finally:
        router_triton.mix_forward, router_triton.mix_backward = launches


OPS = {"router": bench_router, "step": bench_step, "sample": bench_step, "host": bench_host}


def main(argv=None):
    args = parse_args(argv)
    return OPS[args.op](args)


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # e.g. an --image-size the model's patch size does not divide
        sys.exit(f"error: {err}")
