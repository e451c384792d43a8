"""The figures of diagnose.py and study.py, drawn with Pillow (no plotting library needed): a small toolkit
(fonts, ticks, axes, legends, a colour map) and the figures themselves, each from numbers already measured:

  draw_symptoms, draw_symptoms_by_t   the paper's three symptoms per block (its Fig. 2), overall and per t
  draw_routing                        routing weights (or gate gradients) per consumer against t (its Fig. 3)
  draw_figures                        all of those for a list of diagnose.py reports
  draw_curves                         EMA validation curves of runs, and their difference from a reference
  draw_spectrum                       radially averaged power spectra of image sets

A library module: nothing here runs on its own (`python diagnose.py` and `python study.py` draw with it).
"""
import functools
import math
import os
import re
import statistics

from PIL import Image, ImageDraw, ImageFont

#################################################################################
#               The toolkit: colours, fonts, ticks, axes, legends               #
#################################################################################

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
VIRIDIS = [(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141), (39, 173, 129),
           (92, 200, 99), (170, 220, 50), (253, 231, 37)]
LINE_PANEL = (440, 360)  # (width, height) of one line panel
T_PANEL = (400, 290)
HEAT_PANEL = (440, 460)
TITLE_HEIGHT = 44
FOOTNOTE_HEIGHT = 46
LEGEND_ROW = 26


@functools.lru_cache(maxsize=None)
def font(size):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def colormap(x):
    """Viridis, x in [0, 1]."""
    x = min(max(x, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(x), len(VIRIDIS) - 2)
    f = x - i
    return tuple(round(a + f * (b - a)) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))


def nice_ticks(lo, hi, log=False):
    """Axis range and ticks covering [lo, hi]: on a log axis 1, 2, 5 x 10^k (decades only for wide ranges),
    on a linear one steps of 1, 2 or 5 x 10^k."""
    if log:
        mantissas = (1, 2, 5) if hi / lo <= 300 else (1,)
        exponents = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 2)
        candidates = [m * 10.0 ** e for e in exponents for m in mantissas]
        low = max(c for c in candidates if c <= lo * (1 + 1e-9))
        high = min(c for c in candidates if c >= hi * (1 - 1e-9) and c > low)
        return (low, high), [c for c in candidates if low <= c <= high]
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * max(abs(lo), 1e-3), hi + 0.5 * max(abs(hi), 1e-3)
    raw = (hi - lo) / 5
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    start, stop = math.floor(lo / step), math.ceil(hi / step)
    return (start * step, stop * step), [k * step for k in range(start, stop + 1)]


def tick_labels(ticks, log=False):
    """Tick texts with as many decimals as the tick step needs (0.99998 and 1.00000, not 1 and 1)."""
    if log or len(ticks) < 2:
        return [f"{v:.3g}" for v in ticks]
    decimals = max(0, -math.floor(math.log10(ticks[1] - ticks[0]) + 1e-9))
    return [f"{v:.{decimals}f}" for v in ticks]


