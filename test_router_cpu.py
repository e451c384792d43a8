"""Tests of router.py's C++ kernel (router_cpu.cpp, kernel "cpu"): cpu_dar_mix against dar_mix, its build, the
source-gradient buffers of eager training, and torch.compile of a model that calls it.

Run: python -m pytest -q test_router_cpu.py
"""
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import router
import router_cpu
from router import Trace, cpu_dar_mix, dar_mix
from test_router import DEPTH, WIDTH, batch, perturb, spy_on_mixing, tiny


@contextlib.contextmanager
def on_threads(threads):
    """torch's CPU thread count, for the kernel's parallel loops, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def mix_inputs(kind, n=4, batch=2, tokens=3, dim=5, dtype=torch.float64, seed=0):
    """Sources of different scales and a query large enough for a peaked softmax, as leaves."""
    gen = torch.Generator().manual_seed(seed)
    sources = [torch.randn(batch, tokens, dim, generator=gen, dtype=dtype) * 3.0 ** (i % 3 - 1) for i in range(n)]
    shape = {"static": (dim,), "timestep": (batch, 1, dim), "dynamic": (batch, tokens, dim)}[kind]
    query = 3 * torch.randn(shape, generator=gen, dtype=dtype)
    gain = 1 + 0.5 * torch.randn(dim, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (query, gain, *sources)]


@pytest.mark.parametrize("kind", ["static", "timestep", "dynamic"])
def test_cpu_dar_mix_matches_dar_mix_and_passes_gradcheck(kind):
    query, gain, *sources = leaves = mix_inputs(kind)
    h, alpha = cpu_dar_mix(sources, query, gain)
    h_ref, alpha_ref = dar_mix(sources, query, gain)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(alpha, alpha_ref, rtol=0, atol=1e-12)
    assert alpha.std() > 0.1  # far from uniform: the logits are really tested
    grad_h = torch.randn_like(h)
    for grad, grad_ref in zip(torch.autograd.grad(h, leaves, grad_h), torch.autograd.grad(h_ref, leaves, grad_h)):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda q, g, *s: cpu_dar_mix(list(s), q, g)[0], leaves)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("kind", ["static", "timestep", "dynamic"])
def test_cpu_dar_mix_in_float32_and_float16_matches_dar_mix(kind, dtype, tolerance):
    """The training dtypes (float64 is checked above): h and every gradient as dar_mix's, in its dtype."""
    query, gain, *sources = mix_inputs(kind, n=5, batch=3, tokens=7, dim=24)
    sources = [s.detach().to(dtype).requires_grad_() for s in sources]
    leaves = [query, gain, *sources]
    h, alpha = cpu_dar_mix(sources, query, gain)
    h_ref, alpha_ref = dar_mix(sources, query, gain)
    torch.testing.assert_close(h, h_ref, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(alpha, alpha_ref, rtol=tolerance, atol=tolerance)
    grad_h = torch.randn_like(h)
    grads = torch.autograd.grad(h, leaves, grad_h)
    for grad, grad_ref, leaf in zip(grads, torch.autograd.grad(h_ref, leaves, grad_h), leaves):
        assert grad.dtype == leaf.dtype
        torch.testing.assert_close(grad.double(), grad_ref.double(), rtol=10 * tolerance, atol=10 * tolerance)


def test_cpu_dar_mix_reads_a_non_contiguous_query_and_refuses_wrong_shapes():
    query, gain, *sources = mix_inputs("dynamic", n=3, batch=2, tokens=5, dim=8)
    transposed = query.detach().transpose(0, 1).contiguous().transpose(0, 1)  # [B, T, d], not contiguous
    assert not transposed.is_contiguous()
    torch.testing.assert_close(cpu_dar_mix(sources, transposed, gain)[0], dar_mix(sources, transposed, gain)[0],
                               rtol=0, atol=1e-12)
    for bad_query, bad_gain in [(query[:, :2], gain), (torch.cat([query, query], -1), gain),
                                (torch.zeros(16, dtype=query.dtype), gain), (query, torch.ones(4, dtype=gain.dtype))]:
        with pytest.raises(RuntimeError, match="dar::mix: (query|gain) must be"):
            cpu_dar_mix(sources, bad_query, bad_gain)


@pytest.mark.parametrize("summed", [False, True], ids=["functional", "gradient-sums"])
@pytest.mark.parametrize("kind", ["static", "timestep", "dynamic"])
def test_cpu_dar_mix_on_several_threads_matches_dar_mix(kind, summed):
    """The kernel splits the tokens over threads and each thread sums its own share of the query gradient:
    every thread's share must reach dL/dq and dL/dg. Two consumers read the same sources, so that with
    gradient sums the second one's backward adds into the buffers the first one's wrote."""
    with on_threads(2):
        query, gain, *sources = leaves = mix_inputs(kind, n=5, batch=3, tokens=50, dim=24)
        gradient_sums = [router.SourceGradient() for _ in sources] if summed else None
        read = [g.collect(s) for g, s in zip(gradient_sums, sources)] if summed else sources
        h = sum(cpu_dar_mix(read, q, gain, gradient_sums=gradient_sums)[0] for q in (query, 2 * query)) / 2
        grads = torch.autograd.grad(h, leaves, torch.ones_like(h))
    h_ref = sum(dar_mix(sources, q, gain)[0] for q in (query, 2 * query)) / 2
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-12)
    for grad, grad_ref in zip(grads, torch.autograd.grad(h_ref, leaves, torch.ones_like(h))):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ["functional", "gradient-sums", "collected-functional"])
