"""Tests of diagnose.py: the gated residual, the three statistics, DAR's alpha, the figures, and a run on checkpoints.

Run: python -m pytest -q test_diagnose.py
"""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import diagnose
import plot
from model import SiT, create_model
import router
from router import Trace, dar_mix as DAR_MIX  # the original, for a spy that wraps it
from flow import flow_matching_loss
from test_router import perturb

DEPTH = 3  # 2L = 6 sublayers, 7 consumers with the final layer


def tiny(router="residual", query="static", chunk=1, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = SiT(input_size=8, patch_size=2, in_channels=2, hidden_size=16, depth=DEPTH, num_heads=2,
                num_classes=3, router=router, query=query, chunk=chunk)
    return model.to(dtype).eval()


def batch(n=4, dtype=torch.float64, seed=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=gen, dtype=dtype).clamp(-1, 1)
    y = torch.randint(0, 3, (n,), generator=gen)
    t = torch.rand(n, generator=gen, dtype=dtype)
    noise = torch.randn(n, 2, 8, 8, generator=gen, dtype=dtype)
    return x, y, t, noise


def uint8_images(n=6, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 2, 8, 8), generator=gen, dtype=torch.uint8), torch.randint(0, 3, (n,), generator=gen)


#################################################################################
#                      Counterfactual importance (residual)                      #
#################################################################################

def test_gates_leave_the_forward_unchanged():
    model = perturb(tiny("residual"))
    x, y, t, noise = batch()
    x_t = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * noise
    plain_trace, gated_trace = Trace(), Trace()
    plain = model(x_t, t, y, trace=plain_trace)
    original = model.router
    with diagnose.swapped_router(model, diagnose.GatedResidualRouter(DEPTH)) as gated:
        out = model(x_t, t, y, trace=gated_trace)
    assert model.router is original
    assert torch.equal(out, plain)
    assert all(torch.equal(a, b) for a, b in zip(plain_trace.hidden, gated_trace.hidden))
    assert [g.shape[0] for g in gated.gates] == list(range(1, 2 * DEPTH + 2))  # consumer l reads l sources


def sublayer_input_gradients(model, x, y, t, noise):
    """Independently of diagnose.py: dLoss/dh_l of the input of each sublayer's LayerNorm (only that path,
    through a zero perturbation added in a forward pre-hook), and v_0..v_2L recovered from those inputs."""
    norms = [n for block in model.blocks for n in (block.norm1, block.norm2)] + [model.final_layer.norm_final]
    inputs, deltas = [], []

    def perturb_input(module, args):
        delta = torch.zeros_like(args[0], requires_grad=True)
        inputs.append(args[0].detach())
        deltas.append(delta)
        return (args[0] + delta,)

    handles = [n.register_forward_pre_hook(perturb_input) for n in norms]
    try:
        loss = flow_matching_loss(model, x, y, t, noise)[0].sum()
    finally:
        for handle in handles:
            handle.remove()
    sources = [inputs[0]] + [after - before for before, after in zip(inputs, inputs[1:])]  # v_i = h_{i+1} - h_i
    return torch.autograd.grad(loss, deltas), sources


def test_gate_gradient_is_the_inner_product_of_dloss_dh_and_the_source():
    model = perturb(tiny("residual"))
    x, y, t, noise = batch()
    gate_grads = diagnose.gate_gradients(model, x, y, t, noise)
    input_grads, sources = sublayer_input_gradients(model, x, y, t, noise)
    assert len(gate_grads) == len(input_grads) == 2 * DEPTH + 1
    for l, (gate_grad, input_grad) in enumerate(zip(gate_grads, input_grads), start=1):
        expected = torch.stack([(input_grad * sources[i]).flatten(1).sum(dim=1) for i in range(l)])
        assert gate_grad.shape == expected.shape == (l, x.shape[0])
        torch.testing.assert_close(gate_grad, expected, rtol=1e-9, atol=1e-12)
    assert gate_grads[-1].abs().max() > 0


#################################################################################
#                               DAR routing weights                              #
#################################################################################

