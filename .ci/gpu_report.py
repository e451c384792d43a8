"""The GPU checks behind `bash .ci/gpu`, summarized in one markdown table (details in results/gpu-ci/*.log).

1. the fused kernel's tests compiled: TRITON_INTERPRET=0 python -m pytest -q test_router_triton.py
2. bench.py --op router at the paper's sizes (d 1152, 256 tokens, batch 32, N 19 and 57, fp32 and bf16):
   the fused kernel against dar_mix (paper, N 57: forward 22.5 -> 1.96 ms, backward 115.8 -> 13.6 ms,
   activation memory -78.7% forward / -74.6% backward)
3. bench.py --op step: SiT-XL/2, batch 32 (and 128, or 64, where the GPU's memory allows), bf16, residual vs
   DAR static chunk 4 and dense
4. a 50-step training run with --compile --precision bf16 (SiT-B/2, DAR static chunk 4, bundled Fashion-MNIST)
5. bench.py --op step --compile: SiT-XL/2, batch 32, bf16, residual vs DAR static chunk 4, each eager and compiled
   (skipped on a GPU under 75 GiB, or when the checks before took over COMPILED_STEP_LATEST_S)
Each check runs even when an earlier one failed; the exit status is 1 if any failed.
"""
import contextlib
import io
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import bench

LOGS = Path("results/gpu-ci")
COMPILED_STEP_LATEST_S = 300  # the latest start of the compiled step table, in seconds after the first check


def run(name, command):
    """Run a command, log its output; (exit status, last line, seconds)."""
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    (LOGS / f"{name}.log").write_text(result.stdout + result.stderr)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return result.returncode, (lines[-1] if lines else ""), time.time() - start


def in_process(name, argv):
    """bench.main(argv) with its printed tables logged; what it returns, or None if it failed (the error is
    logged, and the other checks still run: an out-of-memory step table must not lose the training check)."""
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            result = bench.main(argv)
    except Exception:
        output.write(traceback.format_exc())
        result = None
    (LOGS / f"{name}.log").write_text(output.getvalue())
    return result


def command_cell(argv):
    return f"`python bench.py {' '.join(repr(a) if ' ' in a else a for a in argv)}`"