def test_a_second_derivative_is_refused_not_wrong(path):
    """The hand-written backward is not itself differentiable: a gradient taken through it must fail, not pass for
    a constant or drop out of the graph (what autograd alone, or once_differentiable, would do: a wrong second
    derivative). The functional op refuses when its gradient is differentiated; the eager group op as soon as a
    gradient is asked for with create_graph. "collected-functional": sources handed on by their SourceGradient but
    read by the functional op, as in a model where another source needs no gradient (a frozen v_0)."""
    query, gain, *sources = mix_inputs("static")
    gradient_sums = [router.SourceGradient() for _ in sources] if path != "functional" else None
    read = [g.collect(s) for g, s in zip(gradient_sums, sources)] if gradient_sums else sources
    h, _ = cpu_dar_mix(read, query, gain, gradient_sums=gradient_sums if path == "gradient-sums" else None)
    with pytest.raises(RuntimeError, match="no second derivative"):
        first = torch.autograd.grad(h.sum(), sources, create_graph=True)
        # + gain's own term: a first gradient cut off from the graph must not pass as "does not require grad"
        torch.autograd.grad(sum(g.square().sum() for g in first) + gain.square().sum(), [gain, query],
                            allow_unused=True)


def test_a_gradient_penalty_through_a_model_needs_the_torch_kernel():
    """A gradient penalty (the input gradient's norm, differentiated again) through a whole DAR model: kernel
    torch gives the routing parameters their share of it; kernel cpu refuses. On CPU with PyTorch's math attention:
    its CPU flash attention has no second derivative (docs/failures.md)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    x, t, y = batch()
    x.requires_grad_()
    for kernel in ("torch", "cpu"):
        model = perturb(tiny("dar", "static", 4, kernel=kernel))
        with sdpa_kernel(SDPBackend.MATH):
            def penalty():
                grad_x, = torch.autograd.grad(model(x, t, y).square().sum(), x, create_graph=True)
                return grad_x.square().sum()
            if kernel == "cpu":
                with pytest.raises(RuntimeError, match="no second derivative"):
                    penalty()
            else:
                grads = torch.autograd.grad(penalty(), [m.query for m in model.router.mixers])
                assert all(torch.isfinite(g).all() for g in grads) and all(g.abs().sum() > 0 for g in grads)


def test_without_a_compiler_auto_falls_back_and_cpu_says_why(monkeypatch, capsys):
    """A machine that cannot build router_cpu.cpp still trains (kernel auto: dar_mix) and kernel cpu is a clear
    error; the build failure is reported once, in one line."""
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):  # what torch raises: ninja's whole output, whose last line says nothing
        raise RuntimeError("Error building extension 'dar_cpu': [1/2] c++ -MMD -c router_cpu.cpp -o router_cpu.o\n"
                           "/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed.")
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(router_cpu, "_cpu_kernel_loaded", {})
    monkeypatch.setattr(router, "dar_mix", lambda *args: calls.append(1) or dar_mix(*args))
    calls = []
    model = perturb(tiny("dar", "static", chunk=2, dtype=torch.float32, kernel="auto"))
    model(*batch(dtype=torch.float32)).sum().backward()
    assert len(calls) == 2 * DEPTH
    assert "could not be built (/bin/sh: 1: c++: not found)" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="kernel 'cpu' needs router_cpu.cpp compiled"):
        perturb(tiny("dar", "static", chunk=2, dtype=torch.float32, kernel="cpu"))(*batch(dtype=torch.float32))


@pytest.mark.parametrize("age_s, removed", [(3600, True), (5, False)])
def test_a_build_lock_left_by_a_killed_compile_is_removed(age_s, removed, tmp_path, monkeypatch, capsys):
    """PyTorch's extension loader waits for a build lock to go away: one left by a process killed while compiling
    would hang every later process. An old lock is removed; a fresh one (a build in progress) is waited for."""
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path))
    seen = []
    monkeypatch.setattr(cpp_extension, "load", lambda build_directory, **kwargs: seen.append(
        (Path(build_directory) / "lock").exists()))
    monkeypatch.setattr(torch.library, "register_fake", lambda *args: None)
    monkeypatch.setattr(torch.library, "register_autograd", lambda *args, **kwargs: None)
    build_dir = router_cpu._cpu_kernel_build_dir()
    assert build_dir.parent == tmp_path
    build_dir.mkdir()
    lock = build_dir / "lock"
    lock.touch()
    os.utime(lock, (time.time() - age_s,) * 2)
    assert router_cpu._load_cpu_kernel() is True
    assert seen == [not removed]


def test_the_kernel_build_follows_the_cpu_vector_capability(monkeypatch):
    """AVX2 code only where torch's own kernels use it, and a build of its own per capability: a CPU without
    AVX2 that shares the build cache (a cluster's home directory) must not load a build that needs it."""
    monkeypatch.setattr(sys, "platform", "linux")
    builds = {}
    for capability in ("DEFAULT", "AVX2", "AVX512"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda capability=capability: capability)
        builds[capability] = router_cpu._cpu_kernel_cflags(), router_cpu._cpu_kernel_build_dir()
    assert "-mavx2" not in builds["DEFAULT"][0] and "-mavx2" in builds["AVX2"][0] and "-mfma" in builds["AVX512"][0]
    assert builds["DEFAULT"][1] != builds["AVX2"][1] == builds["AVX512"][1]


def test_loading_the_kernel_leaves_its_build_flags_as_they_were():
    """PyTorch's loader appends its link flags to the list it is given: were that our list, the compiler flags,
    and with them the build folder, would change after the first load, and a later load would compile again."""
    assert router_cpu.cpu_kernel_available()
    assert router_cpu.CPU_KERNEL_OPENMP == (["-fopenmp"] if sys.platform == "linux" else [])


@pytest.mark.parametrize("query", ["static", "timestep", "dynamic"])
@pytest.mark.parametrize("chunk", [1, 4, 8, 5])
def test_cpu_kernel_routes_and_trains_as_the_torch_kernel(query, chunk, monkeypatch):
    """Whole models (every sublayer and the final aggregator): the same output and parameter gradients."""
    models = {kernel: perturb(tiny("dar", query, chunk, kernel=kernel)) for kernel in ("torch", "cpu")}
    mixed = spy_on_mixing(monkeypatch)
    x, t, y = batch()
    outputs = {}
    for kernel, model in models.items():
        mixed.clear()
        torch.manual_seed(0)  # the label dropout
        outputs[kernel] = model(x, t, y)
        F.mse_loss(outputs[kernel], x).backward()
    # consumers 2..2L+1 (sublayer 1 reads v_0 alone), each adding its source gradients up itself (SourceGradient)
    assert [gradient_sums is not None for _, gradient_sums in mixed] == [True] * (2 * DEPTH)
    torch.testing.assert_close(outputs["cpu"], outputs["torch"], rtol=0, atol=1e-12)
    for (name, p), p_ref in zip(models["cpu"].named_parameters(), models["torch"].parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("grouped", [False, True], ids=["one-by-one", "in-groups"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_the_kernel_adds_up_each_source_gradient_in_one_buffer(chunk, grouped, monkeypatch):
    """Eager training with the C++ kernel: each consumer's backward (or a group's, once for all its members)
    writes (the first) or adds (the others) its dL/ds_i into the source's one buffer, so autograd adds no
    gradients per (consumer, source) pair. (A Trace makes every consumer mix alone.)"""
    model = perturb(tiny("dar", "static", chunk, kernel="cpu"))
    flags = {}  # SourceGradient -> the accumulate flag of each consumer's backward, in order
    buffer_for = router.SourceGradient.buffer_for
    monkeypatch.setattr(router.SourceGradient, "buffer_for", lambda self, source: flags.setdefault(self, []).append(
        buffer_for(self, source)[1]) or (self.total, flags[self][-1]))
    x, t, y = batch()
    F.mse_loss(model(x, t, y, trace=None if grouped else Trace()), x).backward()
    readers = sum(len(router.chunk_sources(l, DEPTH, chunk)) for l in range(2, 2 * DEPTH + 2))  # consumers 2..2L+1
    writes = sum(len(f) for f in flags.values())
    assert writes < readers if grouped else writes == readers
    assert all(f == [False] + [True] * (len(f) - 1) for f in flags.values())
    assert all(gradient_sum.total is None for gradient_sum in flags)  # every total handed to autograd, none kept


def test_gradients_read_at_the_route_s_outputs_are_whole(monkeypatch):
    """torch.autograd.grad of every h_l the route hands out, h_1 = v_0 included: the same as the torch kernel's
    (a `collect`ed source handed out would miss the consumers' shares)."""
    grads = {}
    aggregate = router.DARRoute.aggregate
    for kernel in ("torch", "cpu"):
        model = perturb(tiny("dar", "static", 2, kernel=kernel))
        handed_out = []
        monkeypatch.setattr(router.DARRoute, "aggregate", lambda self, *args, **kwargs: handed_out.append(
            aggregate(self, *args, **kwargs)) or handed_out[-1])
        x, t, y = batch()
        grads[kernel] = torch.autograd.grad(F.mse_loss(model(x, t, y), x), handed_out)
    assert len(grads["cpu"]) == 2 * DEPTH + 1
    for grad, grad_ref in zip(grads["cpu"], grads["torch"]):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12)


def test_sources_that_need_no_gradient_get_no_gradient_sum(monkeypatch):
    """A frozen patch embedding: v_0 needs no gradient, so no buffer is summed for it (it would never be taken)
    and its consumers, every consumer, use the functional backward; training still computes dar_mix's gradients.
    Without grad (sampling) no route keeps gradient sums at all."""
    models = {kernel: perturb(tiny("dar", "static", 2, kernel=kernel)) for kernel in ("torch", "cpu")}
    for model in models.values():
        model.x_embedder.requires_grad_(False)
    mixed = spy_on_mixing(monkeypatch)
    x, t, y = batch()
    for model in models.values():
        mixed.clear()
        torch.manual_seed(0)
        F.mse_loss(model(x, t, y), x).backward()
    assert [gradient_sums is not None for _, gradient_sums in mixed] == [False] * (2 * DEPTH)
    for (name, p), p_ref in zip(models["cpu"].named_parameters(), models["torch"].parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=name)
    with torch.no_grad():
        assert models["cpu"].router.start(torch.zeros(1, 4, WIDTH, dtype=torch.float64), None).gradient_sums is None


@pytest.mark.parametrize("grouped", [False, True], ids=["one-by-one", "in-groups"])
def test_a_backward_pass_that_stops_short_leaves_no_gradient_sum_behind(grouped):
    """torch.autograd.grad of an intermediate h with retain_graph runs only the consumers after h: the sums it
    leaves in the sources before h must not be added to by the next backward pass. (A Trace, which asks for the
    routing weights, makes every consumer mix alone; the REPA hook does not.)"""
    models = {kernel: perturb(tiny("dar", "static", 2, kernel=kernel)) for kernel in ("torch", "cpu")}
    x, t, y = batch()
    for model in models.values():
        trace = None if grouped else Trace()
        out, hidden = model(x, t, y, return_hidden=2, trace=trace)
        loss = F.mse_loss(out, x)
        torch.autograd.grad(loss, hidden, retain_graph=True)
        loss.backward()
    for (name, p), p_ref in zip(models["cpu"].named_parameters(), models["torch"].parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype, tolerance, tokens, threads, dim", [(torch.float64, 1e-10, 5, 1, 8),
                                                                    (torch.float64, 1e-10, 300, 2, 8),
                                                                    (torch.bfloat16, 2e-2, 5, 1, 8),
                                                                    (torch.float64, 1e-10, 5, 1, 45),
                                                                    (torch.float32, 1e-4, 5, 1, 45),
                                                                    (torch.bfloat16, 2e-2, 5, 1, 45)])
@pytest.mark.parametrize("kind", ["static", "timestep"])
def test_a_group_mixes_as_each_consumer_alone(kind, dtype, tolerance, tokens, threads, dim):
    """cpu_dar_mix_group: three consumers read the same four sources in one pass; the third one's h, mixed with two
    newer sources after the group's prefix (P, lse), is then that of a consumer of all six. h and every gradient
    as dar_mix's over each consumer's whole source list (sources in dtype, queries and gains in float32 for bf16;
    300 tokens on 2 threads: the tokens split over threads, and the backward's token blocks, each summing its own
    share of the query gradients; 45 features: the kernels' loops of several vectors, of one, and the last
    features one at a time)."""
    gen = torch.Generator().manual_seed(3)
    query, gain, *sources = mix_inputs(kind, n=6, batch=2, tokens=tokens, dim=dim)
    parameter_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    queries = [q.detach().to(parameter_dtype).requires_grad_() for q in (query, -query, query.roll(1, -1))]
    gains = [(gain.detach() + 0.3 * torch.randn(gain.shape, generator=gen, dtype=gain.dtype)).to(parameter_dtype)
             for _ in range(3)]
    gains = [g.requires_grad_() for g in gains]
    sources = [s.detach().to(dtype).requires_grad_() for s in sources]
    gradient_sums = [router.SourceGradient() for _ in sources]
    read = [g.collect(s) for g, s in zip(gradient_sums, sources)]
    leaves = [*queries, *gains, *sources]
    with on_threads(threads):
        outputs, lse = router.cpu_dar_mix_group(read[:4], queries, gains, gradient_sums[:4])
        (third,), _ = router.cpu_dar_mix_group(read[4:], queries[2:], gains[2:], gradient_sums[4:],
                                               prefix=(outputs[2], lse[2]))
        hs = [outputs[0], outputs[1], third]
        weights = [torch.randn(h.shape, generator=gen, dtype=h.dtype) for h in hs]
        grads = torch.autograd.grad(sum((w * h).sum() for w, h in zip(weights, hs)), leaves)
    refs = [dar_mix(sources[:4], queries[0], gains[0])[0], dar_mix(sources[:4], queries[1], gains[1])[0],
            dar_mix(sources, queries[2], gains[2])[0]]
    grads_ref = torch.autograd.grad(sum((w * h).sum() for w, h in zip(weights, refs)), leaves)
    for h, h_ref in zip(hs, refs):
        torch.testing.assert_close(h, h_ref, rtol=tolerance, atol=tolerance)
    for grad, grad_ref, leaf in zip(grads, grads_ref, leaves):
        assert grad.dtype == leaf.dtype
        torch.testing.assert_close(grad.double(), grad_ref.double(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_summed_in_reduced_precision_buffers(dtype):
    """Two consumers of the same bf16 / float16 sources at 45 features: the second one's backward reads the
    buffer the first one wrote, in the sources' dtype, adds its term and stores it back (every vector loop and
    the scalar tail), as dar_mix's gradients."""
    query, gain, *sources = mix_inputs("timestep", n=5, batch=2, tokens=6, dim=45, dtype=torch.float32)
    sources = [s.detach().to(dtype).requires_grad_() for s in sources]
    gradient_sums = [router.SourceGradient() for _ in sources]
    read = [g.collect(s) for g, s in zip(gradient_sums, sources)]
    h = sum(cpu_dar_mix(read, q, gain, gradient_sums=gradient_sums)[0] for q in (query, -query))
    h_ref = sum(dar_mix(sources, q, gain)[0] for q in (query, -query))
    grad_h = torch.randn_like(h)
    for grad, grad_ref in zip(torch.autograd.grad(h, sources, grad_h), torch.autograd.grad(h_ref, sources, grad_h)):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), grad_ref.double(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["static", "timestep"])
def test_sources_without_tokens_mix_to_nothing(kind):
    """Zero tokens (T = 0): empty outputs and gradients, not a crash in the kernel's split of the tokens."""
    query, gain, *sources = mix_inputs(kind, n=3, batch=2, tokens=0, dim=8)
    h, alpha = cpu_dar_mix(sources, query, gain)
    assert h.shape == (2, 0, 8) and alpha.shape == (2, 0, 3)
    grads = torch.autograd.grad(h.sum(), [query, gain, *sources], allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


@pytest.mark.parametrize("kind", ["static", "timestep"])
def test_a_group_passes_gradcheck_with_every_output_read(kind):
    """float64 gradcheck of a group's call and a later member's call, every output read, the lse of each too (the
    route reads only the later members' lse; a wrong gradient of any output would show here)."""
    gen = torch.Generator().manual_seed(4)
    query, gain, *sources = mix_inputs(kind, n=4, batch=2, tokens=3, dim=5)
    queries = [query, (3 * torch.randn(query.shape, generator=gen, dtype=query.dtype)).requires_grad_()]
    gains = [gain, (1 + 0.5 * torch.randn(gain.shape, generator=gen, dtype=gain.dtype)).requires_grad_()]

    def group_and_member(*leaves):
        queries, gains, sources = leaves[:2], leaves[2:4], leaves[4:]
        gradient_sums = [router.SourceGradient() for _ in sources]
        read = [g.collect(s) for g, s in zip(gradient_sums, sources)]
        outputs, lse = router.cpu_dar_mix_group(read[:3], queries, gains, gradient_sums[:3])
        (h,), lse_h = router.cpu_dar_mix_group(read[3:], queries[1:], gains[1:], gradient_sums[3:],
                                               prefix=(outputs[1], lse[1]))
        return outputs[0], outputs[1], lse, h, lse_h
    assert torch.autograd.gradcheck(group_and_member, [*queries, *gains, *sources])


def test_a_group_keeps_no_prefix_and_h_only_after_a_prefix():
    """What a group's call and a later member's call keep for the backward (bf16 sources, float32 parameters): the
    sources as they are, never a member's P, and h only after a prefix (its dh . P is read from dh . h)."""
    query, gain, *sources = mix_inputs("static", n=4, dim=16, dtype=torch.float32)
    sources = [s.detach().bfloat16().requires_grad_() for s in sources]
    gradient_sums = [router.SourceGradient() for _ in sources]
    read = [g.collect(s) for g, s in zip(gradient_sums, sources)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outputs, lse = router.cpu_dar_mix_group(read[:3], [query, -query], [gain, gain], gradient_sums[:3])
        by_the_group = len(saved)
        (h,), _ = router.cpu_dar_mix_group(read[3:], [-query], [gain], gradient_sums[3:], prefix=(outputs[1], lse[1]))

    def rows(tensors):
        return {t.data_ptr(): t.dtype for t in tensors if t.shape == h.shape}
    assert rows(saved[:by_the_group]) == {s.data_ptr(): torch.bfloat16 for s in sources[:3]}
    assert rows(saved[by_the_group:]) == {h.data_ptr(): torch.float32, sources[3].data_ptr(): torch.bfloat16}


def test_cpu_dar_mix_group_refuses_what_it_cannot_do():
    """Clear errors: a gradient without the buffers it adds into, sources of two dtypes, a per-token query in a
    group of several consumers."""
    query, gain, *sources = mix_inputs("static")
    with pytest.raises(ValueError, match="gradient_sums are required"):
        router.cpu_dar_mix_group(sources, [query], [gain])
    with torch.no_grad():
        with pytest.raises(ValueError, match="sources of one dtype"):
            router.cpu_dar_mix_group([sources[0], sources[1].float()], [query], [gain])
        per_token, _, *_ = mix_inputs("dynamic")
        with pytest.raises(RuntimeError, match="a per-token query cannot be grouped"):
            router.cpu_dar_mix_group(sources, [per_token, per_token], [gain, gain])


# The group sizes of a 3-block model: consumers 2..7 in groups, cut at GROUP_SIZE and wherever a chunk's summary
# replaces its raw outputs (a consumer left alone mixes by itself); with chunk 2, consumer 2 is left alone.
GROUPS = {(1, 2): [2, 2, 2], (1, 3): [3, 3], (1, 8): [6], (2, 2): [2, 2], (2, 3): [3, 2], (2, 8): [5],
          (5, 2): [2, 2, 2], (5, 3): [3, 2], (5, 8): [4, 2]}


@pytest.mark.parametrize("query", ["static", "timestep"])
@pytest.mark.parametrize("chunk, group_size", GROUPS)
def test_consumers_in_groups_route_and_train_as_the_torch_kernel(chunk, group_size, query, monkeypatch):
    """Consumers whose sources start with the same ones mix those in one pass per group (DARRoute._group): the
    groups expected, and the torch kernel's outputs and gradients, with grad (training) and without (sampling)."""
    monkeypatch.setattr(router, "GROUP_SIZE", group_size)
    models = {kernel: perturb(tiny("dar", query, chunk, kernel=kernel)) for kernel in ("torch", "cpu")}
    groups, mix_group = [], router.cpu_dar_mix_group
    monkeypatch.setattr(router, "cpu_dar_mix_group", lambda sources, queries, *args, prefix=None: (
        prefix is None and groups.append(len(queries))) or mix_group(sources, queries, *args, prefix=prefix))
    x, t, y = batch()
    outputs = {}
    for kernel, model in models.items():
        torch.manual_seed(0)
        outputs[kernel] = model(x, t, y)
        F.mse_loss(outputs[kernel], x).backward()
    assert groups == GROUPS[chunk, group_size]
    torch.testing.assert_close(outputs["cpu"], outputs["torch"], rtol=0, atol=1e-12)
    for (name, p), p_ref in zip(models["cpu"].named_parameters(), models["torch"].parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=name)
    with torch.no_grad():
        groups.clear()
        sampled = [model.eval()(x, t, y) for model in models.values()]
    assert groups == GROUPS[chunk, group_size]
    torch.testing.assert_close(sampled[1], sampled[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
@pytest.mark.parametrize("kernel", ["torch", "cpu"])
def test_a_model_cast_to_half_precision_runs_in_it(kernel, dtype, tolerance):
    """A DAR model cast to bf16 or fp16 (no autocast) runs in that dtype, as a residual one does: the kernels return
    h in their float32 accumulation dtype, which the route hands on in the model's. Its output and its gradient
    (all parameters together, relative to their norm) near the float64 model's; residual's in bf16 are 1.4% and 5%
    off, DAR's 1.2% and 2.8%."""
    model64 = perturb(tiny("dar", "static", 2, kernel=kernel))
    model = perturb(tiny("dar", "static", 2, kernel=kernel)).to(dtype)
    x, t, y = batch()
    out64, out = model64(x, t, y), model(x.to(dtype), t.to(dtype), y)
    assert out.dtype == dtype
    assert (out.double() - out64).norm() < tolerance * out64.norm()
    out.float().square().sum().backward()
    out64.square().sum().backward()
    grads = [(p.grad, p64.grad) for p, p64 in zip(model.parameters(), model64.parameters()) if p64.grad is not None]
    assert all(g.dtype == dtype for g, _ in grads)
    error = sum((g.double() - g64).square().sum() for g, g64 in grads).sqrt()
    assert error < 2 * tolerance * sum(g64.square().sum() for _, g64 in grads).sqrt()


def test_bf16_sources_are_saved_as_they_are():
    """bf16 sources, float32 routing parameters (autocast): the backward keeps the sources as they are, no float32
    copy (and not h: dh . h is summed from the dh . s_i the backward computes anyway)."""
    query, gain, *sources = mix_inputs("dynamic", n=5, dim=16, dtype=torch.float32)
    sources = [s.detach().bfloat16().requires_grad_() for s in sources]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h, _ = cpu_dar_mix(sources, query, gain)
    big = {t.data_ptr(): t.dtype for t in saved if t.shape == h.shape and t is not query}  # the query is [B, T, d]
    assert big == {s.data_ptr(): torch.bfloat16 for s in sources}
    h_ref, _ = dar_mix(sources, query, gain)
    grads = torch.autograd.grad(h, [query, gain, *sources], torch.ones_like(h))
    grads_ref = torch.autograd.grad(h_ref, [query, gain, *sources], torch.ones_like(h))
    assert h.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads[2:])
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("query", ["timestep", "dynamic"])
def test_compiled_dar_model_has_no_graph_break(query):
    model = perturb(tiny("dar", query, chunk=4, dtype=torch.float32, kernel="cpu"))
    explanation = torch._dynamo.explain(model)(*batch(dtype=torch.float32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert any("dar.mix" in str(node.target) for graph in explanation.graphs for node in graph.graph.nodes)


def test_compiled_cpu_kernel_computes_the_eager_gradients():
    """AOTAutograd traces dar::mix through its fake and its registered backward (aot_eager: no C++ compile)."""
    eager, compiled = (perturb(tiny("dar", "dynamic", chunk=4, kernel="cpu")).eval() for _ in range(2))
    x, t, y = batch()
    eager(x, t, y).pow(2).mean().backward()
    torch.compile(compiled, backend="aot_eager", fullgraph=True)(x, t, y).pow(2).mean().backward()
    for (name, p), p_ref in zip(compiled.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p_ref.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-12, atol=1e-12, msg=name)


FIRST_LOAD_INSIDE_COMPILE = """
import torch
from model import SiT
torch.manual_seed(0)
config = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=2, num_heads=2, num_classes=3,
              class_dropout_prob=0.0, router="dar", chunk=2, kernel="cpu")
eager, compiled = SiT(**config), SiT(**config)
with torch.no_grad():
    for p in eager.parameters():  # away from adaLN-Zero's zeros, where every output and gradient is 0
        p.add_(0.3 * torch.randn(p.shape))
compiled.load_state_dict(eager.state_dict())
x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 2])
import router_cpu
assert not router_cpu._cpu_kernel_loaded  # nothing has loaded the kernel yet: dynamo's trace is the first to ask
torch.compile(compiled, backend="aot_eager", fullgraph=True)(x, t, y).pow(2).mean().backward()
eager(x, t, y).pow(2).mean().backward()
for p, p_ref in zip(compiled.parameters(), eager.parameters()):  # eager mixes in groups: the same sums, rounded apart
    torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5)
assert eager.router.mixers[0].query.grad.abs().max() > 0  # the routing itself is differentiated
print("same gradients")
"""


def test_a_compiled_model_can_be_the_first_to_load_the_cpu_kernel():
    """train.py --compile in a fresh process: the first cpu_kernel_available() call happens inside dynamo's
    trace (assume_constant_result), which must load the kernel and capture the whole model in one graph."""
    done = subprocess.run([sys.executable, "-c", FIRST_LOAD_INSIDE_COMPILE], cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same gradients" in done.stdout
