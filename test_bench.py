"""Tests of bench.py --op step: every router gets a row, and the source counts and FLOP model are those of docs/method.md.

Run: python -m pytest -q test_bench.py
"""
import itertools
import math
import os
import subprocess
import time

import pytest
import torch

import bench
from model import SiT


def step_table(capsys, model="SiT-T/8"):
    bench.main(["--op", "step", "--model", model, "--step-batch", "2", "--repeats", "1", "--warmup", "0",
                "--device", "cpu"])
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("router", "---"):
            rows[cells[0]] = cells
    return rows


def test_step_bench_lists_every_router_with_spec_source_counts(capsys):
    rows = step_table(capsys)
    assert list(rows) == [label for label, *_ in bench.STEP_VARIANTS]
    two_L = 2 * 12  # SiT-T: 12 blocks
    # Dense DAR: consumer l reads l sources; l = 2..2L+1 mix (sublayer 1 reads v_0 alone): max 2L+1, sum
    # (2L+1)(2L+2)/2 - 1.
    assert rows["dar static c1"][1:3] == [str(two_L + 1), str((two_L + 1) * (two_L + 2) // 2 - 1)]
    for chunk in (4, 8):  # at most 1 + M + S sources with M = ceil(2L / S)
        assert int(rows[f"dar static c{chunk}"][1]) <= 1 + math.ceil(two_L / chunk) + chunk
    assert rows["residual"][1:4] == ["-", "-", "+0.0%"]
    assert rows["residual"][5] == "1.00x" and rows["residual"][7] == "1.00x"

    def extra(label):
        return float(rows[label][3].rstrip("%"))
    assert 0 < extra("dar static c4") < extra("dar static c1")  # chunking cuts the mixing FLOPs
    assert extra("dar static c4") == extra("dar timestep c4")  # the timestep query adds no matmul
    # The dynamic query adds (2L + 1) d x d projections per token: about 2 d^2 (2L + 1) FLOPs.
    assert extra("dar dynamic c4") > extra("dar static c4") + 10


def test_sample_bench_times_the_chosen_routers_under_bf16(capsys):
    bench.main(["--op", "sample", "--model", "SiT-T/8", "--step-batch", "2", "--repeats", "1", "--warmup", "0",
                "--device", "cpu", "--routers", "dar static c4", "--precision", "bf16"])
    out = capsys.readouterr().out
    assert "sampling (one model evaluation, no grad)" in out and "bf16" in out
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert rows == ["router", "---", "residual", "dar static c4"]


def test_compiled_step_bench_times_the_compiled_models(monkeypatch):
    """--compile (the GPU check's last table) times each model eager and compiled, in one run. Two blocks instead
    of SiT-T's 12, to compile quickly."""
    calls = {}

    def compile_counting(model):
        compiled, router = compile_model(model), type(model.router).__name__
        compiled_forward = compiled.forward

        def forward(*args, **kwargs):
            calls[router] = calls.get(router, 0) + 1
            return compiled_forward(*args, **kwargs)
        compiled.forward = forward
        return compiled

    compile_model = torch.compile
    monkeypatch.setattr(bench, "create_model", lambda name, **options: SiT(depth=2, hidden_size=32, num_heads=2,
                                                                           patch_size=8, **options))
    monkeypatch.setattr(torch, "compile", compile_counting)
    tables = bench.main(["--op", "step", "--model", "SiT-T/8", "--step-batch", "2", "--repeats", "2", "--warmup",
                         "1", "--device", "cpu", "--routers", "dar static c4", "--compile"])
    assert [row[0] for row in tables["SiT-T/8"]] == ["residual", "residual compiled", "dar static c4",
                                                     "dar static c4 compiled"]
    # each compiled model: 1 warm-up and 2 timed steps, then 1 step measuring the peak memory
    assert calls == {"ResidualRouter": 4, "DARRouter": 4}


@pytest.mark.parametrize("flags, message", [(["--op", "step", "--warmup", "0"], "--compile needs --warmup 1 or more"),
                                            (["--op", "host"], "--compile: --op host times eager host work")])
def test_compile_flags_that_cannot_work_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        bench.main([*flags, "--compile"])
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_router_bench_runs_the_cpu_op(capsys):
    rows = bench.main(["--op", "router", "--device", "cpu", "--batch", "2", "--tokens", "5", "--dim", "24",
                       "--sources", "3", "--impls", "torch,cpu", "--repeats", "1", "--warmup", "0"])
    assert [row[:2] for row in rows] == [["torch", "3"], ["cpu", "3"]]
    assert "(-" in rows[1][6] or "(+0.0%)" in rows[1][6]  # the op saves less for the backward than dar_mix


def test_router_bench_refuses_triton_where_its_kernels_do_not_run(monkeypatch):
    """--impls triton on a device the fused kernel does not run on in this process (compiled: CUDA only)."""
    import router_triton
    monkeypatch.setattr(router_triton, "kernel_device", lambda: "cuda")
    with pytest.raises(SystemExit, match="--impls triton: the fused kernel runs on cuda in this process, not "
                                         "--device cpu"):
        bench.main(["--op", "router", "--device", "cpu", "--impls", "torch,triton", "--repeats", "1"])


def test_gpu_checks_skip_in_one_line_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bash .ci/gpu would run the checks")
    result = subprocess.run(["bash", ".ci/gpu"], cwd=os.path.dirname(os.path.abspath(__file__)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["SKIPPED: bash .ci/gpu needs a CUDA GPU and this machine has none; "
                                          "nothing was run"]


def run_gpu_report(monkeypatch, tmp_path, capsys, memory_gib=141, failing=()):
    """.ci/gpu_report.py's main() on CPU: CUDA faked, its subprocess checks passing, bench.py's tables replaced by
    rows in bench.py's format (the H200 run's of docs/kernel.md); a bench run whose argv has a (flag, value) of
    `failing` raises.
    Returns (exit status, printed summary, the --step-batch values asked for)."""
    import importlib.util
    import types
    spec = importlib.util.spec_from_file_location("gpu_report", os.path.join(os.path.dirname(__file__), ".ci",
                                                                             "gpu_report.py"))
    gpu_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_report)
    router_rows = [["torch", "19", "0.18", "3.68 (1.00x)", "7.03 (1.00x)", "10.71 (1.00x)", "1.8 (+0.0%)",
                    "110.4 (+0.0%)", "865.8 (+0.0%)"],
                   ["triton", "19", "1.22", "0.96 (3.82x)", "1.50 (4.70x)", "2.45 (4.37x)", "0.0 (-98.2%)",
                    "36.0 (-67.4%)", "774.2 (-10.6%)"]]
    router_rows += [[impl, "57", *rest] for impl, _, *rest in router_rows]  # bench.py's rows for N 19 and 57
    step_rows = [["residual", "-", "-", "+0.0%", "113", "1.00x", "13580", "1.00x"],
                 ["dar static c1", "57", "1652", "+1.2%", "208", "1.85x", "14647", "1.08x"],
                 ["dar static c4", "19", "623", "+0.5%", "200", "1.77x", "14620", "1.08x"]]
    batches = []

    def bench_main(argv):
        if "step" in argv:
            batches.append(argv[argv.index("--step-batch") + 1] + (" compiled" if "--compile" in argv else ""))
        if any(flag in argv and argv[argv.index(flag) + 1] == value for flag, value in failing):
            raise RuntimeError("CUDA out of memory")
        if "step" not in argv:
            return router_rows
        routers = argv[argv.index("--routers") + 1].split(",")
        rows = [step_rows[0], *(row for row in step_rows[1:] if row[0] in routers)]
        if "--compile" in argv:  # a compiled row after each eager one (times: the H200's, as if halved)
            rows = [variant for row in rows for variant in (row, [row[0] + " compiled", *row[1:4], str(int(row[4]) // 2),
                                                                   "1.70x", *row[6:]])]
        return {"SiT-XL/2": rows}

    monkeypatch.setattr(gpu_report, "LOGS", tmp_path)
    monkeypatch.setattr(gpu_report, "run", lambda name, command: (0, "49 passed", 1.0))
    monkeypatch.setattr(gpu_report.bench, "main", bench_main)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        total_memory=memory_gib * 2 ** 30))
    monkeypatch.setattr(gpu_report.bench, "print_table", lambda header, rows: print(rows))
    with pytest.raises(SystemExit) as stop:
        gpu_report.main()
    return stop.value.code, capsys.readouterr().out, batches


def test_gpu_report_summarizes_the_bench_tables(monkeypatch, tmp_path, capsys):
    """The report's reading of bench.py's tables, which otherwise runs only on a GPU."""
    status, out, batches = run_gpu_report(monkeypatch, tmp_path, capsys)
    assert status == 0
    assert "fwd 3.68 -> 0.96 ms (3.82x); bwd 7.03 -> 1.50 ms (4.70x); memory saved -98.2%; peak fwd -67.4%; " \
           "peak fwd+bwd -10.6%" in out
    assert batches == ["32", "128", "32 compiled"]
    assert "SiT-XL/2 training step, bf16, batch 128: dar static c1 (dense)" in out
    assert "SiT-XL/2 training step, bf16, batch 32, eager and compiled: dar static c4 compiled', " in out
    assert "1.70x compiled residual's time (DAR 100 ms, residual 56 ms), peak memory 1.08x" in out
    assert "batch 32, eager and compiled: dar static c1" not in out  # the compiled table times static c4 alone
    assert "1.85x residual's time (DAR 208 ms, residual 113 ms), peak memory 1.08x" in out


@pytest.mark.parametrize("memory_gib,batches", [(79.2, ["32", "128"]), (39.4, ["32", "64"]), (23.6, ["32"])])
def test_gpu_report_sizes_the_second_step_batch_by_the_cards_memory(memory_gib, batches, monkeypatch, tmp_path,
                                                                   capsys):
    """An 80 GB card reports 79.2 GiB and a 40 GB one 39.4: each must get the batch meant for it."""
    compiled = ["32 compiled"] if memory_gib >= 75 else []  # four SiT-XL/2 models with AdamW: about 45 GiB
    _, out, asked = run_gpu_report(monkeypatch, tmp_path, capsys, memory_gib)
    assert asked == batches + compiled
    assert ("skipped: its four SiT-XL/2 models need about 45 GiB" in out) == (memory_gib < 75)


def test_gpu_report_skips_the_compiled_table_when_the_checks_before_were_slow(monkeypatch, tmp_path, capsys):
    """The compiled step table (minutes of compilation) starts only if the checks before left time for it."""
    clock = itertools.chain([0.0], itertools.repeat(400.0))  # the checks before the compiled table took 400 s
    monkeypatch.setattr(time, "time", lambda: next(clock))
    status, out, batches = run_gpu_report(monkeypatch, tmp_path, capsys)
    assert status == 0 and batches == ["32", "128"]
    assert "skipped: the checks before took" in out and "compiled: dar static c4" not in out


def test_gpu_report_goes_on_after_a_failed_bench(monkeypatch, tmp_path, capsys):
    """An out-of-memory step table becomes a FAILED row; the training check still runs; the exit status is 1."""
    status, out, _ = run_gpu_report(monkeypatch, tmp_path, capsys, failing=[("--dtype", "float32"), ("--step-batch", "128")])
    assert status == 1
    assert "DAR mix, float32" in out and "FAILED: see" in out and "DAR mix N 57, bfloat16" in out
    assert "SiT-XL/2 training step, bf16, batch 128" in out and "batch 32: dar static c1 (dense)" in out
    assert "50 training steps, --compile, bf16" in out and "eager and compiled: dar static c4 compiled" in out
    assert "CUDA out of memory" in (tmp_path / "step-batch128.log").read_text()


def test_step_profile_names_the_routers_costliest_ops(capsys):
    bench.main(["--op", "step", "--model", "SiT-T/8", "--step-batch", "2", "--repeats", "1", "--warmup", "0",
                "--device", "cpu", "--routers", "dar static c4", "--kernel", "cpu", "--profile", "40"])
    out = capsys.readouterr().out
    profiles = out.split("\nprofile, ")[1:]
    assert [profile.split(":")[0] for profile in profiles] == ["SiT-T/8, residual", "SiT-T/8, dar static c4"]
    host_ms = [float(profile.split("host ")[1].split(" ms")[0]) for profile in profiles]
    assert all(ms > 0 for ms in host_ms)
    assert "dar::mix" not in profiles[0] and "dar::mix" in profiles[1]  # the C++ kernel's op, in DAR's step only


def test_host_op_times_the_work_around_stubbed_kernels(capsys, monkeypatch):
    """--op host runs DAR's fused path with its kernel launches replaced (a kernel reached would raise here),
    reports the host work per mixing consumer, and puts the launches back."""
    import router_triton
    launches = router_triton.mix_forward, router_triton.mix_backward
    for kernel in ("_mix_forward_kernel", "_mix_backward_kernel"):
        monkeypatch.setattr(router_triton, kernel, None)  # `None[grid]` would fail
    tables = bench.main(["--op", "host", "--model", "SiT-S/8", "--routers", "dar static c4", "--repeats", "1",
                         "--warmup", "0"])
    out = capsys.readouterr().out
    assert "host work of a training step (width 64, the fused kernel's launches stubbed)" in out
    assert [row[0] for row in tables["SiT-S/8"]] == ["residual", "dar static c4"]
    line = next(line for line in out.splitlines() if line.startswith("dar static c4: "))
    float(line.split()[3])  # a number of microseconds (not asserted: timings are bench.py's, not the tests')
    assert "of host work per mixing consumer (2L = 24)" in line
    assert (router_triton.mix_forward, router_triton.mix_backward) == launches
