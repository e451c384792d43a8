"""The router study of docs/results-cpu.md: does DAR beat the residual stream at our scale?

    python study.py                  # train every run, score, diagnose, report (1 h 40 min on 2 idle cores)
    python study.py --report-only    # only the tables and figures, from what --results-dir holds

Every run trains SiT-T/4 (12 blocks, width 128, 64 tokens) on Fashion-MNIST with train.py and the same
seed, data order, batch, steps and optimizer; only the router differs (and the seed, in the runs that
measure the noise). The plan, in the order the runs start, two at a time with one thread each:
  residual, dar static / timestep / dynamic at chunk 4, unet, two more residual seeds, the static query
  without the 1/sqrt(d) logit scale (the AttnRes ablation); then, once the three chunk-4 queries have
  finished, the best of them (lowest final EMA validation loss) at chunk 1 and 8 and with two more seeds.
Each run is then scored (sample.py, then fid.py against the training set) and diagnosed (diagnose.py).
Finished parts are skipped and an unfinished training resumes from its last checkpoint, so the study
can be stopped and restarted at any time. Job output goes to <results-dir>/<job>.log.

The report (--out-dir, default docs/study): results.md (every table), val_loss.png (the curves),
samples/<run>.png (one grid per router), the diagnose.py figures of residual against the best DAR, and
runs/<run>/ (each run's log.jsonl and fid.json, the data behind every number).
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


from checkpoint import in_range, latest_checkpoint, load_checkpoint, read_log, validation_curve
from data import format_duration

HERE = Path(__file__).resolve().parent  # the scripts run from here
MODEL = "SiT-T/4"
TRAINING = ["--model", MODEL, "--global-batch-size", "32", "--log-every", "50"]
SAMPLING = ["--sampler", "heun", "--steps", "25", "--batch-size", "100", "--device", "cpu"]
QUERIES = ("static", "timestep", "dynamic")
NOISE_SEEDS = (0, 1, 2)
ROUTING_T = (0.1, 0.9)  # low t is mostly noise, high t mostly data (method.md section 5)
ROUTING_IMAGES = 128
SETTINGS = argparse.Namespace(max_steps=800, fid_samples=500, fid_reference=1000)  # main() sets the flags


@dataclass
class Run:
    name: str
    label: str
    flags: list
    seed: int = 0
    router: str = "residual"


def dar_run(query, chunk, seed=0, logit_scale=None):
    name = f"dar-{query}-c{chunk}" + (f"-logit-{logit_scale}" if logit_scale else "") + f"-s{seed}"
    label = f"DAR {query} c{chunk}" + (" (no 1/sqrt(d))" if logit_scale else "")
    flags = ["--router", "dar", "--query", query, "--chunk", str(chunk)]
    flags += ["--logit-scale", logit_scale] if logit_scale else []
    return Run(name, label, flags, seed, "dar")


def planned_runs(results):
    """Every run of the study that can be named now: the ones built on the best query once it is known."""
    runs = [Run("residual-s0", "residual", ["--router", "residual"])]
    runs += [dar_run(query, 4) for query in QUERIES]
    runs += [Run("unet-s0", "U-Net skips", ["--router", "unet"], router="unet")]
    runs += [Run(f"residual-s{seed}", "residual", ["--router", "residual"], seed) for seed in NOISE_SEEDS[1:]]
    runs += [dar_run("static", 4, logit_scale="one")]
    best = best_query(results)
    if best is not None:
        runs += [dar_run(best, 1), dar_run(best, 8)]
        runs += [dar_run(best, 4, seed) for seed in NOISE_SEEDS[1:]]
    return runs


def final_eval(results, run_name):
    """The last validation record of a finished run, or None."""
    records = [r for r in read_log(results / run_name) if "val_loss" in r]
    return records[-1] if records and records[-1]["step"] == SETTINGS.max_steps else None


def finished(results, run_name):
    return final_eval(results, run_name) is not None and (results / run_name / "samples.png").exists()


def best_query(results):
    if not all(finished(results, f"dar-{q}-c4-s0") for q in QUERIES):
        return None
    finals = {q: final_eval(results, f"dar-{q}-c4-s0") for q in QUERIES}
    return min(QUERIES, key=lambda q: finals[q]["val_loss_ema"])


#################################################################################
#                          Jobs: two lanes, one thread each                      #
#################################################################################

@dataclass
class Job:
    name: str
    command: list
    needs: list
    done: bool


def planned_jobs(results):
    jobs = []
    runs = planned_runs(results)
    for run in runs:
        trained = finished(results, run.name)
        resume = ["--resume", "auto"] if latest_checkpoint(results / run.name) else []
        schedule = ["--max-steps", str(SETTINGS.max_steps), "--eval-every", str(SETTINGS.max_steps // 8),
                    "--ckpt-every", str(SETTINGS.max_steps // 2)]
        jobs.append(Job(f"train-{run.name}", [sys.executable, "train.py", *TRAINING, *schedule, *run.flags, "--seed",
                                              str(run.seed), "--run-name", run.name, "--results-dir",
                                              str(results), *resume], [], trained))
        first_score = "score-residual-s0"  # computes and caches the reference statistics for all the others
        jobs.append(Job(f"score-{run.name}", [sys.executable, __file__, *settings_flags(), "--score",
                                              str(results / run.name)],
                        [f"train-{run.name}"] + ([first_score] if run.name != "residual-s0" else []),
                        (results / run.name / "fid.json").exists()))
    best = best_query(results)
    if best is not None:
        pair = [results / "residual-s0", results / f"dar-{best}-c4-s0"]
        jobs.append(Job("diagnose", [sys.executable, "diagnose.py", *[a for p in pair for a in ("--ckpt", str(
            latest_checkpoint(p) or p))], "--out-dir", str(results / "diagnose")],
            ["train-residual-s0", f"train-dar-{best}-c4-s0"], (results / "diagnose" / "diagnose.json").exists()))
        dar_runs = [r.name for r in runs if r.router == "dar" and r.seed == 0]
        jobs.append(Job("routing", [sys.executable, "diagnose.py", *[a for r in dar_runs for a in (
            "--ckpt", str(latest_checkpoint(results / r) or results / r))], "--t-grid",
            ",".join(map(str, ROUTING_T)), "--num-images", str(ROUTING_IMAGES), "--out-dir", str(results / "routing")],
            [f"train-{r}" for r in dar_runs], (results / "routing" / "diagnose.json").exists()))
    return jobs


def run_jobs(results, lanes=2):
    """Start ready jobs while a lane is free; re-plan as runs finish (the best query appears mid-way)."""
    running, failed, started_at = {}, set(), time.time()
    while True:
        jobs = {job.name: job for job in planned_jobs(results)}
        for name, (process, start, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                del running[name]
                took = format_duration(time.time() - start)
                if process.returncode:
                    failed.add(name)
                    print(f"FAILED {name} after {took} (exit {process.returncode}): see {results / name}.log")
                else:
                    print(f"finished {name} in {took}")
                jobs = {job.name: job for job in planned_jobs(results)}
        waiting = [j for j in jobs.values() if not j.done and j.name not in running and j.name not in failed]
        blocked = lambda job: any(n in failed or not jobs[n].done for n in job.needs if n in jobs)  # noqa: E731
        for job in waiting:
            if len(running) < lanes and not blocked(job):
                log = open(results / f"{job.name}.log", "a")
                environment = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
                process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                           cwd=HERE)
                running[job.name] = (process, time.time(), log)
                print(f"started {job.name} ({len([j for j in jobs.values() if j.done])}/{len(jobs)} jobs done, "
                      f"{format_duration(time.time() - started_at)} so far)", flush=True)
        if not running:
            stuck = [j.name for j in waiting]
            if stuck:
                print(f"not run, for a failed dependency: {', '.join(stuck)}")
            return not failed and not stuck
        time.sleep(5)


def score(run_dir):
    """FID (and precision / recall) of the run's EMA model: --fid-samples samples (sample.py) against
    --fid-reference training images (fid.py), written to <run>/fid.json."""
    run_dir = Path(run_dir)
    npz = run_dir / "samples" / f"fid-n{SETTINGS.fid_samples}.npz"
    if not npz.exists():
        subprocess.run([sys.executable, "sample.py", "--ckpt", str(latest_checkpoint(run_dir)), *SAMPLING,
                        "--num-samples", str(SETTINGS.fid_samples), "--out", str(npz)], check=True, cwd=HERE)
    subprocess.run([sys.executable, "fid.py", str(npz), "--ref-samples", str(SETTINGS.fid_reference), "--device",
                    "cpu", "--json", str(run_dir / "fid.json")], check=True, cwd=HERE)


#################################################################################
#                                    Report                                      #
#################################################################################

def mean_spread(values, digits=4):
    """'m' for one value, 'm +- s (n=k)' with the sample standard deviation for several."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f} (n={len(values)})"


