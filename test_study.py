"""Tests of study.py's plan and report on synthetic run logs (the runs themselves are train.py's, tested there).

Run: python -m pytest -q test_study.py
"""
import json

import pytest
from PIL import Image

import study
import study_tables
from model import SIT_SIZES


def fake_run(results, name, final_loss, steps=800, fid=None):
    """A finished run: log.jsonl with 8 evaluations falling linearly to final_loss, a samples.png, and a
    fid.json when fid is given."""
    run = results / name
    run.mkdir(parents=True)
    records = []
    for k in range(1, 9):
        step = k * steps // 8
        loss = final_loss + 0.01 * (8 - k)
        records += [dict(step=step, loss=loss, time_s=float(step)),
                    dict(step=step, val_loss=loss + 0.001, val_loss_ema=loss)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    Image.new("RGB", (8, 8)).save(run / "samples.png")
    if fid is not None:
        (run / "fid.json").write_text(json.dumps(dict(fid=fid, precision=0.5, recall=0.25)))


@pytest.fixture(autouse=True)
def default_settings(monkeypatch):
    monkeypatch.setattr(study, "SETTINGS", study.argparse.Namespace(max_steps=800, fid_samples=500,
                                                                   fid_reference=1000))
    monkeypatch.setattr(study, "DEEP", study.argparse.Namespace(**vars(study.DEEP)))


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [(100, 0.5), (200, 0.3), (300, 0.2)]
    assert study_tables.steps_to_reach(curve, 0.4) == pytest.approx(150)
    assert study_tables.steps_to_reach(curve, 0.5) == 100
    assert study_tables.steps_to_reach(curve, 0.1) is None


def test_best_query_runs_are_planned_once_the_chunk_4_queries_finish(tmp_path):
    names = lambda: [r.name for r in study.planned_runs(tmp_path)]  # noqa: E731
    assert "dar-timestep-c1-s0" not in names() and len(names()) == 8
    for query, loss in (("static", 0.25), ("timestep", 0.24), ("dynamic", 0.26)):
        fake_run(tmp_path, f"dar-{query}-c4-s0", loss)
    assert study.best_query(tmp_path) == "timestep"
    assert names()[8:] == ["dar-timestep-c1-s0", "dar-timestep-c8-s0", "dar-timestep-c4-s1", "dar-timestep-c4-s2"]
    jobs = {job.name: job for job in study.planned_jobs(tmp_path)}
    assert jobs["train-dar-static-c4-s0"].done and not jobs["train-residual-s0"].done
    assert "score-residual-s0" in jobs["score-unet-s0"].needs  # the reference statistics are computed once


def test_report_tables_and_figure(tmp_path):
    results, out = tmp_path / "results", tmp_path / "docs"
    for seed, loss in enumerate((0.250, 0.252, 0.248)):
        fake_run(results, f"residual-s{seed}", loss)
    for query, loss in (("static", 0.245), ("timestep", 0.240), ("dynamic", 0.260)):
        fake_run(results, f"dar-{query}-c4-s0", loss)
    for seed, loss in ((1, 0.244), (2, 0.246)):
        fake_run(results, f"dar-timestep-c4-s{seed}", loss)
    study.report(results, out)
    text = (out / "results.md").read_text()
    assert "| residual | 3 | 0.2500 +- 0.0020 (n=3) |" in text
    assert "| DAR timestep c4 | 3 | 0.2433 +- 0.0031 (n=3) |" in text
    assert "| DAR timestep c4, seeds 1-2 only (seed 0 picked it) | 2 | 0.2450 +- 0.0014 (n=2) |" in text
    # the mean timestep curve reaches 0.25 a third of the way from step 700 (0.2533) to 800 (0.2433)
    assert "| DAR timestep c4 | 733 | 1.09x |" in text
    assert "| DAR dynamic c4 | not reached | - |" in text
    assert Image.open(out / "val_loss.png").size[0] == 1400
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "dar-dynamic-c4-s0.png", "dar-static-c4-s0.png", "dar-timestep-c4-s0.png", "residual-s0.png"]
    assert (out / "runs" / "residual-s2" / "log.jsonl").read_text() == (results / "residual-s2" / "log.jsonl").read_text()


