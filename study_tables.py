"""The numbers of a study, read from each run's kept files (train.py's log.jsonl, fid.json) and summarized as
markdown tables: final losses and FID, validation curves, iterations to match, the deep study's reading rule,
training cost. A run is anything with .name, .label, .steps, .seed and .grid (study.Run).

Not a script: study.py builds its reports with it.

    grouped = groups(root, runs)                  # label -> the finished runs of each configuration
    lines = final_table(root, grouped, fid_samples=1000)
"""
import json
import statistics

from checkpoint import read_log, validation_curve


def final_eval(root, run_name, steps):
    """The last validation record of a run finished at `steps`, or None."""
    records = [r for r in read_log(root / run_name) if "val_loss" in r]
    return records[-1] if records and records[-1]["step"] == steps else None


def finished(root, run):
    has_grid = not run.grid or (root / run.name / "samples.png").exists()
    return final_eval(root, run.name, run.steps) is not None and has_grid


def kept_fid(root, run):
    """The run's fid.json (fid, precision, recall), or None before it is scored."""
    path = root / run.name / "fid.json"
    return json.loads(path.read_text()) if path.exists() else None


def groups(root, runs):
    """The finished runs grouped by configuration: label -> list of runs (seeds)."""
    grouped = {}
    for run in runs:
        if finished(root, run):
            grouped.setdefault(run.label, []).append(run)
    return grouped