@pytest.mark.parametrize("query,chunk", [("static", 1), ("timestep", 2), ("dynamic", 4)])
def test_alpha_rows_sum_to_one_and_start_uniform(query, chunk):
    images, labels = uint8_images()
    t_grid = [0.1, 0.5, 0.9]
    fresh = diagnose.measure(tiny("dar", query, chunk), images, labels, t_grid, batch_size=4)
    trained = diagnose.measure(perturb(tiny("dar", query, chunk)), images, labels, t_grid, batch_size=4)
    assert fresh["routing"] == trained["routing"] == "alpha"
    for per_t in fresh["by_consumer"]:
        for row in per_t:
            torch.testing.assert_close(torch.tensor(row, dtype=torch.float64), torch.full((len(row),), 1 / len(row), dtype=torch.float64))
    spread = 0.0
    for per_t in trained["by_consumer"]:
        for row in per_t:
            assert sum(row) == pytest.approx(1, abs=1e-12)
            spread = max(spread, max(row) - min(row))
    assert spread > 1e-3  # a trained router is not uniform: the test above can tell


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_source_labels_match_the_router(chunk):
    model = perturb(tiny("dar", "static", chunk))
    x, y, t, noise = batch()
    trace = Trace()
    model(x, t, y, trace=trace)
    for l, alpha in enumerate(trace.alpha, start=1):
        labels = diagnose.source_labels(model, l)
        assert len(labels) == alpha.shape[-1] and labels[0] == "v0"
    assert diagnose.source_labels(model, 2 * DEPTH + 1)[-1] == f"v{2 * DEPTH}"


#################################################################################
#                               The three statistics                             #
#################################################################################

@pytest.mark.parametrize("router", ["residual", "unet", "dar"])
def test_statistics_are_finite_one_per_block(router):
    model = perturb(tiny(router, chunk=2))
    x, y, t, noise = batch()
    stats, _ = diagnose.block_statistics(model, x, y, t, noise)
    for name in diagnose.STATISTICS:
        assert stats[name].shape == (DEPTH, x.shape[0])
        assert torch.isfinite(stats[name]).all()
    assert (stats["rms"] > 0).all() and (stats["grad_norm"] > 0).all()
    assert (stats["cosine"].abs() <= 1 + 1e-12).all()


def test_statistics_against_direct_formulas():
    model = perturb(tiny("residual"))
    x, y, t, noise = batch()
    stats, _ = diagnose.block_statistics(model, x, y, t, noise)
    x_t = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * noise
    trace = Trace()
    velocity = model(x_t, t, y, trace=trace)
    loss = (velocity.float() - (x - noise).float()).pow(2).mean(dim=(1, 2, 3)).sum()
    grads = torch.autograd.grad(loss, trace.hidden)
    for k, (h, g) in enumerate(zip(trace.hidden, grads)):
        torch.testing.assert_close(stats["rms"][k], h.pow(2).mean(-1).sqrt().mean(-1))
        torch.testing.assert_close(stats["grad_norm"][k], g.pow(2).sum(dim=(1, 2)).sqrt())
    a, b = trace.hidden[1], trace.hidden[0]
    cosine = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(stats["cosine"][1], cosine.mean(-1))


def test_cosine_of_a_block_with_itself_is_one():
    h = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(diagnose.token_cosine(h, h), torch.ones(3, dtype=torch.float64))
    # A fresh adaLN-Zero residual model: every block hands on its input, v_0, unchanged.
    model = tiny("residual")
    stats, _ = diagnose.block_statistics(model, *batch())
    torch.testing.assert_close(stats["cosine"], torch.ones(DEPTH, 4, dtype=torch.float64))
    torch.testing.assert_close(stats["rms"], stats["rms"][:1].expand(DEPTH, 4))


#################################################################################
#                                     Figures                                    #
#################################################################################

def ink(path):
    """Number of non-white pixels."""
    return sum(Image.open(path).convert("L").histogram()[:250])