#################################################################################
#                   The deep study: depth, learning rate, long runs              #
#################################################################################

def test_depth_plan_names_the_right_configs(tmp_path):
    runs = study.planned_runs(tmp_path, "depth")
    assert [(r.name, r.model, r.router) for r in runs] == [
        ("depth-residual-d6-s0", "SiT-N6/4", "residual"), ("depth-residual-d12-s0", "SiT-N12/4", "residual"),
        ("depth-residual-d24-s0", "SiT-N24/4", "residual"), ("depth-residual-d48-s0", "SiT-N48/4", "residual"),
        ("depth-dar-static-c4-d48-s0", "SiT-N48/4", "dar"), ("depth-dar-timestep-c4-d48-s0", "SiT-N48/4", "dar")]
    assert {(r.steps, r.lr, r.batch, r.seed) for r in runs} == {(2000, 1e-3, 16, 0)}  # only the depth differs
    assert [SIT_SIZES[r.model[4:-2]] for r in runs[:4]] == [(6, 64, 4), (12, 64, 4), (24, 64, 4), (48, 64, 4)]
    jobs = {job.name: job for job in study.planned_jobs(tmp_path, "depth", tmp_path / "docs")}
    command = " ".join(jobs["train-depth-dar-timestep-c4-d48-s0"].command)
    assert ("--model SiT-N48/4 --global-batch-size 16" in command and "--max-steps 2000" in command
            and "--lr 0.001" in command and "--query timestep --chunk 4" in command)
    assert jobs["diagnose-depth"].needs == [f"train-depth-residual-d{d}-s0" for d in (6, 12, 24, 48)]
    assert jobs["diagnose-depth-dar"].needs == ["train-depth-residual-d48-s0", "train-depth-dar-static-c4-d48-s0",
                                               "train-depth-dar-timestep-c4-d48-s0"]


def test_the_lr_picked_is_the_one_with_the_lowest_final_ema_loss(tmp_path):
    assert study.DEEP.lrs == (3e-4, 1e-3, 3e-3, 1e-2)
    losses = {"residual": (0.30, 0.28, 0.29, 0.33), "static": (0.27, 0.29, 0.31, 0.35)}
    for router, values in losses.items():
        for run, loss in list(zip(study.lr_runs(router), values))[:2]:
            fake_run(tmp_path, run.name, loss, steps=run.steps)
    assert study.best_lr(tmp_path, "residual") is None  # its sweep has not finished
    assert study.best_lr(tmp_path, "residual", given_up={"lr-residual-lr0.003-s0", "lr-residual-lr0.01-s0"}) == 1e-3
    assert study.planned_runs(tmp_path, "long") == study.planned_runs(tmp_path, "lr")  # no long run before the picks
    for router, values in losses.items():
        for run, loss in list(zip(study.lr_runs(router), values))[2:]:
            fake_run(tmp_path, run.name, loss, steps=run.steps)
    assert (study.best_lr(tmp_path, "residual"), study.best_lr(tmp_path, "static")) == (1e-3, 3e-4)
    long = study.planned_runs(tmp_path, "long")[len(study.sweep_runs()):]
    assert [(r.name, r.lr, r.steps) for r in long[:3]] == [
        ("long-residual-lr0.001-s0", 1e-3, 4000), ("long-dar-static-c4-lr0.0003-s0", 3e-4, 4000),
        ("long-dar-timestep-c4-lr0.0003-s0", 3e-4, 4000)]  # the timestep query takes static's pick
    assert [r.seed for r in long] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_a_difference_counts_beyond_twice_the_larger_seed_spread():
    assert study_tables.difference([1.0, 1.2], [2.0, 2.2])[1] == "differs"  # sds 0.14: the means are 1.0 apart
    assert study_tables.difference([1.0, 1.4], [1.3, 1.5])[1] == "no difference"  # 0.2 apart, sds up to 0.28
    gap, verdict = study_tables.difference([0.9], [1.0])
    assert verdict == "unread (one seed)" and abs(gap + 0.1) < 1e-12