def rotated_text(image, xy_center, text, fnt, fill=(0, 0, 0)):
    """Paste text turned 90 degrees counter-clockwise, centred at xy_center (for y-axis labels)."""
    w, h = int(fnt.getlength(text)) + 4, fnt.size + 6
    label = Image.new("RGBA", (w, h), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((2, 1), text, font=fnt, fill=fill)
    label = label.rotate(90, expand=True)
    image.paste(label, (int(xy_center[0] - label.width / 2), int(xy_center[1] - label.height / 2)), label)


def centered_text(draw, xy, text, fnt, fill=(0, 0, 0)):
    draw.text(xy, text, font=fnt, fill=fill, anchor="mm")


class Axes:
    """A plot area at box = (left, top, right, bottom) pixels showing x_range by y_range (optionally log y)."""

    def __init__(self, image, box, x_range, y_range, log_y=False):
        self.image, self.draw, self.box = image, ImageDraw.Draw(image), box
        self.x_range, self.y_range, self.log_y = x_range, y_range, log_y

    def px(self, x, y):
        left, top, right, bottom = self.box
        fx = (x - self.x_range[0]) / (self.x_range[1] - self.x_range[0])
        if self.log_y:
            fy = (math.log10(y) - math.log10(self.y_range[0])) / (math.log10(self.y_range[1]) - math.log10(self.y_range[0]))
        else:
            fy = (y - self.y_range[0]) / (self.y_range[1] - self.y_range[0])
        return left + fx * (right - left), bottom - fy * (bottom - top)

    def frame(self, x_ticks, y_ticks, x_label, y_label, title):
        left, top, right, bottom = self.box
        small, medium = font(13), font(15)
        for y, text in zip(y_ticks, tick_labels(y_ticks, self.log_y)):
            _, py = self.px(self.x_range[0], y)
            self.draw.line([(left, py), (right, py)], fill=(228, 228, 228))
            self.draw.line([(left - 5, py), (left, py)], fill=(0, 0, 0))
            self.draw.text((left - 8, py), text, font=small, fill=(0, 0, 0), anchor="rm")
        for x, text in zip(x_ticks, tick_labels(x_ticks)):
            px, _ = self.px(x, self.y_range[0])
            self.draw.line([(px, bottom), (px, bottom + 5)], fill=(0, 0, 0))
            self.draw.text((px, bottom + 8), text, font=small, fill=(0, 0, 0), anchor="mt")
        self.draw.rectangle(self.box, outline=(0, 0, 0))
        centered_text(self.draw, ((left + right) / 2, bottom + 38), x_label, medium)
        centered_text(self.draw, ((left + right) / 2, top - 16), title, font(16))
        rotated_text(self.image, (left - 58, (top + bottom) / 2), y_label, medium)

    def line(self, xs, ys, color):
        points = [self.px(x, y) for x, y in zip(xs, ys) if not (self.log_y and y <= 0)]
        if len(points) > 1:
            self.draw.line(points, fill=color, width=2, joint="curve")
        for px, py in points:
            self.draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)


