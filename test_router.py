"""Tests of model.py and router.py against references written independently here (docs/method.md sections 2-4).

Run: python -m pytest -q test_router.py
"""
import math

import pytest
import torch
import torch.nn.functional as F

from model import SiT, create_model, load_backbone, modulate
import router
from router import REPAProjector, Trace, build_router, dar_mix, repa_loss

DEPTH, WIDTH = 3, 16  # 2L = 6 sublayers


def tiny(router="residual", query="static", chunk=1, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = SiT(input_size=8, patch_size=2, in_channels=2, hidden_size=WIDTH, depth=DEPTH, num_heads=2,
                num_classes=3, router=router, query=query, chunk=chunk, **kwargs)
    return model.to(dtype)


def perturb(model, std=0.3, seed=1):
    """Random values everywhere, so zero-initialized gates, queries and heads cannot hide a mistake."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def batch(n=4, dtype=torch.float64, seed=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=gen, dtype=dtype)
    t = torch.rand(n, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, t, y


def spy_on_mixing(monkeypatch):
    """A list that gets (sources, gradient_sums) for every DAR consumer that mixes its sources, whichever way:
    router.mix_sources (one consumer), or router.cpu_dar_mix_group for a group of consumers (one entry per member,
    made at the group's first call, to which each later member's own call adds its newer sources)."""
    mixed, members = [], []  # members: the entries of the current group still waiting for their newer sources
    mix_sources, mix_group = router.mix_sources, router.cpu_dar_mix_group

    def mix_one(sources, *args, gradient_sums=None, **kwargs):
        mixed.append((sources, gradient_sums))
        return mix_sources(sources, *args, gradient_sums=gradient_sums, **kwargs)

    def mix_in_group(sources, queries, gains, gradient_sums=None, prefix=None):
        if prefix is None:
            members[:] = range(len(mixed) + 1, len(mixed) + len(queries))
            mixed.extend([(sources, gradient_sums)] * len(queries))
        else:
            shared, shared_sums = mixed[members[0]]
            mixed[members.pop(0)] = ([*shared, *sources], shared_sums and [*shared_sums, *gradient_sums])
        return mix_group(sources, queries, gains, gradient_sums, prefix)
    monkeypatch.setattr(router, "mix_sources", mix_one)
    monkeypatch.setattr(router, "cpu_dar_mix_group", mix_in_group)
    return mixed


#################################################################################
#               Independent reference: SiT with an explicit source list          #
#################################################################################

def reference_forward(model, x, t, y, make_input):
    """SiT forward that keeps every sublayer output v_0..v_{2L} and asks make_input(l, outs, shift, scale, t_emb)
    for h_l, with l = 1..2L and 2L+1 for the final layer."""
    outs = [model.x_embedder(x) + model.pos_embed]
    t_emb = model.t_embedder(t)
    c = t_emb + model.y_embedder(y, False)
    for block in model.blocks:
        mod = block.adaLN_modulation(c).chunk(6, dim=1)
        for (shift, scale, gate), norm, f in (((mod[0], mod[1], mod[2]), block.norm1, block.attn),
                                              ((mod[3], mod[4], mod[5]), block.norm2, block.mlp)):
            h = make_input(len(outs), outs, shift, scale, t_emb)
            outs.append(gate.unsqueeze(1) * f(modulate(norm(h), shift, scale)))
    shift, scale = model.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    h = make_input(len(outs), outs, shift, scale, t_emb)
    out = model.final_layer.linear(modulate(model.final_layer.norm_final(h), shift, scale))
    return model.unpatchify(out)


def residual_input(l, outs, shift, scale, t_emb):
    return sum(outs[:l])  # v_0 + v_1 + ... + v_{l-1}


def spec_sources(l, outs, S, two_L):
    """V_l from docs/method.md section 3, written from the formula: sublayer l (final: 2L+1) in chunk m."""
    final = l == two_L + 1
    m = math.ceil(two_L / S) if final else math.ceil(l / S)
    summaries = [sum(outs[(n - 1) * S + 1: n * S + 1]) for n in range(1, m)]
    raw = outs[(m - 1) * S + 1: l]
    return [outs[0]] + summaries + raw


def naive_dar_input(model, S, logit_divisor=math.sqrt(WIDTH)):
    mixers = model.router.mixers

    def make_input(l, outs, shift, scale, t_emb):
        sources = spec_sources(l, outs, S, 2 * model.depth)
        if l == 1:
            return sources[0]  # a softmax over one source is 1: the router keeps no parameters for it
        mixer = mixers[l - 2]
        stacked = torch.stack(sources)  # [N, B, T, d]
        keys = mixer.gain * stacked / torch.sqrt(stacked.pow(2).mean(-1, keepdim=True) + 1e-6)
        if model.router.query == "static":
            q = mixer.query
        elif model.router.query == "timestep":
            q = (mixer.query + t_emb)[:, None, :]
        else:
            u = F.layer_norm(sources[-1], (WIDTH,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
            q = u @ mixer.query_proj.weight.T
        alpha = torch.softmax((keys * q).sum(-1) / logit_divisor, dim=0)
        return (alpha[..., None] * stacked).sum(0)
    return make_input


#################################################################################
#                                   The tests                                   #
#################################################################################

def test_residual_router_is_plain_sit():
    model = perturb(tiny("residual")).eval()
    x, t, y = batch()
    torch.testing.assert_close(model(x, t, y), reference_forward(model, x, t, y, residual_input), rtol=0, atol=1e-12)


def test_the_stream_starts_token_major_in_memory():
    """timm's patch embedding returns a transposed view, which every op of a residual stream would then follow
    and copy; ours returns [B, T, D] contiguous (the same values)."""
    model = tiny("residual")
    x = batch()[0]
    v0 = model.x_embedder(x)
    assert v0.is_contiguous()
    torch.testing.assert_close(v0, model.x_embedder.proj(x).flatten(2).transpose(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("query", ["static", "timestep", "dynamic"])
@pytest.mark.parametrize("chunk", [1, 2, 4, 5, 6, 9])
def test_dar_matches_naive_chunk_rule(query, chunk):
    model = perturb(tiny("dar", query, chunk)).eval()
    x, t, y = batch()
    expected = reference_forward(model, x, t, y, naive_dar_input(model, chunk))
    torch.testing.assert_close(model(x, t, y), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("query", ["static", "timestep", "dynamic"])
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_logit_scale_one_drops_the_sqrt_d(query, kernel):
    model = perturb(tiny("dar", query, chunk=2, logit_scale="one", kernel=kernel)).eval()
    x, t, y = batch()
    expected = reference_forward(model, x, t, y, naive_dar_input(model, 2, logit_divisor=1.0))
    torch.testing.assert_close(model(x, t, y), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 4, 5])
def test_number_of_sources_matches_the_chunk_rule(chunk):
    model = tiny("dar", chunk=chunk)
    trace = Trace()
    model(*batch(), trace=trace)
    two_L = 2 * DEPTH
    M = math.ceil(two_L / chunk)
    counts = [a.shape[-1] for a in trace.alpha]
    expected = [len(spec_sources(l, list(range(two_L + 1)), chunk, two_L)) for l in range(1, two_L + 2)]
    assert counts == expected
    assert max(counts) <= 1 + M + chunk
    if chunk == 1:
        assert counts == list(range(1, two_L + 2))  # dense DAR: sublayer l sees all l previous outputs


def test_chunked_route_keeps_only_live_sources():
    L, S, d = 12, 4, 8
    dar = build_router("dar", depth=L, hidden_size=d, chunk=S)
    route = dar.start(torch.randn(1, 3, d), t_emb=None)
    most = 0
    for _ in range(2 * L):
        route.read(None, None)
        most = max(most, len(route.stored))
        route.write(torch.randn(1, 3, d))
    route.read_final(None, None)
    M = math.ceil(2 * L / S)
    assert most <= 1 + M + S and len(route.stored) == 1 + (M - 1) + S


def test_one_seed_gives_one_backbone_under_every_router():
    """Routers draw no random numbers, so runs that differ only in the router start from the same backbone."""
    def backbone(model):
        return {k: v for k, v in model.state_dict().items() if not k.startswith("router.")}
    reference = backbone(tiny("residual"))
    for name_of_router, query in (("unet", "static"), ("dar", "static"), ("dar", "dynamic")):
        for name, tensor in backbone(tiny(name_of_router, query, chunk=2)).items():
            assert torch.equal(tensor, reference[name]), (name_of_router, query, name)


@pytest.mark.parametrize("query", ["static", "timestep", "dynamic"])
def test_every_router_parameter_learns(query):
    """No routing parameter that can never receive a gradient: sublayer 1 reads v_0 alone (alpha = 1), so the
    router has mixers for consumers 2..2L+1 only, and each of them gets a non-zero gradient."""
    model = perturb(tiny("dar", query, chunk=2))
    assert len(model.router.mixers) == 2 * DEPTH
    x, t, y = batch()
    model(x, t, y).pow(2).mean().backward()
    for name, p in model.router.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_dar_mix_stores_no_normalized_copies():
    """Autograd keeps only the sources themselves (and small tensors) for a static query: no [N, B, T, d] keys."""
    sources = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(6)]
    big_saved = []

    def pack(tensor):
        if tensor.numel() >= 2 * 5 * 8:
            big_saved.append(tensor)
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        dar_mix(sources, torch.randn(8), torch.ones(8))
    source_ptrs = {s.data_ptr() for s in sources}
    assert big_saved and all(s.data_ptr() in source_ptrs for s in big_saved)


@pytest.mark.parametrize("query", ["static", "timestep", "dynamic"])
def test_alpha_uniform_at_init_sums_to_one_and_moves_after_a_step(query):
    model = tiny("dar", query, chunk=2, dtype=torch.float32)
    x, t, y = batch(dtype=torch.float32)
    trace = Trace(per_token=True)
    model(x, t, y, trace=trace)
    for alpha in trace.alpha:
        torch.testing.assert_close(alpha.sum(-1), torch.ones(alpha.shape[:-1]))
        torch.testing.assert_close(alpha, torch.full_like(alpha, 1 / alpha.shape[-1]))
    # A fresh adaLN-Zero model passes no gradient to the router (every v_l and the head are zero), so
    # take the one step from a trained-looking backbone whose router is still at its initialization.
    perturb(model)
    model.router.reset_parameters()
    trace = Trace(per_token=True)
    model(x, t, y, trace=trace)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    F.mse_loss(model(x, t, y), x).backward()
    opt.step()
    after = Trace(per_token=True)
    model(x, t, y, trace=after)
    moved = max((a - b).abs().max().item() for a, b in zip(after.alpha, trace.alpha))
    assert moved > 1e-4
    for alpha in after.alpha:
        torch.testing.assert_close(alpha.sum(-1), torch.ones(alpha.shape[:-1]))


def test_timestep_query_routes_as_static_at_init_and_depends_on_t_after_training():
    """At step 0 e(t) = 0 (the timestep embedder's last Linear starts at zero), so q_l = w_l + e(t) = w_l: the
    same routing weights and hidden states as the static query with the same weights, checked with every
    other weight random (non-zero adaLN gates and queries), where a non-zero e(t) would show."""
    timestep = tiny("dar", "timestep", chunk=2)
    assert timestep.t_embedder.mlp[2].weight.abs().max() == 0 and timestep.t_embedder.mlp[2].bias.abs().max() == 0
    perturb(timestep)
    with torch.no_grad():
        timestep.t_embedder.mlp[2].weight.zero_()
        timestep.t_embedder.mlp[2].bias.zero_()
    static = tiny("dar", "static", chunk=2)
    static.load_state_dict(timestep.state_dict())
    x, t, y = batch()

    def routing(model):
        trace = Trace(per_token=True)
        out = model(x, t, y, trace=trace)
        return out, trace
    (out_t, trace_t), (out_s, trace_s) = routing(timestep), routing(static)
    assert out_s.abs().max() > 1e-3  # a live model: the comparison below is not between zeros
    # equal up to rounding: a [d] query and a [B, 1, d] one take different matrix products
    torch.testing.assert_close(out_t, out_s, rtol=0, atol=1e-12)
    for a, b in zip(trace_t.alpha + trace_t.hidden, trace_s.alpha + trace_s.hidden):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad():  # the check can fail: a non-zero e(t) moves the timestep query's weights
        timestep.t_embedder.mlp[2].bias.add_(0.5)
        static.t_embedder.mlp[2].bias.add_(0.5)
    moved, kept = routing(timestep)[1], routing(static)[1]
    assert max((a - b).abs().max().item() for a, b in zip(moved.alpha[1:], kept.alpha[1:])) > 1e-3

    opt = torch.optim.AdamW(timestep.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(timestep(x, t, y), x).backward()
        opt.step()
    early, late = Trace(), Trace()
    timestep(x, torch.full_like(t, 0.1), y, trace=early)
    timestep(x, torch.full_like(t, 0.9), y, trace=late)
    assert max((a - b).abs().max().item() for a, b in zip(early.alpha[1:], late.alpha[1:])) > 1e-6


def test_dynamic_query_is_per_token():
    model = perturb(tiny("dar", "dynamic", chunk=1))
    trace = Trace(per_token=True)
    model(*batch(), trace=trace)
    alpha = trace.alpha[4]  # sublayer 5: five sources
    assert alpha.shape[1] == model.grid_size ** 2
    assert (alpha - alpha[:, :1]).abs().max() > 1e-3


@pytest.mark.parametrize("router,query,chunk", [("residual", "static", 1), ("unet", "static", 1),
                                                ("dar", "static", 1), ("dar", "timestep", 4),
                                                ("dar", "dynamic", 2)])
def test_every_router_trains(router, query, chunk):
    model = tiny(router, query, chunk, dtype=torch.float32)
    x, t, y = batch(8, dtype=torch.float32)
    noise = torch.randn_like(x)
    x_t = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * noise
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.mse_loss(model(x_t, t, y), x - noise)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]


def test_unet_starts_as_residual_and_fuses_first_half_outputs():
    unet = perturb(tiny("unet")).eval()
    assert len(unet.router.skip_linears) == DEPTH // 2
    residual = tiny("residual").eval()
    residual.load_state_dict({k: v for k, v in unet.state_dict().items() if not k.startswith("router.")})
    x, t, y = batch()
    unet.router.reset_parameters()
    torch.testing.assert_close(unet(x, t, y), residual(x, t, y), rtol=0, atol=1e-12)

    perturb(unet.router)
    expected = reference_forward(unet, x, t, y, _unet_reference(unet.router.skip_linears[0]))
    assert not torch.allclose(expected, residual(x, t, y))
    torch.testing.assert_close(unet(x, t, y), expected, rtol=0, atol=1e-12)


def _unet_reference(linear):
    """DEPTH = 3: h at sublayer 5 is Linear_0([v_0 + ... + v_4, v_0 + v_1 + v_2]); later sublayers add to it."""
    def make_input(l, outs, shift, scale, t_emb):
        if l < 5:
            return sum(outs[:l])
        fused = linear(torch.cat([sum(outs[:5]), sum(outs[:3])], dim=-1))
        return fused + sum(outs[5:l])
    return make_input


def test_repa_loss_is_minus_one_when_aligned():
    z = torch.randn(2, 5, 7)
    assert repa_loss(3 * z, z).item() == pytest.approx(-1.0, abs=1e-6)
    assert repa_loss(z, -z).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="same"):
        repa_loss(z, z[:, :3])


@pytest.mark.parametrize("router", ["residual", "unet", "dar"])
def test_repa_gradients_reach_blocks_up_to_depth_k_only(router):
    k = 2
    model = perturb(tiny(router, chunk=2, dtype=torch.float32))
    projector = REPAProjector(WIDTH, z_dim=6, projector_dim=32)
    x, t, y = batch(dtype=torch.float32)
    out, hidden = model(x, t, y, return_hidden=k)
    assert hidden.shape == (4, model.grid_size ** 2, WIDTH)
    repa_loss(projector(hidden), torch.randn(4, model.grid_size ** 2, 6)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    for i, block in enumerate(model.blocks):
        grads = [p.grad for p in block.parameters()]
        if i < k:
            assert any(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads)
    assert all(p.grad is None for p in model.final_layer.parameters())


def test_sit_parameter_counts_match_reference_implementation():
    def count(name, learn_sigma):
        with torch.device("meta"):
            model = create_model(name, input_size=32, in_channels=4, num_classes=1000, learn_sigma=learn_sigma)
        return sum(p.numel() for p in model.parameters())
    assert count("SiT-XL/2", True) == 675_129_632
    assert count("SiT-XL/2", False) == 675_111_184
    assert count("SiT-S/2", True) == 32_963_360
    assert count("SiT-S/2", False) == 32_957_200


def test_residual_state_dict_uses_sit_names():
    names = set(tiny("residual", learn_sigma=True).state_dict())
    for expected in ["x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
                     "y_embedder.embedding_table.weight", "pos_embed", "blocks.0.attn.qkv.weight",
                     "blocks.0.attn.proj.bias", "blocks.2.mlp.fc1.weight", "blocks.2.mlp.fc2.bias",
                     "blocks.1.adaLN_modulation.1.weight", "final_layer.linear.weight",
                     "final_layer.adaLN_modulation.1.bias"]:
        assert expected in names
    assert not any(name.startswith("router.") for name in names)


@pytest.mark.parametrize("query", ["static", "dynamic"])
def test_residual_weights_load_into_dar_with_fresh_router(query):
    residual = perturb(tiny("residual", learn_sigma=True))
    dar = tiny("dar", query, chunk=2, seed=5)
    fresh_router = {k: v.clone() for k, v in dar.state_dict().items() if k.startswith("router.")}
    router_keys = load_backbone(dar, residual.state_dict())
    assert sorted(router_keys) == sorted(fresh_router)
    state = dar.state_dict()
    for name, value in residual.state_dict().items():
        if name.startswith("final_layer.linear"):
            velocity_half = value.reshape(4, 4, *value.shape[1:])[:, :2].reshape(state[name].shape)
            torch.testing.assert_close(state[name], velocity_half, rtol=0, atol=0)
        else:
            torch.testing.assert_close(state[name], value, rtol=0, atol=0)
    for name, value in fresh_router.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing"):
        load_backbone(dar, {k: v for k, v in residual.state_dict().items() if "blocks.1." not in k})


@pytest.mark.parametrize("kernel", ["torch", "cpu"])
def test_under_autocast_every_source_is_bf16(kernel, monkeypatch):
    """v_0 comes out of the patch embedding in float32 (the position embedding is): the router casts it once."""
    model = perturb(tiny("dar", "static", chunk=2, dtype=torch.float32, kernel=kernel))
    mixed = spy_on_mixing(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(*batch(dtype=torch.float32)).float().pow(2).mean().backward()
    assert [{s.dtype for s in sources} for sources, _ in mixed] == [{torch.bfloat16}] * (2 * DEPTH)  # consumers 2..2L+1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_source_is_contiguous(precision, monkeypatch):
    """The patch embedding hands v_0 over transposed in memory: the router copies it once per forward pass, so
    that no consumer reads it against the grain (and the C++ kernel, which needs contiguous sources, never
    copies it)."""
    model = perturb(tiny("dar", "static", chunk=2, dtype=torch.float32))
    mixed = spy_on_mixing(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(*batch(dtype=torch.float32))
    assert [all(s.is_contiguous() for s in sources) for sources, _ in mixed] == [True] * (2 * DEPTH)


@pytest.mark.parametrize("make,match", [
    (lambda: tiny("highway"), "unknown router 'highway'.*residual, unet, dar"),
    (lambda: tiny("dar", query="learned"), "unknown query 'learned'.*static, timestep, dynamic"),
    (lambda: tiny("dar", chunk=0), "chunk must be an integer >= 1"),
    (lambda: tiny("dar", logit_scale="half"), "unknown logit scale 'half'.*inv-sqrt-d, one"),
    (lambda: SiT(input_size=30, patch_size=4, depth=1, hidden_size=8, num_heads=2), "input_size=30.*patch_size=4"),
    (lambda: create_model("SiT-XXL/2"), "unknown model config 'SiT-XXL/2'"),
    (lambda: tiny()(*batch(), return_hidden=DEPTH + 1), "repa depth.*1..3"),
    (lambda: tiny()(*batch(), return_hidden=0), "repa depth.*1..3"),
])
def test_bad_input_raises_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_kernel_is_checked_against_the_models_device(monkeypatch):
    """The C++ kernel reads CPU tensors; the Triton one CUDA tensors, or CPU ones in Triton's interpreter (as the
    tests run it), whatever spelling of TRITON_INTERPRET triton took."""
    import router_triton
    for kernel, device in (("auto", "cpu"), ("auto", "cuda"), ("torch", "cuda:1"), ("cpu", "cpu")):
        router.check_kernel(kernel, device)
    with pytest.raises(ValueError, match="--kernel cpu computes on the CPU, and the model is on cuda"):
        router.check_kernel("cpu", "cuda:0")
    for interpreted, runs, refused in ((True, "cpu", "cuda"), (False, "cuda", "cpu")):
        monkeypatch.setattr(router_triton, "INTERPRETED", interpreted)
        router.check_kernel("triton", runs)
        with pytest.raises(ValueError, match=f"--kernel triton runs on {runs} here .*, and the model is on {refused}"):
            router.check_kernel("triton", refused)
