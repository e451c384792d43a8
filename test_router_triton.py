"""Tests of router_triton.py, the fused DAR kernel, against the plain PyTorch reference router.dar_mix.

    python -m pytest -q test_router_triton.py

On the CPU the kernels run in Triton's interpreter: TRITON_INTERPRET=1 is set here (and in conftest.py)
before triton is first imported. With TRITON_INTERPRET=0 on a CUDA machine the same tests run on the GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import bench  # noqa: E402
import router_triton  # noqa: E402
from model import SiT  # noqa: E402
from router import RMS_EPS, Trace, build_router, dar_mix  # noqa: E402
from router_triton import fused_dar_mix  # noqa: E402

DEVICE = "cpu" if router_triton.INTERPRETED else "cuda"
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
QUERY_KINDS = ("static", "per-sample", "per-token")
# (sources N, batch B, tokens T, width d, tokens per program): T is never a multiple of the block
SHAPES = [(1, 2, 5, 7, None), (20, 1, 37, 96, 16), (9, 3, 19, 200, 8), (4, 2, 50, 96, 32), (13, 2, 3, 200, None)]


def make_inputs(n, batch, tokens, dim, kind, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    # sources of different scales, so that the RMSNorm matters; a query large enough for a peaked softmax
    sources = [randn(batch, tokens, dim) * 3.0 ** (i % 5 - 2) for i in range(n)]
    query_shape = {"static": (dim,), "per-sample": (batch, 1, dim), "per-token": (batch, tokens, dim)}[kind]
    query = randn(*query_shape) * 3
    gain = 1 + 0.5 * randn(dim)
    grad_h = randn(batch, tokens, dim)
    leaves = [t.to(DEVICE).requires_grad_() for t in (query, gain, *sources)]
    return leaves, grad_h.to(DEVICE)


def assert_close(actual, expected, tol):
    """Elementwise to tol, relative to the tensor's largest entry (gradients summed over tokens are large)."""
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(1.0, expected.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", QUERY_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-B{}-T{}-d{}-block{}".format(*s))
def test_forward_and_backward_match_dar_mix(shape, kind, dtype):
    n, batch, tokens, dim, block_tokens = shape
    (query, gain, *sources), grad_h = make_inputs(n, batch, tokens, dim, kind, dtype)
    h_ref, alpha_ref = dar_mix(sources, query, gain)
    grads_ref = torch.autograd.grad(h_ref, [query, gain, *sources], grad_h)
    h, alpha = fused_dar_mix(sources, query, gain, RMS_EPS, block_tokens=block_tokens)
    grads = torch.autograd.grad(h, [query, gain, *sources], grad_h)
    assert h.dtype == h_ref.dtype and alpha.dtype == alpha_ref.dtype
    assert_close(h, h_ref, TOLERANCE[dtype])
    assert_close(alpha, alpha_ref, TOLERANCE[dtype])
    assert n == 1 or alpha.std() > 0.05  # weights far from uniform: the logits are really tested
    for grad, grad_ref in zip(grads, grads_ref):
        assert grad.shape == grad_ref.shape and grad.dtype == grad_ref.dtype
        assert_close(grad, grad_ref, TOLERANCE[dtype])


@pytest.mark.parametrize("kind", QUERY_KINDS)
def test_gradcheck_float64(kind):
    leaves, _ = make_inputs(3, 2, 3, 5, kind, torch.float64, seed=1)

    def mix(query, gain, *sources):
        return fused_dar_mix(list(sources), query, gain, RMS_EPS, return_alpha=False, block_tokens=2)[0]

    assert torch.autograd.gradcheck(mix, leaves, fast_mode=True)


def test_bfloat16_is_accumulated_in_float32():
    """bf16 sources with float32 routing parameters, as under autocast."""
    (query, gain, *sources), grad_h = make_inputs(6, 2, 9, 96, "per-token", torch.bfloat16)
    query, gain = (t.detach().float().requires_grad_() for t in (query, gain))
    h_ref, _ = dar_mix(sources, query, gain)
    grads_ref = torch.autograd.grad(h_ref, [query, gain, *sources], grad_h.float())
    h, alpha = fused_dar_mix(sources, query, gain, RMS_EPS, return_alpha=False)
    grads = torch.autograd.grad(h, [query, gain, *sources], grad_h.float())
    assert h.dtype == torch.float32 and alpha is None
    assert_close(h, h_ref, 1e-5)
    for leaf, grad, grad_ref in zip([query, gain, *sources], grads, grads_ref):
        assert grad.dtype == grad_ref.dtype == leaf.dtype
        assert_close(grad.float(), grad_ref.float(), 2e-2)