def mean_spread(values, digits=4):
    """'m' for one value, 'm +- s (n=k)' with the sample standard deviation for several."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f} (n={len(values)})"


def final_table(root, grouped, fid_samples, extra=None):
    """Final EMA and raw validation loss, FID (of fid_samples images), precision and recall per configuration,
    mean +- sd over seeds. extra: more rows, label -> runs."""
    lines = [f"| router | runs | val loss (EMA) | val loss (raw) | FID-{fid_samples} | precision | recall |",
             "|---|---|---|---|---|---|---|"]
    for label, runs in {**grouped, **(extra or {})}.items():
        finals = [final_eval(root, r.name, r.steps) for r in runs]
        fids = [fid for fid in (kept_fid(root, r) for r in runs) if fid]
        cell = lambda key, digits: mean_spread([f[key] for f in fids], digits) if fids else "-"  # noqa: E731
        lines.append(f"| {label} | {len(runs)} | {mean_spread([f['val_loss_ema'] for f in finals])} | "
                     f"{mean_spread([f['val_loss'] for f in finals])} | {cell('fid', 1)} | {cell('precision', 3)} | "
                     f"{cell('recall', 3)} |")
    return lines


def curve_table(root, grouped, reference):
    """The EMA validation loss at every evaluation of the reference's first run, mean over seeds."""
    steps = [s for s, _ in validation_curve(root / grouped[reference][0].name)]
    lines = ["| router | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for label, runs in grouped.items():
        curves = [dict(validation_curve(root / r.name)) for r in runs]
        lines.append(f"| {label} | " + " | ".join(f"{statistics.mean(c[s] for c in curves):.4f}" for s in steps) + " |")
    return lines


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


def match_table(root, grouped):
    """Iterations to match (the paper's measure): the step at which a configuration's EMA curve, interpolated
    between evaluations, reaches residual's final value, against residual's steps. Once for the mean curves,
    and once per seed: each seed's curve against the residual run of the same seed (same data, t and noise),
    whose spread is the measure's noise."""
    residual = {r.seed: final_eval(root, r.name, r.steps)["val_loss_ema"] for r in grouped["residual"]}
    steps = grouped["residual"][0].steps
    target = statistics.mean(residual.values())
    lines = [f"Residual's final EMA validation loss (mean of {len(residual)} seeds): {target:.4f}.", "",
             f"| router | step reaching it (mean curve) | speed-up vs residual's {steps} | speed-up per seed against "
             "residual's same seed (x) |", "|---|---|---|---|"]
    for label, runs in grouped.items():
        if label == "residual":
            continue
        curves = [dict(validation_curve(root / r.name)) for r in runs]
        mean_curve = [(s, statistics.mean(c[s] for c in curves)) for s in sorted(curves[0])]
        reached = steps_to_reach(mean_curve, target)
        paired = [steps_to_reach(validation_curve(root / r.name), residual[r.seed]) for r in runs if r.seed in residual]
        speedups = [steps / s for s in paired if s]
        missed = f"{len(paired) - len(speedups)} of {len(paired)} not reached" if len(speedups) < len(paired) else ""
        per_seed = "; ".join(cell for cell in (mean_spread(speedups, 2) if speedups else "", missed) if cell) or "-"
        lines.append(f"| {label} | {f'{reached:.0f}' if reached else 'not reached'} | "
                     f"{f'{steps / reached:.2f}x' if reached else '-'} | {per_seed} |")
    return lines


def difference(values, reference):
    """The deep study's reading rule (docs/study-deep.md): two means differ only by more than twice the larger
    of their seed standard deviations. The relative gap of the means, and the verdict."""
    gap = statistics.mean(values) / statistics.mean(reference) - 1
    if min(len(values), len(reference)) < 2:
        return gap, "unread (one seed)"
    margin = 2 * max(statistics.stdev(values), statistics.stdev(reference))
    return gap, "differs" if abs(statistics.mean(values) - statistics.mean(reference)) > margin else "no difference"


def difference_table(root, grouped, fid_samples, reference="residual", steps=(1000, 2000, 4000)):
    """Every router against the reference by the reading rule: the EMA validation loss at `steps` (does a gain
    grow with training?), the final raw validation loss and the FID, each as mean +- sd over seeds."""
    fid_name = f"FID-{fid_samples}"

    def measures(run):  # each run's log and fid.json read once
        curve, fid = dict(validation_curve(root / run.name)), kept_fid(root, run)
        return {**{f"EMA loss, step {s}": curve.get(s) for s in steps},
                "raw loss, end": final_eval(root, run.name, run.steps)["val_loss"], fid_name: fid and fid["fid"]}
    measured = {label: [measures(run) for run in runs] for label, runs in grouped.items()}
    lines = [f"| router | measure | router's | {reference}'s | gap | by the rule |", "|---|---|---|---|---|---|"]
    for label, rows in measured.items():
        if label == reference:
            continue
        for name in rows[0]:
            values = [row[name] for row in rows if row[name] is not None]
            base = [row[name] for row in measured[reference] if row[name] is not None]
            if values and base:
                digits = 1 if name == fid_name else 4
                gap, verdict = difference(values, base)
                lines.append(f"| {label} | {name} | {mean_spread(values, digits)} | {mean_spread(base, digits)} | "
                             f"{gap:+.1%} | {verdict} |")
    return lines


def training_minutes(root, run):
    """Wall-clock minutes the run trained, summed over the sessions it ran in (train.py's clock starts again
    at each resume, so each session's last time_s is that session's share)."""
    clock = [record["time_s"] for record in read_log(root / run.name) if "time_s" in record]
    return sum(now for now, after in zip(clock, clock[1:] + [0.0]) if after < now) / 60


def cost_table(root, part_runs):
    """Training minutes per configuration of each part, from the kept logs."""
    lines = ["| part | configuration | runs | minutes per run | minutes in all |", "|---|---|---|---|---|"]
    total = 0.0
    for part, runs in part_runs.items():
        for label, group in groups(root, runs).items():
            minutes = [training_minutes(root, run) for run in group]
            total += sum(minutes)
            per_run = " / ".join(f"{m:.0f}" for m in minutes)
            lines.append(f"| {part} | {label} | {len(group)} | {per_run} | {sum(minutes):.0f} |")
    lines.append(f"| all | | | | {total:.0f} ({total / 60:.1f} h) |")
    return lines