def legend(image, top, entries, columns):
    """Rows of (colour, label) entries below the panels, `columns` entries a row."""
    draw, fnt = ImageDraw.Draw(image), font(14)
    cell = image.width // columns
    for k, (color, label) in enumerate(entries):
        x, y = 20 + (k % columns) * cell, top + (k // columns) * LEGEND_ROW + LEGEND_ROW // 2
        draw.line([(x, y), (x + 30, y)], fill=color, width=3)
        draw.ellipse([x + 12, y - 3, x + 18, y + 3], fill=color)
        draw.text((x + 38, y), label, font=fnt, fill=(0, 0, 0), anchor="lm")


def y_axis(name, values, log):
    """Range and ticks of a statistic's axis. Cosines are shown down to 0.9 at least, so that blocks that
    are all near-copies of each other (cosine 0.9999) look like that, not like noise around 1."""
    values = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
    if not values:
        return nice_ticks(0.0, 1.0)
    if name == "cosine":
        return nice_ticks(min(min(values), 0.9), max(max(values), 1.0))
    return nice_ticks(min(values), max(values), log=log)


#################################################################################
#            The symptoms and the routing (the paper's Figs. 2 and 3)           #
#################################################################################

PANELS = (("rms", "forward: hidden-state RMS", "RMS (log scale)", True),
          ("grad_norm", "backward: gradient norm", "|dLoss/dh| per image (log scale)", True),
          ("cosine", "redundancy: cos(block k, block k-1)", "per-token cosine similarity", False))


def line_figure_size(num_series):
    columns = 2
    return 3 * LINE_PANEL[0], TITLE_HEIGHT + LINE_PANEL[1] + math.ceil(num_series / columns) * LEGEND_ROW + 12


def draw_symptoms(reports, path, subtitle):
    """Fig. 2 layout: RMS, gradient norm and cosine against block index, one line per checkpoint."""
    image = Image.new("RGB", line_figure_size(len(reports)), "white")
    centered_text(ImageDraw.Draw(image), (image.width / 2, 18), f"Three symptoms per block ({subtitle})", font(18))
    depth = max(len(r["overall"]["rms"]) for r in reports)
    x_range, x_ticks = (0.5, depth + 0.5), block_ticks(depth)
    for p, (name, title, y_label, log) in enumerate(PANELS):
        values = [v for r in reports for v in r["overall"][name]]
        log = log and any(v > 0 for v in values)  # a fresh adaLN-Zero model has zero gradients: stay linear
        y_range, y_ticks = y_axis(name, values, log)
        box = (p * LINE_PANEL[0] + 88, TITLE_HEIGHT + 32, (p + 1) * LINE_PANEL[0] - 14, TITLE_HEIGHT + LINE_PANEL[1] - 52)
        axes = Axes(image, box, x_range, y_range, log_y=log)
        axes.frame(x_ticks, y_ticks, "block", y_label if log else y_label.replace(" (log scale)", ""), title)
        for k, r in enumerate(reports):
            values = r["overall"][name]
            axes.line(range(1, len(values) + 1), values, PALETTE[k % len(PALETTE)])
    legend(image, TITLE_HEIGHT + LINE_PANEL[1], [(PALETTE[k % len(PALETTE)], r["label"]) for k, r in enumerate(reports)], 2)
    image.save(path)


def block_ticks(depth):
    step = max(1, math.ceil(depth / 12))
    return [1] + list(range(step, depth + 1, step)) if step > 1 else list(range(1, depth + 1))


def t_figure_size(num_reports, num_t):
    width = max(num_reports * T_PANEL[0], 600)
    columns = max(1, width // 130)
    return width, TITLE_HEIGHT + 3 * T_PANEL[1] + math.ceil(num_t / columns) * LEGEND_ROW + 12


def draw_symptoms_by_t(reports, t_grid, path):
    """One column per checkpoint, one row per statistic, one line per t (dark = noise, yellow = data)."""
    size = t_figure_size(len(reports), len(t_grid))
    image = Image.new("RGB", size, "white")
    centered_text(ImageDraw.Draw(image), (image.width / 2, 18),
                  "The symptoms along depth at each t (t = 0 noise, t = 1 data)", font(18))
    colors = [colormap(0.88 * k / max(len(t_grid) - 1, 1)) for k in range(len(t_grid))]
    depth = max(len(r["overall"]["rms"]) for r in reports)
    for row, (name, title, y_label, log) in enumerate(PANELS):
        values = [v for r in reports for per_t in r["by_t"][name] for v in per_t]
        log = log and any(v > 0 for v in values)
        y_range, y_ticks = y_axis(name, values, log)
        margin = (size[0] - len(reports) * T_PANEL[0]) // 2
        for col, r in enumerate(reports):
            left, top = margin + col * T_PANEL[0], TITLE_HEIGHT + row * T_PANEL[1]
            box = (left + 84, top + 30, left + T_PANEL[0] - 14, top + T_PANEL[1] - 52)
            axes = Axes(image, box, (0.5, depth + 0.5), y_range, log_y=log)
            axes.frame(block_ticks(depth), y_ticks, "block", y_label.replace(" per image", "").replace(" (log scale)", ""),
                       f"{r['label']}: {title.split(':')[0]}")
            for k, per_t in enumerate(r["by_t"][name]):
                axes.line(range(1, len(per_t) + 1), per_t, colors[k])
    columns = max(1, size[0] // 130)
    legend(image, TITLE_HEIGHT + 3 * T_PANEL[1], [(c, f"t = {t:.2f}") for c, t in zip(colors, t_grid)], columns)
    image.save(path)


def heatmap_figure_size(num_panels):
    return num_panels * HEAT_PANEL[0], TITLE_HEIGHT + HEAT_PANEL[1] + FOOTNOTE_HEIGHT


def colour_range(values):
    """A panel's colour scale: its own min..max, so that dependence on t shows even when small (the colour
    bar gives the numbers); a constant panel gets the middle colour."""
    flat = [v for row in values for v in row]
    lo, hi = min(flat), max(flat)
    if hi - lo <= 1e-9 * max(abs(hi), 1e-12):
        return (0.0, 2 * hi) if hi > 0 else (-1.0, 1.0)
    return lo, hi


def draw_heatmap(image, box, values, row_labels, t_grid, title, bar_label):
    """values[t][row] as a grid (t along x, rows top to bottom), with a colour bar to its right."""
    draw, small = ImageDraw.Draw(image), font(12)
    left, top, right, bottom = box
    lo, hi = colour_range(values)
    cell_w, cell_h = (right - left) / len(values), (bottom - top) / len(row_labels)
    for ti, column in enumerate(values):
        for ri, v in enumerate(column):
            draw.rectangle([left + ti * cell_w, top + ri * cell_h, left + (ti + 1) * cell_w, top + (ri + 1) * cell_h],
                           fill=colormap((v - lo) / (hi - lo)))
    draw.rectangle(box, outline=(0, 0, 0))
    label_every = max(1, math.ceil(len(row_labels) * 13 / (bottom - top)))
    for ri, name in enumerate(row_labels):
        if ri % label_every == 0 or ri == len(row_labels) - 1:
            draw.text((left - 5, top + (ri + 0.5) * cell_h), name if len(row_labels) <= 12 else name.split(" ")[0],
                      font=small, fill=(0, 0, 0), anchor="rm")
    t_every = max(1, math.ceil(len(values) * 34 / (right - left)))
    for ti, t in enumerate(t_grid):
        if ti % t_every == 0:
            draw.text((left + (ti + 0.5) * cell_w, bottom + 5), f"{t:.2f}", font=small, fill=(0, 0, 0), anchor="mt")
    centered_text(draw, ((left + right) / 2, bottom + 34), "t  (0 = noise, 1 = data)", font(14))
    centered_text(draw, ((left + right) / 2, top - 15), title, font(15))
    bar_left = right + 12
    for y in range(top, bottom + 1):
        draw.line([(bar_left, y), (bar_left + 14, y)], fill=colormap((bottom - y) / (bottom - top)))
    draw.rectangle([bar_left, top, bar_left + 14, bottom], outline=(0, 0, 0))
    ticks = [v for v in nice_ticks(lo, hi)[1] if lo - 1e-9 * (hi - lo) <= v <= hi + 1e-9 * (hi - lo)]
    for v, text in zip(ticks, tick_labels(ticks)):
        y = bottom - (v - lo) / (hi - lo) * (bottom - top)
        draw.line([(bar_left + 14, y), (bar_left + 18, y)], fill=(0, 0, 0))
        draw.text((bar_left + 20, y), text, font=small, fill=(0, 0, 0), anchor="lm")
    centered_text(draw, (bar_left + 7, bottom + 20), bar_label, font(13))


def draw_routing(report, layers, path):
    """Fig. 3 layout: one heatmap of source x t per chosen consumer.

    DAR: alpha (mean over images and tokens). Residual: each source's share of sum_i |dLoss/dg_{l,i}| at that t.
    """
    alpha = report["routing"] == "alpha"
    image = Image.new("RGB", heatmap_figure_size(len(layers)), "white")
    draw = ImageDraw.Draw(image)
    what = ("routing weight alpha of each source (mean over images and tokens)" if alpha else
            "counterfactual importance: each source's share of |dLoss/dg| at that t")
    centered_text(draw, (image.width / 2, 18), f"{report['label']}: {what}", font(17))
    chunked = False
    for p, l in enumerate(layers):
        consumer = report["consumers"][str(l)]
        chunked = chunked or len(consumer["sources"]) > 1 and consumer["sources"][1].startswith("c")
        box = (p * HEAT_PANEL[0] + 96, TITLE_HEIGHT + 30, (p + 1) * HEAT_PANEL[0] - 76, TITLE_HEIGHT + HEAT_PANEL[1] - 56)
        draw_heatmap(image, box, consumer["alpha"] if alpha else consumer["importance_share"], consumer["sources"],
                     report["t_grid"], consumer["name"], "alpha" if alpha else "share")
    rotated_text(image, (16, TITLE_HEIGHT + HEAT_PANEL[1] / 2), "source", font(15))
    sources = ("v0: patch embedding;  vi: output of sublayer i (odd i attention, even i MLP)"
               + (";  cn (va-vb): sum of the finished chunk va..vb" if chunked else ""))
    scale = "Each panel has its own colour scale" + (
        "; uniform routing is alpha = 1 / (number of sources)." if alpha else
        " (mean over images of |dLoss/dg|, divided by its sum over the sources).")
    for k, line in enumerate((sources, scale)):
        centered_text(draw, (image.width / 2, image.height - FOOTNOTE_HEIGHT + 10 + 20 * k), line, font(13))
    image.save(path)


def safe_name(label):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def draw_figures(reports, out_dir):
    """symptoms.png, symptoms_by_t.png and a routing figure per report that holds its drawn consumers; the paths."""
    written = [os.path.join(out_dir, "symptoms.png"), os.path.join(out_dir, "symptoms_by_t.png")]
    t_grid = reports[0]["t_grid"]
    draw_symptoms(reports, written[0], f"mean over {reports[0]['num_images']} held-out images x {len(t_grid)} values of t")
    draw_symptoms_by_t(reports, t_grid, written[1])
    for r in reports:
        if r["routing"] is not None and all(str(l) in r.get("consumers", {}) for l in r["layers"]):
            written.append(os.path.join(out_dir, f"routing_{safe_name(r['label'])}.png"))
            draw_routing(r, r["layers"], written[-1])
    return written


#################################################################################
#                       Training curves and power spectra                       #
#################################################################################

def draw_curves(runs, path, title):
    """Left: EMA validation loss against step. Right: its difference from the mean of the first label's runs,
    in percent, where that label's own seeds show the noise. runs: [(label, [(step, EMA validation loss)])]; one
    colour per label, a line per run."""
    curves = {}
    for label, curve in runs:
        curves.setdefault(label, []).append(curve)
    reference_label = next(iter(curves))
    reference = {s: statistics.mean(dict(c)[s] for c in curves[reference_label] if s in dict(c))
                 for s, _ in curves[reference_label][0]}
    relative = {label: [[(s, 100 * (v / reference[s] - 1)) for s, v in curve if s in reference] for curve in per_label]
                for label, per_label in curves.items()}
    image = Image.new("RGB", (1400, 560 + LEGEND_ROW * math.ceil(len(curves) / 4)), "white")
    colours = {label: PALETTE[k % len(PALETTE)] for k, label in enumerate(curves)}
    panels = ((curves, "EMA validation loss", "validation loss (EMA)"),
              (relative, f"difference from {reference_label} (mean of its runs)", "difference in validation loss, %"))
    for p, (series, panel_title, y_label) in enumerate(panels):
        values = [v for per_label in series.values() for curve in per_label for _, v in curve]
        steps = [s for per_label in series.values() for curve in per_label for s, _ in curve]
        y_range, y_ticks = nice_ticks(min(values), max(values))
        x_range, x_ticks = nice_ticks(0, max(steps))
        axes = Axes(image, (p * 700 + 100, 60, p * 700 + 680, 480), x_range, y_range)
        axes.frame(x_ticks, y_ticks, "training step", y_label, panel_title)
        for label, per_label in series.items():
            for curve in per_label:
                axes.line([s for s, _ in curve], [v for _, v in curve], colours[label])
    centered_text(ImageDraw.Draw(image), (700, 16), title, font(18))
    legend(image, 540, [(colours[label], f"{label} ({len(per_label)} run{'s' * (len(per_label) > 1)})")
                        for label, per_label in curves.items()], 4)
    image.save(path)


def draw_spectrum(rows, path, high_frequency):
    """Radially averaged power (log) against frequency, one line per set, the real images first (black), and a
    grey line at high_frequency, where the share diagnose.py compares begins."""
    image = Image.new("RGB", (760, 560 + LEGEND_ROW * len(rows)), "white")  # one legend row per set: long labels
    values = [v for row in rows for v in row["power"] if v > 0]
    y_range, y_ticks = nice_ticks(min(values), max(values), log=True)
    x_range, x_ticks = nice_ticks(0, 0.5)
    axes = Axes(image, (110, 60, 730, 470), x_range, y_range, log_y=True)
    axes.frame(x_ticks, y_ticks, "spatial frequency (cycles / pixel)", "power (log scale)",
               "radially averaged power spectrum")
    left, _ = axes.px(high_frequency, y_range[0])
    axes.draw.line([(left, 60), (left, 470)], fill=(150, 150, 150), width=1)
    colours = [(0, 0, 0)] + [PALETTE[k % len(PALETTE)] for k in range(len(rows) - 1)]
    for row, colour in zip(rows, colours):
        axes.line(row["frequency"], row["power"], colour)
    legend(image, 540, [(c, f"{row['label']}: high-frequency ratio {row['ratio']:.3f}")
                        for row, c in zip(rows, colours)], 1)
    centered_text(ImageDraw.Draw(image), (380, 16), f"energy above {high_frequency} cycles/pixel (grey line) "
                  f"relative to the real images", font(16))
    image.save(path)