def test_a_query_laid_out_otherwise_and_float64_parameters_over_bf16_sources():
    """Inputs the router never makes but a direct caller may: a per-token query transposed in memory (its gradient
    must come back in the query's layout, not the kernel's), and bf16 sources with float64 routing parameters
    (float64 accumulation reads float64 copies of the sources, as kernel cpu does)."""
    (query, gain, *sources), grad_h = make_inputs(3, 2, 5, 16, "per-token", torch.float64)
    transposed = query.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not transposed.is_contiguous()
    for inputs in ([transposed, gain, *sources],
                   [query, gain, *(s.detach().bfloat16().requires_grad_() for s in sources)]):
        h, _ = fused_dar_mix(inputs[2:], inputs[0], inputs[1], RMS_EPS, return_alpha=False)
        h_ref, _ = dar_mix(inputs[2:], inputs[0], inputs[1])
        assert_close(h, h_ref, 1e-12)
        for grad, grad_ref in zip(torch.autograd.grad(h, inputs, grad_h), torch.autograd.grad(h_ref, inputs, grad_h)):
            assert_close(grad.double(), grad_ref.double(), 1e-12 if grad.dtype == torch.float64 else 1e-2)


def guarded_nan_views(shapes, dtype, guard=37):
    """Tensors of the given shapes inside one NaN-filled buffer, with NaN guard zones around each."""
    sizes = [torch.Size(shape).numel() for shape in shapes]
    buffer = torch.full((sum(sizes) + guard * (len(sizes) + 1),), float("nan"), dtype=dtype, device=DEVICE)
    views, start = [], guard
    for shape, size in zip(shapes, sizes):
        views.append(buffer[start:start + size].view(shape))
        start += size + guard
    return buffer, views


def assert_all_written_and_nothing_else(buffer, views):
    written = torch.zeros_like(buffer, dtype=torch.bool)
    for view in views:
        start = (view.data_ptr() - buffer.data_ptr()) // buffer.element_size()
        written[start:start + view.numel()] = True
    assert torch.isfinite(buffer[written]).all(), "an output element was not written"
    assert torch.isnan(buffer[~written]).all(), "the kernel wrote outside its outputs"


@pytest.mark.parametrize("kind", ["static", "per-token"])
def test_kernels_write_every_output_element_and_nothing_else(kind):
    n, batch, tokens, dim, block_tokens = 5, 2, 37, 96, 16
    (query, gain, *sources), grad_h = make_inputs(n, batch, tokens, dim, kind, torch.float64)
    sources = [s.detach() for s in sources]
    query, gain = query.detach(), gain.detach()
    h_ref, alpha_ref = dar_mix(sources, query, gain)

    buffer, (h, lse, logits) = guarded_nan_views([(batch, tokens, dim), (batch, tokens), (batch, tokens, n)],
                                                 torch.float64)
    router_triton.mix_forward(sources, query, gain, RMS_EPS, h, lse, logits, block_tokens)
    assert_all_written_and_nothing_else(buffer, [h, lse, logits])
    assert_close(h, h_ref, 1e-10)
    assert_close((logits - lse[..., None]).exp(), alpha_ref, 1e-10)

    blocks = router_triton.num_token_blocks(tokens, dim, block_tokens)
    query_grad_shape = (batch, tokens, dim) if kind == "per-token" else (batch, blocks, dim)
    buffer, (grad_query, grad_gain_partial, *grad_sources) = guarded_nan_views(
        [query_grad_shape, (batch, blocks, dim)] + [(batch, tokens, dim)] * n, torch.float64)
    router_triton.mix_backward(sources, query, gain, RMS_EPS, h, lse, grad_h, grad_sources, grad_query,
                               grad_gain_partial, block_tokens)
    assert_all_written_and_nothing_else(buffer, [grad_query, grad_gain_partial, *grad_sources])


def test_backward_adds_the_source_gradients_where_told_and_writes_the_others():
    """With accumulate flags (the router's SourceGradient buffers), grad_sources[i] becomes what it held plus
    dL/ds_i where the flag is set, and dL/ds_i alone where it is not (the buffer's old contents ignored)."""
    n, batch, tokens, dim, block_tokens = 4, 2, 37, 96, 16
    (query, gain, *sources), grad_h = make_inputs(n, batch, tokens, dim, "static", torch.float64)
    h_ref, _ = dar_mix(sources, query, gain)
    grads_ref = torch.autograd.grad(h_ref, sources, grad_h)
    held = [torch.randn_like(s) for s in sources]
    accumulate = [True, False, True, False]
    buffers = [h.clone() if add else torch.full_like(h, float("nan")) for h, add in zip(held, accumulate)]
    sources, query, gain = [s.detach() for s in sources], query.detach(), gain.detach()
    h, lse, _ = router_triton._mix(sources, query, gain, RMS_EPS, False, block_tokens)
    returned, _, _ = router_triton._mix_gradients(sources, query, gain, h, lse, grad_h, RMS_EPS, block_tokens,
                                                  into=(buffers, accumulate))
    assert all(r is b for r, b in zip(returned, buffers))
    for buffer, before, grad_ref, add in zip(buffers, held, grads_ref, accumulate):
        assert_close(buffer, before + grad_ref if add else grad_ref, 1e-10)