def test_figures_have_the_expected_size_and_content(tmp_path):
    images, labels = uint8_images()
    t_grid = [0.25, 0.75]
    reports = []
    for label, model in (("residual", perturb(tiny("residual"))), ("dar", perturb(tiny("dar", "timestep", 2))),
                         ("fresh", tiny("residual"))):  # the fresh one has zero gradients: linear axes
        report = diagnose.diagnose_model(model, images, labels, t_grid, diagnose.parse_layers(None, DEPTH), batch_size=4)
        reports.append(dict(report, label=label))
    line_path, t_path = tmp_path / "symptoms.png", tmp_path / "by_t.png"
    plot.draw_symptoms(reports, line_path, "test")
    plot.draw_symptoms_by_t(reports, t_grid, t_path)
    assert Image.open(line_path).size == plot.line_figure_size(3)
    assert Image.open(t_path).size == plot.t_figure_size(3, len(t_grid))
    for r in reports:
        path = tmp_path / f"routing_{r['label']}.png"
        plot.draw_routing(r, r["layers"], path)
        assert Image.open(path).size == plot.heatmap_figure_size(len(r["layers"]))
        assert ink(path) > 10000
    assert ink(line_path) > 5000 and ink(t_path) > 5000


def test_parse_flags():
    assert diagnose.parse_t_grid("4") == [0.125, 0.375, 0.625, 0.875]
    assert diagnose.parse_t_grid("0.1,0.9") == [0.1, 0.9]
    assert diagnose.parse_layers(None, 12) == [7, 23, 25]
    assert diagnose.parse_layers("1, 24,final", 12) == [1, 24, 25]
    for bad in ("0", "x", "1.5", "0.5,2"):
        with pytest.raises(ValueError, match="--t-grid"):
            diagnose.parse_t_grid(bad)
    for bad in ("0", "25", "last"):
        with pytest.raises(ValueError, match="--layers"):
            diagnose.parse_layers(bad, 12)


#################################################################################
#                       End to end, on two tiny checkpoints                       #
#################################################################################

def save_checkpoint(results, router, seed):
    """A train.py-shaped checkpoint of a perturbed SiT-T/8 on Fashion-MNIST."""
    config = dict(name="SiT-T/8", input_size=32, in_channels=1, num_classes=10, router=router,
                  query="timestep", chunk=4, learn_sigma=False)
    torch.manual_seed(seed)
    model = perturb(create_model(**config), std=0.02, seed=seed)
    run = results / f"SiT-T-8-{router}"
    (run / "checkpoints").mkdir(parents=True)
    state = model.state_dict()
    checkpoint = dict(model=state, ema=state, opt={}, step=7, args={}, model_config=config, rng={},
                      data=dict(name="fashion-mnist", path="/usr/share/datasets/fashion-mnist", channels=1,
                                num_classes=10, image_size=32))
    torch.save(checkpoint, run / "checkpoints" / "0000007.pt")
    return run / "checkpoints" / "0000007.pt"