def groups(results):
    """Finished runs grouped by configuration: label -> list of run names (seeds)."""
    grouped = {}
    for run in planned_runs(results):
        if finished(results, run.name):
            grouped.setdefault(run.label, []).append(run.name)
    return grouped


def steps_to_reach(curve, target):
    """The first evaluated step whose loss is at or below target, linearly interpolated between evaluations."""
    previous = None
    for step, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return step
            (s0, l0) = previous
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        previous = (step, loss)
    return None


def quality_tables(results, grouped):
    lines = [f"| router | runs | val loss (EMA) | val loss (raw) | FID-{SETTINGS.fid_samples} | precision | recall |",
             "|---|---|---|---|---|---|---|"]
    best_label = f"DAR {best_query(results)} c4"
    unpicked = {f"{best_label}, seeds 1-2 only (seed 0 picked it)": grouped[best_label][1:]} if len(
        grouped.get(best_label, [])) > 1 else {}
    for label, runs in {**grouped, **unpicked}.items():
        finals = [final_eval(results, r) for r in runs]
        fids = [json.loads((results / r / "fid.json").read_text()) for r in runs if (results / r / "fid.json").exists()]
        cell = lambda key, digits: mean_spread([f[key] for f in fids], digits) if fids else "-"  # noqa: E731
        lines.append(f"| {label} | {len(runs)} | {mean_spread([f['val_loss_ema'] for f in finals])} | "
                     f"{mean_spread([f['val_loss'] for f in finals])} | {cell('fid', 1)} | {cell('precision', 3)} | "
                     f"{cell('recall', 3)} |")
    steps = [s for s, _ in validation_curve(results / grouped["residual"][0])]
    curve_lines = ["| router | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for label, runs in grouped.items():
        curves = [dict(validation_curve(results / r)) for r in runs]
        curve_lines.append(f"| {label} | " + " | ".join(f"{statistics.mean(c[s] for c in curves):.4f}"
                                                       for s in steps) + " |")
    target = statistics.mean(final_eval(results, r)["val_loss_ema"] for r in grouped["residual"])
    match_lines = [f"Residual's final EMA validation loss (mean of {len(grouped['residual'])} seeds): {target:.4f}.",
                   "", f"| router | step reaching it (mean curve) | speed-up vs residual's {SETTINGS.max_steps} |",
                   "|---|---|---|"]
    for label, runs in grouped.items():
        if label == "residual":
            continue
        curves = [dict(validation_curve(results / r)) for r in runs]
        mean_curve = [(s, statistics.mean(c[s] for c in curves)) for s in steps]
        reached = steps_to_reach(mean_curve, target)
        match_lines.append(f"| {label} | {f'{reached:.0f}' if reached else 'not reached'} | "
                           f"{f'{SETTINGS.max_steps / reached:.2f}x' if reached else '-'} |")
    return lines, curve_lines, match_lines


def routing_table(results):
    """How far each DAR run's routing moved from uniform: query norms and alpha at low and high t."""
    report_path = results / "routing" / "diagnose.json"
    if not report_path.exists():
        return []
    lines = [f"| run | mean query norm | alpha entropy / log N (t={ROUTING_T[0]}, {ROUTING_T[1]}) | "
             f"alpha on v0 (t={ROUTING_T[0]}, {ROUTING_T[1]}) | alpha on the newest source | largest alpha |",
             "|---|---|---|---|---|---|"]
    for report in json.loads(report_path.read_text())["reports"]:
        state = load_checkpoint(report["checkpoint"])["ema"]
        norms = [v.norm().item() for k, v in state.items() if k.startswith("router.mixers.")
                 and (k.endswith(".query") or k.endswith(".query_proj.weight"))]
        entropy, first, newest, largest = [], [], [], []
        for ti in range(len(ROUTING_T)):
            per_consumer = [c["alpha"][ti] for c in report["consumers"].values() if len(c["alpha"][ti]) > 1]
            entropy.append(statistics.mean(-sum(a * math.log(a) for a in alpha if a > 0) / math.log(len(alpha))
                                           for alpha in per_consumer))
            first.append(statistics.mean(alpha[0] * len(alpha) for alpha in per_consumer))
            newest.append(statistics.mean(alpha[-1] * len(alpha) for alpha in per_consumer))
            largest.append(max(max(alpha) for alpha in per_consumer))
        pair = lambda values, fmt: ", ".join(format(v, fmt) for v in values)  # noqa: E731
        lines.append(f"| {report['label']} | {statistics.mean(norms):.3f} | {pair(entropy, '.4f')} | "
                     f"{pair(first, '.3f')} x uniform | {pair(newest, '.3f')} x uniform | {pair(largest, '.3f')} |")
    return lines


def report(results, out_dir):
    grouped = groups(results)
    if "residual" not in grouped:
        raise ValueError(f"{results}: no finished residual run yet, nothing to compare against")
    out_dir.mkdir(parents=True, exist_ok=True)
    quality, curve, match = quality_tables(results, grouped)
    routing = routing_table(results)
    subprocess.run([sys.executable, "diagnose.py", "--out-dir", str(out_dir), "--curves-title",
                    f"{MODEL} on Fashion-MNIST, fixed validation batch (fixed t grid and noise)", "--curves",
                    *[f"{label}={results / run}" for label, runs in grouped.items() for run in runs]],
                   check=True, cwd=HERE)
    (out_dir / "samples").mkdir(exist_ok=True)
    for runs in grouped.values():
        shutil.copy(results / runs[0] / "samples.png", out_dir / "samples" / f"{runs[0]}.png")
        for run in runs:  # the logs behind every number, small enough to keep with the report
            (out_dir / "runs" / run).mkdir(parents=True, exist_ok=True)
            for name in ("log.jsonl", "fid.json"):
                if (results / run / name).exists():
                    shutil.copy(results / run / name, out_dir / "runs" / run / name)
    for figure in ("symptoms.png", "symptoms_by_t.png"):
        if (results / "diagnose" / figure).exists():
            shutil.copy(results / "diagnose" / figure, out_dir / figure)
    for figure in (results / "diagnose").glob("routing_*.png"):
        shutil.copy(figure, out_dir / figure.name)
    best = best_query(results)
    text = [f"Best chunk-4 query (lowest final EMA validation loss, seed 0): {best}.", "",
            f"Final numbers after {SETTINGS.max_steps} steps:", "", *quality, "",
            "EMA validation loss during training (mean over seeds):", "", *curve, "",
            "Iterations to match:", "", *match, ""]
    if routing:
        text += [f"How far the routing moved (EMA weights, {ROUTING_IMAGES} held-out images):", "", *routing, ""]
    (out_dir / "results.md").write_text("\n".join(text))
    print("\n".join(text))
    print(f"wrote {out_dir}/results.md, val_loss.png, samples/, and the diagnose figures")


def settings_flags():
    return ["--max-steps", str(SETTINGS.max_steps), "--fid-samples", str(SETTINGS.fid_samples),
            "--fid-reference", str(SETTINGS.fid_reference)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results-dir", default="results/study", help="(default %(default)s)")
    parser.add_argument("--out-dir", default="docs/study", help="the report (default %(default)s)")
    parser.add_argument("--report-only", action="store_true", help="skip the runs, only write the report")
    parser.add_argument("--max-steps", type=in_range(int, 8), default=SETTINGS.max_steps,
                        help="training steps of every run, batch 32 (default %(default)s)")
    parser.add_argument("--fid-samples", type=in_range(int, 2), default=SETTINGS.fid_samples, help="(default %(default)s)")
    parser.add_argument("--fid-reference", type=in_range(int, 2), default=SETTINGS.fid_reference,
                        help="training images in the FID reference (default %(default)s)")
    parser.add_argument("--score", metavar="RUN_DIR", help=argparse.SUPPRESS)  # a job run_jobs starts
    args = parser.parse_args(argv)
    SETTINGS.max_steps, SETTINGS.fid_samples, SETTINGS.fid_reference = args.max_steps, args.fid_samples, args.fid_reference
    if args.score:
        return score(args.score)
    results = Path(args.results_dir).resolve()  # the jobs run in this file's directory
    results.mkdir(parents=True, exist_ok=True)
    if not args.report_only and not run_jobs(results):
        print("some jobs failed: the report covers the runs that finished")
    report(results, Path(args.out_dir))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:
        sys.exit(f"error: {err}")