def tiny_dar_model(query, chunk, kernel):
    """A 3-block float64 DAR SiT whose parameters are all perturbed away from their (partly zero) init."""
    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=24, depth=3, num_heads=2, num_classes=4,
                router="dar", query=query, chunk=chunk, kernel=kernel).double().to(DEVICE)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model


def flow_matching_loss(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1, 8, 8, generator=generator, dtype=torch.float64).to(DEVICE)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    t = torch.rand(3, generator=generator, dtype=torch.float64).to(DEVICE)
    y = torch.randint(0, 4, (3,), generator=generator).to(DEVICE)
    torch.manual_seed(seed)  # the label dropout draws from the global generator
    x_t = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * noise
    return (model(x_t, t, y) - (x - noise)).pow(2).mean()


@pytest.mark.parametrize("query", ["static", "timestep", "dynamic"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_training_step_matches_torch_kernel(chunk, query, monkeypatch):
    reference = tiny_dar_model(query, chunk, "torch")
    fused = tiny_dar_model(query, chunk, "triton")
    summed = []  # per call: does the kernel add the source gradients up itself (router.SourceGradient)?
    monkeypatch.setattr(router_triton, "fused_dar_mix", lambda *args, gradient_sums=None, **kwargs: summed.append(
        gradient_sums is not None) or fused_dar_mix(*args, gradient_sums=gradient_sums, **kwargs))
    loss_ref, loss = flow_matching_loss(reference), flow_matching_loss(fused)
    loss_ref.backward()
    loss.backward()
    assert summed == [True] * (2 * 3)  # sublayers 2..2L and the final aggregator (sublayer 1 reads v_0 alone)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
    reference_grads = dict(reference.named_parameters())
    for name, parameter in fused.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, name
            assert_close(parameter.grad, reference_grads[name].grad, 1e-9)


def test_torch_compile_runs_the_kernel_inside_a_compiled_model():
    """train.py --compile --kernel triton: the custom op in the compiled graph, forward and backward match."""
    reference = tiny_dar_model("dynamic", 2, "torch").float().eval()  # eval: no label dropout to reproduce
    fused = tiny_dar_model("dynamic", 2, "triton").float().eval()
    x, t, y = torch.randn(2, 1, 8, 8, device=DEVICE), torch.rand(2, device=DEVICE), torch.tensor([0, 3], device=DEVICE)
    loss_ref = reference(x, t, y).pow(2).mean()
    loss = torch.compile(lambda: fused(x, t, y).pow(2).mean())()
    loss_ref.backward()
    loss.backward()
    assert_close(loss, loss_ref, 1e-5)
    for parameter, parameter_ref in zip(fused.parameters(), reference.parameters()):
        if parameter_ref.grad is not None:
            assert_close(parameter.grad, parameter_ref.grad, 1e-5)


def test_compiled_model_has_no_graph_break():
    model = tiny_dar_model("dynamic", 4, "triton").float()
    x, t, y = torch.randn(2, 1, 8, 8, device=DEVICE), torch.rand(2, device=DEVICE), torch.tensor([0, 3], device=DEVICE)
    explanation = torch._dynamo.explain(model)(x, t, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    ops = [str(node.target) for graph in explanation.graphs for node in graph.graph.nodes]
    assert sum("dar.fused_mix" in op for op in ops) == 2 * 3  # consumers 2..2L+1


def test_eager_calls_run_the_kernels_without_the_custom_op_dispatch():
    """Eager mode goes through a plain autograd.Function (the custom op's dispatch costs the host about 0.2 ms per
    consumer, docs/kernel.md); torch.compile goes through the custom op (test_compiled_model_has_no_graph_break)."""
    leaves, grad_h = make_inputs(3, 2, 5, 16, "static", torch.float64)
    query, gain, *sources = leaves
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        h, _ = fused_dar_mix(sources, query, gain, RMS_EPS, return_alpha=False)
        torch.autograd.grad(h, leaves, grad_h)
    names = {event.name for event in profile.events()}
    assert any("_FusedMix" in name for name in names), sorted(names)
    assert not any("dar::fused_mix" in name for name in names), sorted(names)


@pytest.mark.parametrize("path", ["eager", "custom-op"])
def test_a_second_derivative_is_refused_not_wrong(path):
    """The hand-written backward is not itself differentiable: a gradient taken through it must fail, not pass for
    a constant (once_differentiable, with an upstream gradient that needs none, hands back constants: a wrong
    second derivative). Eager mode refuses create_graph; the custom op (torch.compile's path) refuses when its
    gradient is differentiated, dar::fused_mix_backward having no autograd."""
    leaves, grad_h = make_inputs(3, 2, 5, 16, "static", torch.float64)
    query, gain, *sources = leaves
    if path == "eager":
        h, _ = fused_dar_mix(sources, query, gain, RMS_EPS, return_alpha=False)
    else:
        h = torch.ops.dar.fused_mix(sources, query, gain, RMS_EPS, False, None)[0]
    with pytest.raises(RuntimeError, match="no second derivative|no autograd formula"):
        grad_query, = torch.autograd.grad(h, query, grad_h, create_graph=True)
        # + gain's own term: a first gradient cut off from the graph must not pass as "does not require grad"
        torch.autograd.grad(grad_query.sum() + gain.square().sum(), gain)


def test_bfloat16_sources_are_saved_without_float32_copies():
    """Under autocast the router hands over bf16 sources: the backward keeps them and h, no float32 copy."""
    (query, gain, *sources), _ = make_inputs(5, 2, 9, 96, "static", torch.bfloat16)
    query, gain = (t.detach().float().requires_grad_() for t in (query, gain))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h, _ = fused_dar_mix(sources, query, gain, RMS_EPS, return_alpha=False)
    big = {t.data_ptr(): t.dtype for t in saved if t.shape == h.shape}
    assert big == {h.data_ptr(): torch.float32, **{s.data_ptr(): torch.bfloat16 for s in sources}}


def test_trace_alpha_matches_torch_kernel():
    trace_ref, trace = Trace(per_token=True), Trace(per_token=True)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, device=DEVICE)
    t, y = torch.rand(2, dtype=torch.float64, device=DEVICE), torch.tensor([0, 3], device=DEVICE)
    with torch.no_grad():
        tiny_dar_model("dynamic", 4, "torch").eval()(x, t, y, trace=trace_ref)
        tiny_dar_model("dynamic", 4, "triton").eval()(x, t, y, trace=trace)
    assert len(trace.alpha) == len(trace_ref.alpha) == 7
    for alpha, alpha_ref in zip(trace.alpha, trace_ref.alpha):
        assert_close(alpha, alpha_ref, 1e-10)


def test_kernel_choice_errors():
    with pytest.raises(ValueError, match="unknown kernel 'cuda'"):
        build_router("dar", depth=2, hidden_size=8, kernel="cuda")
    with pytest.raises(ValueError, match="unknown kernel"):
        SiT(input_size=4, patch_size=2, in_channels=1, hidden_size=8, depth=1, num_heads=2, num_classes=2,
            router="dar", kernel="fused")
    sources = [torch.randn(2, 3, 8, device=DEVICE)] * 2
    with pytest.raises(ValueError, match="query must be"):
        fused_dar_mix(sources, torch.zeros(1, 3, 8, device=DEVICE), torch.ones(8, device=DEVICE), RMS_EPS)


def test_auto_runs_without_triton_on_cpu_and_triton_without_interpreter_says_why():
    script = """
import sys, torch
from model import SiT
def run(kernel):
    model = SiT(input_size=4, patch_size=2, in_channels=1, hidden_size=8, depth=1, num_heads=2, num_classes=2,
                router="dar", kernel=kernel)
    model(torch.randn(1, 1, 4, 4), torch.rand(1), torch.zeros(1, dtype=torch.long)).sum().backward()
import router_cpu
router_cpu.cpu_kernel_available()  # loading the C++ extension may import triton (torch probes for it): keep it
loaded = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "triton"}
sys.modules["triton"] = None  # as if triton were not installed: importing it raises ImportError
run("auto")
assert "router_triton" not in sys.modules
del sys.modules["triton"]
sys.modules.update(loaded)
try:
    run("triton")
except RuntimeError as error:
    print(error)
"""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=os.path.dirname(os.path.abspath(__file__)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "needs CUDA tensors" in result.stdout and "TRITON_INTERPRET=1" in result.stdout


def test_bench_router_runs(capsys):
    bench.main(["--op", "router", "--batch", "2", "--tokens", "5", "--dim", "24", "--sources", "3,4",
                "--impls", "torch,triton", "--repeats", "2", "--warmup", "1", "--device", DEVICE])
    table = capsys.readouterr().out
    for impl in ("torch", "triton"):
        assert sum(line.startswith(f"| {impl} ") for line in table.splitlines()) == 2, table