def test_iterations_to_match_per_seed_against_residuals_same_seed(tmp_path):
    # fake_run falls 0.01 per evaluation (every 500 of 4000 steps): a curve ending `gap` below its residual
    # seed's final value reaches it gap / 0.01 of an evaluation before the end
    grouped = {"residual": [], "DAR": []}
    for seed, (final, gap) in enumerate(((0.250, 0.005), (0.252, 0.0), (0.248, 0.0025))):
        for label, loss in (("residual", final), ("DAR", final - gap)):
            fake_run(tmp_path, f"{label}-s{seed}", loss, steps=4000)
            grouped[label].append(study.Run(f"{label}-s{seed}", label, [], seed, steps=4000))
    lines = study_tables.match_table(tmp_path, grouped)
    assert lines[0] == "Residual's final EMA validation loss (mean of 3 seeds): 0.2500."
    # steps 3750, 4000 and 3875: speed-ups 1.0667, 1.0 and 1.0323
    assert lines[-1].endswith("| 1.03 +- 0.03 (n=3) |")
    fake_run(tmp_path, "late-s1", 0.2530, steps=4000)
    grouped["DAR"][1] = study.Run("late-s1", "DAR", [], 1, steps=4000)  # ends above residual seed 1's 0.252
    assert study_tables.match_table(tmp_path, grouped)[-1].endswith("| 1.05 +- 0.02 (n=2); 1 of 3 not reached |")


def fake_diagnosis(out_dir, name, runs, steps):
    """A kept diagnose.json: at t 0.25 and 0.75, block k's RMS 1 + 0.1 k (t index + 1), gradient norm 1 / k and
    cosine 0.9 + 0.01 (t index), so RMS last / first is (1 + 0.1 L) / 1.1 and (1 + 0.2 L) / 1.2 and the gradient
    ratio is L."""
    reports = []
    for run in runs:
        depth = int(run.model[5:-2])
        by_t = {"rms": [[1 + 0.1 * k * (ti + 1) for k in range(1, depth + 1)] for ti in range(2)],
                "grad_norm": [[1 / k for k in range(1, depth + 1)] for _ in range(2)],
                "cosine": [[0.9 + 0.01 * ti] * depth for ti in range(2)]}
        overall = {key: [sum(col) / 2 for col in zip(*rows)] for key, rows in by_t.items()}
        reports.append(dict(label=f"{run.name}@{steps}", depth=depth, t_grid=[0.25, 0.75], num_images=4, layers=[],
                            routing=None, by_t=by_t, overall=overall))
    (out_dir / name).mkdir(parents=True)
    (out_dir / name / "diagnose.json").write_text(json.dumps({"reports": reports}))