def main():
    if not torch.cuda.is_available():  # after the imports, so that the skip test also checks that they work
        print("SKIPPED: bash .ci/gpu needs a CUDA GPU and this machine has none; nothing was run")
        sys.exit(0)
    LOGS.mkdir(parents=True, exist_ok=True)
    rows, failed, start = [], False, time.time()

    status, last, seconds = run("kernel-tests", [sys.executable, "-m", "pytest", "-q", "test_router_triton.py"])
    failed |= status != 0
    rows.append(["kernel tests, compiled", "`TRITON_INTERPRET=0 python -m pytest -q test_router_triton.py`",
                 f"{'ok' if status == 0 else 'FAILED'}: {last} ({seconds:.0f} s)"])

    for dtype in ("float32", "bfloat16"):
        argv = ["--op", "router", "--device", "cuda", "--batch", "32", "--tokens", "256", "--dim", "1152",
                "--sources", "19,57", "--dtype", dtype, "--impls", "torch,triton"]
        table = in_process(f"router-{dtype}", argv)
        if table is None:
            failed = True
            rows.append([f"DAR mix, {dtype}", command_cell(argv), f"FAILED: see {LOGS}/router-{dtype}.log"])
            continue
        for n in ("19", "57"):
            plain, fused = (next(row for row in table if row[:2] == [impl, n]) for impl in ("torch", "triton"))
            times = "; ".join(f"{what} {plain[col].split()[0]} -> {fused[col].split()[0]} ms "
                              f"{fused[col].split()[1]}" for what, col in (("fwd", 3), ("bwd", 4)))
            memory = "; ".join(f"{what} {fused[col].split()[1].strip('()')}"
                               for what, col in (("saved", 6), ("peak fwd", 7), ("peak fwd+bwd", 8)))
            rows.append([f"DAR mix N {n}, {dtype}: dar_mix -> kernel", command_cell(argv),
                         f"{times}; memory {memory}"])

    # Batch 32 is SiT's per-GPU batch on 8 GPUs, where a step of SiT-XL/2 is short enough for the host's per-op
    # work to show (docs/kernel.md); a larger batch, where the GPU's memory allows, shows how much of DAR's cost
    # that is.
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    batches = ["32"] + (["128"] if memory_gib >= 75 else ["64"] if memory_gib >= 38 else [])  # 80 and 40 GB cards
    for batch in batches:
        failed |= not step_table(rows, f"step-batch{batch}", f"batch {batch}", [
            "--step-batch", batch, "--routers", "dar static c4,dar static c1",
            "--profile", "15"])  # the log has each router's host and device time and costliest ops

    command = [sys.executable, "train.py", "--model", "SiT-B/2", "--router", "dar", "--chunk", "4", "--max-steps",
               "50", "--compile", "--precision", "bf16", "--sample-grid", "0", "--results-dir", str(LOGS / "train"),
               "--run-name", f"smoke-{int(time.time())}"]
    status, last, seconds = run("train", command)
    failed |= status != 0
    rows.append(["50 training steps, --compile, bf16", f"`python {' '.join(command[1:])}`",
                 f"{'ok' if status == 0 else 'FAILED'}: {last} ({seconds:.0f} s)"])

    # Last, as the longest (two SiT-XL/2 compilations): whether torch.compile removes the host work per consumer
    # that an eager DAR step at batch 32 waits for (each model eager and compiled, in one run). Skipped where its
    # four SiT-XL/2 models with their AdamW state (about 11 GB each) would not fit, and when the checks before
    # took so long that it could push the whole past the 8 minutes it aims at.
    spent = time.time() - start
    skipped = (f"the checks before took {spent:.0f} s (> {COMPILED_STEP_LATEST_S} s)" if spent > COMPILED_STEP_LATEST_S
               else f"its four SiT-XL/2 models need about 45 GiB, the GPU has {memory_gib:.0f}" if memory_gib < 75
               else None)
    if skipped:
        rows.append(["SiT-XL/2 training step, bf16, batch 32, eager and compiled",
                     "`python bench.py --op step ... --compile`", f"skipped: {skipped}"])
    else:
        failed |= not step_table(rows, "step-compiled", "batch 32, eager and compiled", [
            "--step-batch", "32", "--routers", "dar static c4", "--compile"])

    bench.print_table(["check", "command", "result"], rows)
    sys.exit(1 if failed else 0)


def step_table(rows, log_name, setting, argv):
    """bench.py --op step for SiT-XL/2 in bf16 with `argv`; one row per DAR router into `rows` (or a FAILED row).
    Whether it ran."""
    argv = ["--op", "step", "--device", "cuda", "--model", "SiT-XL/2", "--image-size", "32", "--channels", "4",
            "--precision", "bf16", *argv]
    tables = in_process(log_name, argv)
    if tables is None:
        rows.append([f"SiT-XL/2 training step, bf16, {setting}", command_cell(argv), f"FAILED: see {LOGS}/{log_name}.log"])
        return False
    for name, table in tables.items():
        residuals = {row[0]: row for row in table if row[0].startswith("residual")}  # eager, and compiled
        for row in table:
            if row[0] in residuals:
                continue
            compiled = row[0].endswith(" compiled")
            residual = residuals["residual compiled" if compiled else "residual"]
            router = row[0] + (" (dense)" if row[0].endswith(" c1") else "")
            rows.append([f"{name} training step, bf16, {setting}: {router}", command_cell(argv),
                         f"{row[5]} {'compiled ' if compiled else ''}residual's time (DAR {row[4]} ms, residual "
                         f"{residual[4]} ms), peak memory {row[7]}"])
    return True


if __name__ == "__main__":
    main()
