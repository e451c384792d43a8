"""The router studies: does DAR beat the residual stream at our scale, and does that change with depth and training?

    python study.py                               # the router study of docs/results-cpu.md (1 h 40 min on 2 idle cores)
    python study.py --plan depth                  # the deep study of docs/study-deep.md, part 1: symptoms against depth
    python study.py --plan lr                     # part 2: the learning-rate sweep
    python study.py --plan long                   # part 3: the long runs, at each router's best lr (runs part 2 first)
    python study.py --plan deep                   # parts 1, 2 and 3 in that order
    python study.py --plan deep --report-only     # only the tables and figures, from the logs in --out-dir

Every run trains on Fashion-MNIST with train.py and the same seed, data order and optimizer; within a
comparison only the router differs (and the seed, in the runs that measure the noise). Jobs run two at a time
with one thread each. Finished parts are skipped and an unfinished training resumes from its last
checkpoint, so a study can be stopped and restarted at any time. Job output goes to <results-dir>/<job>.log.

--plan router (results/study, report in docs/study): SiT-T/4 (12 blocks, width 128), 800 steps at batch 32,
lr 1e-3. The plan, in the order the runs start: residual, dar static / timestep / dynamic at chunk 4, unet,
two more residual seeds, the static query without the 1/sqrt(d) logit scale (the AttnRes ablation); then,
once the three chunk-4 queries have finished, the best of them (lowest final EMA validation loss) at chunk 1
and 8 and with two more seeds. Each run is scored (sample.py, then fid.py against the training set) and
diagnosed (diagnose.py). The report: results.md (every table), val_loss.png, samples/<run>.png, the
diagnose.py figures of residual against the best DAR, and runs/<run>/ (each run's log.jsonl and fid.json).

--plan depth / lr / long / deep (results/study-deep, report in docs/study-deep): the SiT-N<depth>/4 series
(width 64, 4 heads, 64 tokens), batch 16, in three parts:
  depth  residual at 6, 12, 24 and 48 blocks, then DAR static and timestep chunk 4 at 48; 2,000 steps, lr 1e-3;
         diagnose.py on the four residual depths side by side, and on the three routers at 48 blocks.
  lr     residual and DAR static chunk 4 at 24 blocks, lr 3e-4, 1e-3, 3e-3 and 1e-2, 1,000 steps, seed 0.
  long   residual, DAR static c4 and DAR timestep c4 at 24 blocks, seeds 0-2, 4,000 steps, each at its router's
         best lr of the sweep (lowest final EMA validation loss; the timestep query takes static's); FID of
         1,000 samples each; diagnose.py on seed 0 of each, and the routing of every DAR run at t = 0.1, 0.9.
As each job finishes, what the report needs is kept in --out-dir at once (runs/<run>/log.jsonl, fid.json,
samples.png; <diagnosis>/diagnose.json trimmed to what the figures draw; routing-long/routing.json), so
that it can be committed, and the report (results.md and every figure) is rebuilt from those files alone.
Cost, measured on the 2-core machine with one thread per job (docs/study-deep.md, Cost): depth about 100
minutes of one core, lr 71, long about 300; 7.8 CPU-hours in all, about 4 h on two cores.
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
from dataclasses import dataclass, replace
from pathlib import Path


from checkpoint import in_range, latest_checkpoint, load_checkpoint, validation_curve
from data import format_duration
from plot import draw_curves, draw_figures
from study_tables import (cost_table, curve_table, difference_table, final_eval, final_table, finished,
                          groups, match_table)

HERE = Path(__file__).resolve().parent  # the scripts run from here
MODEL = "SiT-T/4"
SAMPLING = ["--sampler", "heun", "--steps", "25", "--batch-size", "100", "--device", "cpu"]
QUERIES = ("static", "timestep", "dynamic")
NOISE_SEEDS = (0, 1, 2)
ROUTING_T = (0.1, 0.9)  # low t is mostly noise, high t mostly data (method.md section 5)
ROUTING_IMAGES = 128
SETTINGS = argparse.Namespace(max_steps=800, fid_samples=500, fid_reference=1000)  # main() sets the flags
# The deep study (docs/study-deep.md). depth_lr is the router study's lr, train.py's default for the CPU configs.
DEEP = argparse.Namespace(batch=16, depth_steps=2000, lr_steps=1000, long_steps=4000, lrs=(3e-4, 1e-3, 3e-3, 1e-2),
                          depth_lr=1e-3, long_evals=16, images=128)
DEPTHS = (6, 12, 24, 48)
LONG_MODEL = "SiT-N24/4"
PARTS = {"depth": ("depth",), "lr": ("lr",), "long": ("lr", "long"), "deep": ("depth", "lr", "long")}
SWEPT = ("residual", "static")  # the routers the lr sweep trains; the timestep query uses static's lr


@dataclass
class Run:
    name: str
    label: str
    flags: list
    seed: int = 0
    router: str = "residual"
    model: str = MODEL
    batch: int = 32
    steps: int = None  # the router study's are set when it is planned: --max-steps
    lr: float = None  # None: train.py's default for the model
    evals: int = 8  # validation losses, every steps / evals
    grid: bool = True  # train.py's samples.png at the end; a finished run has it


def dar_run(query, chunk, seed=0, logit_scale=None):
    name = f"dar-{query}-c{chunk}" + (f"-logit-{logit_scale}" if logit_scale else "") + f"-s{seed}"
    label = f"DAR {query} c{chunk}" + (" (no 1/sqrt(d))" if logit_scale else "")
    flags = ["--router", "dar", "--query", query, "--chunk", str(chunk)]
    flags += ["--logit-scale", logit_scale] if logit_scale else []
    return Run(name, label, flags, seed, "dar")


def planned_runs(root, plan="router", given_up=()):
    """Every run of the plan that can be named now, judged by the finished runs under root (results or the
    report's runs/): the router study's best-query runs, the deep study's long runs once their lr is known.
    given_up: runs whose training failed in this session, left out of the lr pick."""
    if plan == "router":
        return [replace(run, steps=SETTINGS.max_steps) for run in router_runs(root)]
    parts = PARTS[plan]
    runs = depth_runs() if "depth" in parts else []
    runs += sweep_runs() if "lr" in parts else []
    return runs + (long_runs(root, given_up) if "long" in parts else [])


def router_runs(results):
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


def best_query(results):
    runs = {q: replace(dar_run(q, 4), steps=SETTINGS.max_steps) for q in QUERIES}
    if not all(finished(results, run) for run in runs.values()):
        return None
    return min(QUERIES, key=lambda q: final_eval(results, runs[q].name, runs[q].steps)["val_loss_ema"])


#################################################################################
#                The deep study: depth, learning rate, long training             #
#################################################################################

def deep_run(part, router, tag, label, seed=0, **training):
    """One router of the deep study (residual, or DAR static / timestep at chunk 4) in a part of it:
    named <part>-<router>[<tag>]-s<seed>, at batch DEEP.batch."""
    base = Run("residual-s0", "residual", ["--router", "residual"]) if router == "residual" else dar_run(router, 4)
    return replace(base, name=f"{part}-{base.name.removesuffix('-s0')}{tag}-s{seed}", label=label, seed=seed,
                   batch=DEEP.batch, **training)


def depth_runs():
    """Part 1: residual at every depth, then static and timestep DAR at the deepest; the same steps and lr."""
    runs = [deep_run("depth", "residual", f"-d{depth}", f"residual d{depth}", model=f"SiT-N{depth}/4")
            for depth in DEPTHS]
    runs += [deep_run("depth", query, f"-d{DEPTHS[-1]}", f"DAR {query} c4 d{DEPTHS[-1]}", model=f"SiT-N{DEPTHS[-1]}/4")
             for query in ("static", "timestep")]
    return [replace(run, steps=DEEP.depth_steps, lr=DEEP.depth_lr, grid=False) for run in runs]


def router_label(router):
    return "residual" if router == "residual" else f"DAR {router} c4"


def lr_runs(router):
    """Part 2: one router at every lr of the sweep, at the long runs' depth."""
    return [deep_run("lr", router, f"-lr{lr:g}", f"{router_label(router)} lr {lr:g}", model=LONG_MODEL,
                     steps=DEEP.lr_steps, lr=lr, grid=False) for lr in DEEP.lrs]


def sweep_runs():
    """Part 2: every run of the lr sweep, router by router."""
    return [run for router in SWEPT for run in lr_runs(router)]


def best_lr(root, router, given_up=()):
    """The lr of the router's sweep run with the lowest final EMA validation loss, once every run of the
    sweep has finished or is given up; None before, or when none finished."""
    runs = lr_runs(router)
    if any(not finished(root, run) and run.name not in given_up for run in runs):
        return None
    done = [run for run in runs if finished(root, run)]
    return min(done, key=lambda run: final_eval(root, run.name, run.steps)["val_loss_ema"]).lr if done else None


def long_runs(root, given_up=()):
    """Part 3: residual, DAR static and timestep at chunk 4, three seeds (seed-major, so that a cut session
    leaves whole seeds), each at its router's best lr; none before the sweep has picked both."""
    picks = {router: best_lr(root, router, given_up) for router in SWEPT}
    if None in picks.values():
        return []
    lr = lambda router: picks["residual" if router == "residual" else "static"]  # noqa: E731
    return [deep_run("long", router, f"-lr{lr(router):g}", router_label(router), seed, model=LONG_MODEL,
                     steps=DEEP.long_steps, lr=lr(router), evals=DEEP.long_evals, grid=seed == NOISE_SEEDS[0])
            for seed in NOISE_SEEDS for router in ("residual", "static", "timestep")]


def deep_diagnoses(runs):
    """The deep study's diagnoses of the planned runs: name -> (part, the runs it compares, diagnose.py flags)."""
    depth = [run for run in runs if run.name.startswith("depth-")]
    long = [run for run in runs if run.name.startswith("long-")]
    chosen = {
        "diagnose-depth": ("depth", [run for run in depth if run.router == "residual"], []),
        "diagnose-depth-dar": ("depth", [run for run in depth if run.model == f"SiT-N{DEPTHS[-1]}/4"], []),
        "diagnose-long": ("long", [run for run in long if run.seed == NOISE_SEEDS[0]], []),
        "routing-long": ("long", [run for run in long if run.router == "dar"],
                         ["--t-grid", ",".join(map(str, ROUTING_T))]),
    }
    return {name: diagnosis for name, diagnosis in chosen.items() if diagnosis[1]}


#################################################################################
#                          Jobs: two lanes, one thread each                      #
#################################################################################

@dataclass
class Job:
    name: str
    command: list
    needs: list
    done: bool
    keep: object = None  # deep study: copies what the report needs into --out-dir, once the job is done


def train_job(results, run, keep=None):
    resume = ["--resume", "auto"] if latest_checkpoint(results / run.name) else []
    training = ["--model", run.model, "--global-batch-size", str(run.batch), "--log-every", "50",
                "--max-steps", str(run.steps), "--eval-every", str(run.steps // run.evals),
                "--ckpt-every", str(run.steps // 2)]
    training += (["--lr", f"{run.lr:g}"] if run.lr else []) + ([] if run.grid else ["--sample-grid", "0"])
    return Job(f"train-{run.name}", [sys.executable, "train.py", *training, *run.flags, "--seed", str(run.seed),
                                     "--run-name", run.name, "--results-dir", str(results), *resume], [],
               finished(results, run), keep)


def score_job(results, run, first, keep=None):
    """FID of a run; the first one computes and caches the reference statistics for all the others."""
    command = [sys.executable, __file__, "--fid-samples", str(SETTINGS.fid_samples), "--fid-reference",
               str(SETTINGS.fid_reference), "--score", str(results / run.name)]
    return Job(f"score-{run.name}", command,
               [f"train-{run.name}"] + ([f"score-{first}"] if run.name != first else []),
               (results / run.name / "fid.json").exists(), keep)


def diagnose_job(results, name, runs, flags, keep=None):
    checkpoints = [a for run in runs
                   for a in ("--ckpt", str(latest_checkpoint(results / run.name) or results / run.name))]
    return Job(name, [sys.executable, "diagnose.py", *checkpoints, *flags, "--out-dir", str(results / name)],
               [f"train-{run.name}" for run in runs], (results / name / "diagnose.json").exists(), keep)


def planned_jobs(results, plan="router", out_dir=None, given_up=()):
    """The jobs of the plan that can be named now, in the order they start."""
    runs = planned_runs(results, plan, given_up)
    if plan != "router":
        return deep_jobs(results, runs, out_dir)
    jobs = []
    for run in runs:
        jobs += [train_job(results, run), score_job(results, run, "residual-s0")]
    best = best_query(results)
    if best is not None:
        named = {run.name: run for run in runs}
        jobs.append(diagnose_job(results, "diagnose", [named["residual-s0"], named[f"dar-{best}-c4-s0"]], []))
        jobs.append(diagnose_job(results, "routing", [run for run in runs if run.router == "dar" and run.seed == 0],
                                 ["--t-grid", ",".join(map(str, ROUTING_T)), "--num-images", str(ROUTING_IMAGES)]))
    return jobs


def deep_jobs(results, runs, out_dir):
    """Each part's trainings, then its scores and diagnoses; every job keeps its output in out_dir."""
    diagnoses = deep_diagnoses(runs)
    jobs = []
    for part in ("depth", "lr", "long"):
        for run in (run for run in runs if run.name.startswith(f"{part}-")):
            jobs.append(train_job(results, run, lambda run=run: keep_run(results, out_dir, run)))
            if part == "long":
                first = next(r.name for r in runs if r.name.startswith("long-residual-"))
                jobs.append(score_job(results, run, first, lambda run=run: keep_run(results, out_dir, run)))
        for name, (diagnosis_part, compared, flags) in diagnoses.items():
            if diagnosis_part == part:
                jobs.append(diagnose_job(results, name, compared, [*flags, "--num-images", str(DEEP.images)],
                                         lambda name=name: keep_diagnosis(results, out_dir, name)))
    return jobs


def run_jobs(results, plan_jobs, lanes=2):
    """Start ready jobs while a lane is free; re-plan as jobs finish (picks appear mid-way). plan_jobs(failed)
    names the jobs; each job's keep runs once it is done, and at the start for what an earlier session left."""
    running, failed, started_at = {}, set(), time.time()
    for job in plan_jobs(failed):
        if job.done and job.keep:
            job.keep()
    while True:
        jobs = {job.name: job for job in plan_jobs(failed)}
        for name, (process, start, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                del running[name]
                took = format_duration(time.time() - start)
                if process.returncode:
                    failed.add(name)
                    print(f"FAILED {name} after {took} (exit {process.returncode}): see {results / name}.log")
                jobs = {job.name: job for job in plan_jobs(failed)}
                if not process.returncode:
                    print(f"finished {name} in {took}")
                    if jobs[name].keep:
                        jobs[name].keep()
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
#                 Keeping what the deep study's report reads                     #
#################################################################################

def keep_run(results, out_dir, run):
    """runs/<run>/: log.jsonl, and fid.json and samples.png when the run has them."""
    (out_dir / "runs" / run.name).mkdir(parents=True, exist_ok=True)
    for name in ("log.jsonl", "fid.json", "samples.png"):
        if (results / run.name / name).exists():
            shutil.copy(results / run.name / name, out_dir / "runs" / run.name / name)


def keep_diagnosis(results, out_dir, name):
    """<name>/diagnose.json without the checkpoint paths and with only the consumers its figures draw (the
    full file of a 48-block residual model runs to megabytes); for routing-long, routing.json instead: the
    routing table's numbers, which need the checkpoints."""
    reports = json.loads((results / name / "diagnose.json").read_text())["reports"]
    (out_dir / name).mkdir(parents=True, exist_ok=True)
    if name == "routing-long":
        rows = [routing_row(r, load_checkpoint(r["checkpoint"])["ema"]) for r in reports]
        (out_dir / name / "routing.json").write_text(json.dumps({"rows": rows}, indent=1))
        return
    for r in reports:
        del r["checkpoint"]
        if "consumers" in r:
            r["consumers"] = {str(l): r["consumers"][str(l)] for l in r["layers"]}
    (out_dir / name / "diagnose.json").write_text(json.dumps({"reports": reports}))


#################################################################################
#                                    Report                                      #
#################################################################################

def routing_row(report, state):
    """How far one DAR model's routing moved from uniform, from its diagnose.py report at ROUTING_T and its EMA
    weights: the mean query norm, and per t the entropy of alpha over log N, the weight on v0 and on the
    newest source in multiples of uniform, and the largest weight (consumers with more than one source)."""
    norms = [v.norm().item() for k, v in state.items() if k.startswith("router.mixers.")
             and (k.endswith(".query") or k.endswith(".query_proj.weight"))]
    row = dict(label=report["label"], query_norm=statistics.mean(norms), entropy=[], first=[], newest=[], largest=[])
    for ti in range(len(ROUTING_T)):
        per_consumer = [c["alpha"][ti] for c in report["consumers"].values() if len(c["alpha"][ti]) > 1]
        row["entropy"].append(statistics.mean(-sum(a * math.log(a) for a in alpha if a > 0) / math.log(len(alpha))
                                              for alpha in per_consumer))
        row["first"].append(statistics.mean(alpha[0] * len(alpha) for alpha in per_consumer))
        row["newest"].append(statistics.mean(alpha[-1] * len(alpha) for alpha in per_consumer))
        row["largest"].append(max(max(alpha) for alpha in per_consumer))
    return row


def routing_lines(rows):
    lines = [f"| run | mean query norm | alpha entropy / log N (t={ROUTING_T[0]}, {ROUTING_T[1]}) | "
             f"alpha on v0 (t={ROUTING_T[0]}, {ROUTING_T[1]}) | alpha on the newest source | largest alpha |",
             "|---|---|---|---|---|---|"]
    pair = lambda values, fmt: ", ".join(format(v, fmt) for v in values)  # noqa: E731
    for row in rows:
        lines.append(f"| {row['label']} | {row['query_norm']:.3f} | {pair(row['entropy'], '.4f')} | "
                     f"{pair(row['first'], '.3f')} x uniform | {pair(row['newest'], '.3f')} x uniform | "
                     f"{pair(row['largest'], '.3f')} |")
    return lines


def draw_val_loss(runs, out_dir, title):
    """out_dir/val_loss.png: the EMA validation curves of [(label, run directory)], the first label the reference."""
    out_dir.mkdir(parents=True, exist_ok=True)
    draw_curves([(label, validation_curve(run_dir)) for label, run_dir in runs], out_dir / "val_loss.png", title)


def report(results, out_dir):
    """The router study's report, from --results-dir (the routing table reads the checkpoints)."""
    grouped = groups(results, planned_runs(results))
    if "residual" not in grouped:
        raise ValueError(f"{results}: no finished residual run yet, nothing to compare against")
    out_dir.mkdir(parents=True, exist_ok=True)
    best = best_query(results)
    best_label = f"DAR {best} c4"
    unpicked = {f"{best_label}, seeds 1-2 only (seed 0 picked it)": grouped[best_label][1:]} if len(
        grouped.get(best_label, [])) > 1 else {}
    routing_path = results / "routing" / "diagnose.json"
    routing = routing_lines([routing_row(r, load_checkpoint(r["checkpoint"])["ema"]) for r in json.loads(
        routing_path.read_text())["reports"]]) if routing_path.exists() else []
    draw_val_loss([(label, results / r.name) for label, runs in grouped.items() for r in runs], out_dir,
                  f"{MODEL} on Fashion-MNIST, fixed validation batch (fixed t grid and noise)")
    (out_dir / "samples").mkdir(exist_ok=True)
    for runs in grouped.values():
        shutil.copy(results / runs[0].name / "samples.png", out_dir / "samples" / f"{runs[0].name}.png")
        for run in runs:  # the logs behind every number, small enough to keep with the report
            (out_dir / "runs" / run.name).mkdir(parents=True, exist_ok=True)
            for name in ("log.jsonl", "fid.json"):
                if (results / run.name / name).exists():
                    shutil.copy(results / run.name / name, out_dir / "runs" / run.name / name)
    for figure in ("symptoms.png", "symptoms_by_t.png"):
        if (results / "diagnose" / figure).exists():
            shutil.copy(results / "diagnose" / figure, out_dir / figure)
    for figure in (results / "diagnose").glob("routing_*.png"):
        shutil.copy(figure, out_dir / figure.name)
    text = [f"Best chunk-4 query (lowest final EMA validation loss, seed 0): {best}.", "",
            f"Final numbers after {SETTINGS.max_steps} steps:", "",
            *final_table(results, grouped, SETTINGS.fid_samples, unpicked), "",
            "EMA validation loss during training (mean over seeds):", "", *curve_table(results, grouped, "residual"),
            "", "Iterations to match:", "", *match_table(results, grouped), ""]
    if routing:
        text += [f"How far the routing moved (EMA weights, {ROUTING_IMAGES} held-out images):", "", *routing, ""]
    (out_dir / "results.md").write_text("\n".join(text))
    print("\n".join(text))
    print(f"wrote {out_dir}/results.md, val_loss.png, samples/, and the diagnose figures")


def symptom_tables(reports):
    """The three symptoms of diagnose.py reports, per t-bin and over all t (from the t-averaged profiles):
    hidden-state RMS of the last block over the first, gradient norm of the first block over the last, and
    the mean cosine of adjacent blocks (blocks 2..L against the one before; block 1's is against v0)."""
    t_grid = reports[0]["t_grid"]
    measures = (("RMS of the last block's hidden state over the first's", "#.3g", lambda b: b["rms"][-1] / b["rms"][0]),
                ("gradient norm at the first block over the last", "#.3g",
                 lambda b: b["grad_norm"][0] / b["grad_norm"][-1] if b["grad_norm"][-1] else math.inf),
                ("mean cosine of adjacent blocks", ".4f", lambda b: statistics.mean(b["cosine"][1:])))
    lines = []
    for title, digits, measure in measures:
        lines += [f"{title}:", "", "| run | blocks | all t | " + " | ".join(f"t {t:.2f}" for t in t_grid) + " |",
                  "|---|---|---|" + "---|" * len(t_grid)]
        for r in reports:
            per_t = [measure({name: values[ti] for name, values in r["by_t"].items()}) for ti in range(len(t_grid))]
            lines.append(f"| {r['label']} | {r['depth']} | {measure(r['overall']):{digits}} | "
                         + " | ".join(f"{v:{digits}}" for v in per_t) + " |")
        lines.append("")
    return lines


def diagnosis_section(out_dir, name, title):
    """A kept diagnosis: its figures drawn again from the kept diagnose.json, and its symptom tables."""
    path = out_dir / name / "diagnose.json"
    if not path.exists():
        return []
    reports = json.loads(path.read_text())["reports"]
    draw_figures(reports, path.parent)
    return [f"### {title}", "", f"![symptoms]({name}/symptoms_by_t.png)", f"![symptoms]({name}/symptoms.png)", "",
            *symptom_tables(reports)]


def deep_report(out_dir):
    """The deep study's report, from what its jobs kept in out_dir alone: results.md and the figures. It covers
    every part with a finished run kept, whichever --plan ran last (a part 3 session keeps part 1 in it)."""
    root = out_dir / "runs"
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = sweep_runs()
    swept = {run.name for run in sweep}  # the picks among the sweep runs kept
    part_runs = {"depth": depth_runs(), "lr": sweep, "long": long_runs(root, swept)}
    parts = [part for part, runs in part_runs.items() if any(finished(root, run) for run in runs)]
    text = ["Generated by `python study.py --plan deep --report-only` from `runs/` and the kept diagnoses.", ""]
    if "depth" in parts:
        grouped = groups(root, part_runs["depth"])
        text += ["## Part 1: symptoms against depth", "",
                 f"{DEEP.depth_steps} steps, batch {DEEP.batch}, lr {DEEP.depth_lr:g}, one seed. Final numbers:", "",
                 *final_table(root, grouped, SETTINGS.fid_samples), "",
                 *diagnosis_section(out_dir, "diagnose-depth", "Residual at every depth"),
                 *diagnosis_section(out_dir, "diagnose-depth-dar", f"The three routers at {DEPTHS[-1]} blocks")]
    if "lr" in parts:
        text += ["## Part 2: the learning rate", "",
                 f"Final EMA validation loss after {DEEP.lr_steps} steps, {LONG_MODEL}, seed 0:", "",
                 "| router | " + " | ".join(f"lr {lr:g}" for lr in DEEP.lrs) + " | picked |",
                 "|---|" + "---|" * (len(DEEP.lrs) + 1)]
        for router in SWEPT:
            cells = [f"{final_eval(root, run.name, run.steps)['val_loss_ema']:.4f}" if finished(root, run)
                     else "not finished" for run in lr_runs(router)]
            pick = best_lr(root, router, swept)
            so_far = " (so far)" if "not finished" in cells else ""  # the best of the runs kept, not yet the pick
            picked = f"{pick:g}{so_far}" if pick else "-"
            text.append(f"| {router_label(router)} | " + " | ".join(cells) + f" | {picked} |")
        text += ["", "The long runs of DAR timestep c4 use DAR static c4's pick.", ""]
    long = groups(root, part_runs["long"]) if "long" in parts else {}
    if "residual" in long:
        rows = out_dir / "routing-long" / "routing.json"
        draw_val_loss([(label, root / r.name) for label, runs in long.items() for r in runs], out_dir / "long",
                      f"{LONG_MODEL} on Fashion-MNIST, fixed validation batch (fixed t grid and noise)")
        text += ["## Part 3: long runs", "",
                 f"{DEEP.long_steps} steps, batch {DEEP.batch}, each router at its picked lr ("
                 + ", ".join(f"{label} {runs[0].lr:g}" for label, runs in long.items()) + "). Final numbers:", "",
                 *final_table(root, long, SETTINGS.fid_samples), "",
                 "Each DAR router against residual, by the reading rule (a difference counts when the means differ"
                 " by more than twice the larger seed standard deviation):", "",
                 *difference_table(root, long, SETTINGS.fid_samples), "",
                 "EMA validation loss during training (mean over seeds):", "",
                 *curve_table(root, long, "residual"), "", "![validation loss](long/val_loss.png)", "",
                 "Iterations to match:", "", *match_table(root, long), ""]
        if rows.exists():
            text += [f"How far the routing moved (EMA weights, {DEEP.images} held-out images):", "",
                     *routing_lines(json.loads(rows.read_text())["rows"]), ""]
        text += diagnosis_section(out_dir, "diagnose-long",
                                  f"The three routers at 24 blocks after {DEEP.long_steps} steps")
        text += [f"![{label}](runs/{runs[0].name}/samples.png)" for label, runs in long.items()
                 if (root / runs[0].name / "samples.png").exists()]
    text += ["", "## Cost", "", "Training wall time of every finished run, one thread each, two jobs at a time"
             " (sampling, FID and diagnoses not included):", "",
             *cost_table(root, {part: part_runs[part] for part in parts})]
    (out_dir / "results.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"wrote {out_dir}/results.md and its figures")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", choices=("router", *PARTS), default="router",
                        help="router: the router study (default); depth, lr, long (with lr first), deep (all three): "
                        "the deep study")
    parser.add_argument("--results-dir", default=None, help="(default results/study, or results/study-deep)")
    parser.add_argument("--out-dir", default=None, help="the report (default docs/study, or docs/study-deep)")
    parser.add_argument("--report-only", action="store_true", help="skip the runs, only write the report")
    parser.add_argument("--max-steps", type=in_range(int, 8), default=None,
                        help=f"training steps of every run of --plan router, batch 32 (default {SETTINGS.max_steps})")
    parser.add_argument("--fid-samples", type=in_range(int, 2), default=None,
                        help="(default 500 for --plan router, 1000 for the deep study)")
    parser.add_argument("--fid-reference", type=in_range(int, 2), default=SETTINGS.fid_reference,
                        help="training images in the FID reference (default %(default)s)")
    parser.add_argument("--score", metavar="RUN_DIR", help=argparse.SUPPRESS)  # a job run_jobs starts
    args = parser.parse_args(argv)
    deep = args.plan != "router"
    if deep and args.max_steps is not None:
        parser.error(f"--max-steps sets the router study's steps; the deep study's are fixed (--plan {args.plan})")
    SETTINGS.max_steps = args.max_steps or SETTINGS.max_steps
    SETTINGS.fid_samples = args.fid_samples or (1000 if deep else 500)
    SETTINGS.fid_reference = args.fid_reference
    if args.score:
        return score(args.score)
    results = Path(args.results_dir or ("results/study-deep" if deep else "results/study")).resolve()
    out_dir = Path(args.out_dir or ("docs/study-deep" if deep else "docs/study")).resolve()
    if not args.report_only:
        results.mkdir(parents=True, exist_ok=True)
        plan_jobs = lambda failed: planned_jobs(  # noqa: E731
            results, args.plan, out_dir, {name.removeprefix("train-") for name in failed})
        if not run_jobs(results, plan_jobs):
            print("some jobs failed: the report covers the runs that finished")
    if deep:
        deep_report(out_dir)
    else:
        report(results, out_dir)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:
        sys.exit(f"error: {err}")