def test_report_only_rebuilds_the_deep_report_from_the_kept_logs(tmp_path):
    out = tmp_path / "docs"
    root = out / "runs"
    depth = study.depth_runs()
    for k, run in enumerate(depth):
        fake_run(root, run.name, 0.30 - 0.01 * k, steps=run.steps)
    for router, values in {"residual": (0.30, 0.28, 0.29, 0.33), "static": (0.27, 0.29, 0.31, 0.35)}.items():
        for run, loss in zip(study.lr_runs(router), values):
            fake_run(root, run.name, loss, steps=run.steps)
    long = study.long_runs(root)
    for run in long:
        loss = {"residual": 0.250, "DAR static c4": 0.245, "DAR timestep c4": 0.248}[run.label] + 0.001 * run.seed
        fake_run(root, run.name, loss, steps=run.steps, fid=40.0 + run.seed)
    fake_diagnosis(out, "diagnose-depth", depth[:4], 2000)
    fake_diagnosis(out, "diagnose-long", long[:3], 4000)
    rows = [dict(label=run.name, query_norm=0.25, entropy=[0.99, 0.9], first=[1.0, 2.0], newest=[1.0, 0.5],
                 largest=[0.5, 0.75]) for run in long if run.router == "dar"]
    (out / "routing-long").mkdir()
    (out / "routing-long" / "routing.json").write_text(json.dumps({"rows": rows}))
    study.main(["--plan", "long", "--report-only", "--out-dir", str(out), "--results-dir", str(tmp_path / "none")])
    text = (out / "results.md").read_text()  # every part kept, not only the parts of the last --plan
    assert text.index("## Part 1") < text.index("## Part 2") < text.index("## Part 3")
    assert "| residual d48 | 1 | 0.2700 |" in text and "| DAR timestep c4 d48 | 1 | 0.2500 |" in text
    assert "| depth-residual-d6-s0@2000 | 6 | 1.65 | 1.45 | 1.83 |" in text  # RMS last / first
    assert "| depth-residual-d48-s0@2000 | 48 | 48.0 | 48.0 | 48.0 |" in text  # gradient first / last
    assert "| depth-residual-d12-s0@2000 | 12 | 0.9050 | 0.9000 | 0.9100 |" in text  # adjacent cosine
    assert "| residual | 0.3000 | 0.2800 | 0.2900 | 0.3300 | 0.001 |" in text
    assert "| DAR static c4 | 0.2700 | 0.2900 | 0.3100 | 0.3500 | 0.0003 |" in text
    assert "| residual | 3 | 0.2510 +- 0.0010 (n=3) |" in text and "| 41.0 +- 1.0 (n=3) | 0.500" in text
    # every static seed ends 0.005 below residual's same seed: it gets there half an evaluation (250 steps) early
    assert "| DAR static c4 | 3750 | 1.07x | 1.07 +- 0.00 (n=3) |" in text
    assert "| long-dar-static-c4-lr0.0003-s1 | 0.250 | 0.9900, 0.9000 | 1.000, 2.000 x uniform |" in text
    # the reading rule: static ends 0.005 below residual with seed sds of 0.001 (differs); the FIDs are equal
    assert ("| DAR static c4 | EMA loss, step 1000 | 0.3060 +- 0.0010 (n=3) | 0.3110 +- 0.0010 (n=3) | -1.6% | "
            "differs |") in text
    assert "| DAR static c4 | FID-1000 | 41.0 +- 1.0 (n=3) | 41.0 +- 1.0 (n=3) | +0.0% | no difference |" in text
    assert "| long | residual | 3 | 67 / 67 / 67 | 200 |" in text  # fake_run's clock: one second a step
    assert not (out / "diagnose-depth-dar").exists() and "The three routers at 48 blocks" not in text
    for figure in ("diagnose-depth/symptoms_by_t.png", "diagnose-depth/symptoms.png", "diagnose-long/symptoms.png",
                   "long/val_loss.png"):
        assert Image.open(out / figure).size[0] > 0, figure
    assert not (tmp_path / "none").exists()  # --report-only reads nothing else and writes no results


def test_training_minutes_add_up_the_sessions_of_a_resumed_run(tmp_path):
    run = study.depth_runs()[0]
    clock = [(100, 60.0), (200, 120.0), (200, 30.0), (300, 90.0)]  # killed after step 200, resumed from it
    records = [dict(step=step, loss=0.3, time_s=seconds) for step, seconds in clock] + [dict(step=300, val_loss=0.3)]
    (tmp_path / run.name).mkdir()
    (tmp_path / run.name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert study_tables.training_minutes(tmp_path, run) == pytest.approx((120 + 90) / 60)


def test_keep_copies_a_finished_runs_logs_into_the_report(tmp_path):
    results, out = tmp_path / "results", tmp_path / "docs"
    run = study.depth_runs()[0]
    fake_run(results, run.name, 0.3, steps=run.steps)
    job = next(j for j in study.planned_jobs(results, "depth", out) if j.name == f"train-{run.name}")
    assert job.done and not (out / "runs" / run.name).exists()
    job.keep()
    assert (out / "runs" / run.name / "log.jsonl").read_text() == (results / run.name / "log.jsonl").read_text()


def test_max_steps_belongs_to_the_router_study(capsys):
    with pytest.raises(SystemExit):
        study.main(["--plan", "depth", "--max-steps", "100"])
    assert "--max-steps" in capsys.readouterr().err


def test_the_deep_report_covers_only_the_parts_with_finished_runs(tmp_path):
    out = tmp_path / "docs"
    for router in study.SWEPT:
        run = study.lr_runs(router)[0]
        fake_run(out / "runs", run.name, 0.3, steps=run.steps)
    study.main(["--plan", "deep", "--report-only", "--out-dir", str(out), "--results-dir", str(tmp_path / "none")])
    text = (out / "results.md").read_text()
    assert "## Part 2" in text and "## Part 1" not in text and "## Part 3" not in text
    assert "| residual | 0.3000 | not finished | not finished | not finished | 0.0003 (so far) |" in text