def test_end_to_end_on_a_residual_and_a_dar_checkpoint(tmp_path, capsys):
    results = tmp_path / "results"
    residual, dar = save_checkpoint(results, "residual", 0), save_checkpoint(results, "dar", 1)
    reports = diagnose.main(["--results-dir", str(results), "--num-images", "6", "--batch-size", "4",
                             "--t-grid", "3", "--layers", "3,final", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "newest checkpoint of every run" in out and str(residual) in out and str(dar) in out
    assert [r["label"] for r in reports] == ["SiT-T-8-dar@7", "SiT-T-8-residual@7"]
    table = [line for line in out.splitlines() if line[:5].strip().isdigit()]
    assert len(table) == 12
    out_dir = results / "diagnose"
    saved = json.loads((out_dir / "diagnose.json").read_text())["reports"]
    assert [r["routing"] for r in saved] == ["alpha", "importance"]
    for r in saved:
        assert len(r["overall"]["rms"]) == 12 and len(r["by_t"]["grad_norm"]) == 3
        assert set(r["consumers"]) == {str(l) for l in range(1, 26)}
    assert len(saved[1]["consumers"]["25"]["importance_abs"][0]) == 25
    for name, size in (("symptoms.png", plot.line_figure_size(2)), ("symptoms_by_t.png", plot.t_figure_size(2, 3)),
                       ("routing_SiT-T-8-dar_7.png", plot.heatmap_figure_size(2)),
                       ("routing_SiT-T-8-residual_7.png", plot.heatmap_figure_size(2))):
        assert os.path.getsize(out_dir / name) > 0 and Image.open(out_dir / name).size == size


def test_kernel_flag_chooses_how_dar_is_computed(tmp_path, monkeypatch):
    """--kernel torch diagnoses a DAR checkpoint with the plain dar_mix, the default (auto) with the C++ kernel;
    the same symptoms and routing weights."""
    results = tmp_path / "results"
    save_checkpoint(results, "dar", 1)
    calls = []
    monkeypatch.setattr(router, "dar_mix", lambda *a, **k: calls.append(1) or DAR_MIX(*a, **k))
    reports = {}
    for kernel in ("torch", "auto"):
        calls.clear()
        reports[kernel] = diagnose.main(["--results-dir", str(results), "--num-images", "4", "--batch-size", "4",
                                         "--t-grid", "2", "--device", "cpu", "--kernel", kernel,
                                         "--out-dir", str(tmp_path / kernel)])[0]
        assert bool(calls) == (kernel == "torch"), kernel
    for statistic in ("rms", "grad_norm", "cosine"):
        np.testing.assert_allclose(reports["torch"]["overall"][statistic], reports["auto"]["overall"][statistic],
                                   rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(reports["torch"]["consumers"]["25"]["alpha"], reports["auto"]["consumers"]["25"]["alpha"],
                               rtol=1e-4, atol=1e-6)


def test_a_kill_while_writing_diagnose_json_leaves_none(tmp_path, monkeypatch):
    """study.py skips a diagnosis whose diagnose.json exists: a half-written one must never be there."""
    def killed(obj, file=None, **kwargs):
        if file is not None:
            file.write('{"reports": [')
            file.flush()
        raise KeyboardInterrupt

    results = tmp_path / "results"
    save_checkpoint(results, "residual", 0)
    monkeypatch.setattr(json, "dump", killed)
    monkeypatch.setattr(json, "dumps", killed)
    with pytest.raises(KeyboardInterrupt):
        diagnose.main(["--results-dir", str(results), "--num-images", "2", "--batch-size", "2", "--t-grid", "1",
                       "--device", "cpu"])
    assert not (results / "diagnose" / "diagnose.json").exists()


def test_redraw_from_a_trimmed_json_gives_the_same_figures(tmp_path):
    results = tmp_path / "results"
    save_checkpoint(results, "residual", 0)
    save_checkpoint(results, "dar", 1)
    diagnose.main(["--results-dir", str(results), "--num-images", "4", "--batch-size", "4", "--t-grid", "2",
                   "--layers", "3,final", "--device", "cpu"])
    reports = json.loads((results / "diagnose" / "diagnose.json").read_text())["reports"]
    dar, residual = reports
    dar["consumers"] = {str(l): dar["consumers"][str(l)] for l in dar["layers"]}  # what the figures draw
    del residual["consumers"]
    (tmp_path / "trimmed.json").write_text(json.dumps({"reports": reports}))
    diagnose.main(["--redraw", str(tmp_path / "trimmed.json")])
    for name in ("symptoms.png", "symptoms_by_t.png", "routing_SiT-T-8-dar_7.png"):
        assert Image.open(tmp_path / name).tobytes() == Image.open(results / "diagnose" / name).tobytes(), name
    assert not (tmp_path / "routing_SiT-T-8-residual_7.png").exists()


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        diagnose.main(["--ckpt", str(tmp_path / "missing.pt")])
    assert "--ckpt" in capsys.readouterr().err
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        diagnose.main(["--ckpt", str(tmp_path / "broken.pt")])
    assert "corrupt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        diagnose.main(["--results-dir", str(tmp_path)])
    assert "no checkpoints" in capsys.readouterr().err
    (tmp_path / "no-eval").mkdir()
    (tmp_path / "no-eval" / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "log.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    for run, message in (("no-eval", "--curves a=.*no-eval: no validation records"),
                         ("broken", "broken/log.jsonl line 2 is not a JSON record")):
        with pytest.raises(SystemExit):
            diagnose.main(["--curves", f"a={tmp_path / run}", "--out-dir", str(tmp_path / "out")])
        assert re.search("error: .*" + message, capsys.readouterr().err)
    (tmp_path / "other.json").write_text('{"runs": []}')
    with pytest.raises(SystemExit):
        diagnose.main(["--redraw", str(tmp_path / "other.json")])
    assert "--redraw" in capsys.readouterr().err


#################################################################################
#                     High-frequency detail (--spectrum)                         #
#################################################################################

def white_and_blurred(n=64, size=32, seed=4):
    """White noise images and the same noise blurred twice by a circular 5 x 5 box filter (twice, so that the
    box's sidelobes are small), both [n, 1, size, size] in [0, 1]."""
    white = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
    box = lambda x: torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (2, 2, 2, 2), mode="circular"), 5, 1)  # noqa: E731
    return white, box(box(white))


def test_power_spectrum_orders_white_and_blurred_noise():
    white, blurred = white_and_blurred()
    flat, smooth = diagnose.power_spectrum(white), diagnose.power_spectrum(blurred)
    # White noise spreads its energy evenly over the frequency square: the share above 0.25 cycles/pixel is
    # the area of the square outside that disc, 1 - pi 0.25^2 ~ 0.80 (on the 32 x 32 grid, 0.80 too).
    assert abs(flat["high_share"] - (1 - torch.pi * 0.25 ** 2)) < 0.03, flat["high_share"]
    assert smooth["high_share"] < 0.1 < 0.7 < flat["high_share"]
    assert len(flat["frequency"]) == 16 and flat["frequency"][-1] == 0.5
    assert max(flat["power"]) / min(flat["power"]) < 1.5  # flat, while the blur falls by orders of magnitude
    assert smooth["power"][-1] < 0.01 * smooth["power"][0]
    shifted = diagnose.power_spectrum(white * 2 + 5)  # brightness (DC) is ignored, contrast scales all power
    assert abs(shifted["high_share"] - flat["high_share"]) < 1e-9


def test_spectrum_command_writes_ratios_and_figure(tmp_path, capsys):
    import numpy as np
    white, blurred = white_and_blurred()
    for name, images in (("white", white), ("blurred", blurred), ("ref", white)):
        array = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).expand(-1, -1, -1, 3).numpy()
        np.savez(tmp_path / f"{name}.npz", arr_0=array, arr_1=np.zeros(len(array), dtype=np.int64))
    rows = diagnose.main(["--spectrum", f"white={tmp_path / 'white.npz'}", f"blur={tmp_path / 'blurred.npz'}",
                          "--spectrum-ref", str(tmp_path / "ref.npz"), "--out-dir", str(tmp_path / "out")])
    assert [r["label"] for r in rows] == [f"real ({tmp_path / 'ref.npz'})", "white", "blur"]
    assert abs(rows[1]["ratio"] - 1) < 1e-3 and rows[2]["ratio"] < 0.2
    saved = json.loads((tmp_path / "out" / "spectrum.json").read_text())
    assert saved["high_frequency"] == 0.25 and len(saved["sets"]) == 3
    assert Image.open(tmp_path / "out" / "spectrum.png").size[0] == 760
    assert "blur" in capsys.readouterr().out
    (tmp_path / "cut.npz").write_bytes((tmp_path / "white.npz").read_bytes()[:300])  # sample.py killed mid-write
    np.save(tmp_path / "bare.npy", np.zeros((2, 8, 8, 3), dtype=np.uint8))  # an array, not an npz
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), dtype=np.float32))  # images in [0, 1], not uint8
    for flags, message in ((["--spectrum", "x=missing.npz"], "expected LABEL=PATH"),
                           (["--spectrum", f"x={tmp_path / 'cut.npz'}"], "cut.npz: not a readable npz"),
                           (["--spectrum", f"x={tmp_path / 'bare.npy'}"], "bare.npy: not a readable npz"),
                           (["--spectrum", f"x={tmp_path / 'float.npz'}"], "float.npz: expected uint8 images"),
                           (["--spectrum", f"w={tmp_path / 'white.npz'}", "--spectrum-ref", "nope"], "--spectrum-ref nope"),
                           (["--spectrum", f"w={tmp_path / 'white.npz'}", "--spectrum-ref", str(tmp_path / "float.npz")],
                            f"--spectrum-ref {tmp_path / 'float.npz'}: expected uint8 images")):
        with pytest.raises(SystemExit):
            diagnose.main(flags)
        assert message in capsys.readouterr().err
