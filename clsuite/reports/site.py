"""A static web leaderboard that opens from disk: an index of streams, a page per stream and per run (docs/site.md)."""
from __future__ import annotations

import html
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..atomic import write_dir, write_json, write_text
from ..errors import UserError
from ..metrics import METRICS, shown_metrics
from ..records import RunRecord, slug
from ..stats import t_half_width
from .leaderboard import aggregate, check_found, frame, paired_effects, read_sources, row_label

MARKER = ".clsuite-site"  # in a site's root: a folder `clsuite site` may replace
SPLITS = ("test", "val")  # the order splits are listed in
COST = {"compute_multiplier": ("compute ×", 2), "extra_memory_bytes": ("extra MiB", 1)}
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


@dataclass
class Run:
    """A record, the file (or ``archive.zip:member``) it was read from, and its page's name (``runs/<name>.html``)."""
    record: RunRecord
    source: Path | str
    name: str


def esc(x: Any) -> str:
    """Text from a record, escaped for HTML text and attribute values."""
    return html.escape(str(x), quote=True)


def fmt(v: Any, digits: int = 3) -> str:
    """A number at ``digits`` decimals, ``–`` for a missing one."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _unique(base: str, taken: set[str]) -> str:
    """``base``, or ``base-2``, ``base-3``, ... if taken (compared without case, for case-blind file systems)."""
    name, k = base or "x", 2
    while name.lower() in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name.lower())
    return name


def load_runs(record_dirs: list[Path]) -> list[Run]:
    """Every record under ``record_dirs`` (directories, files, .zip archives), checked as a leaderboard checks them,
    one split at a time."""
    found = read_sources(list(record_dirs))
    if not found:
        raise UserError(f"no run records under {', '.join(map(str, record_dirs))}: run 'clsuite run' first")
    for split in sorted({x.record.split for x in found}):  # each split is a leaderboard of its own
        check_found([x for x in found if x.record.split == split])
    taken: set[str] = set()
    order = sorted(((x.where, x.record) for x in found),
                   key=lambda x: (x[1].stream, x[1].strategy, x[1].tag, x[1].split, x[1].seed))
    return [Run(r, f, _unique(slug(f"{r.stream}-{row_label(r.strategy, r.tag)}-{r.split}-seed{r.seed}"), taken))
            for f, r in order]


def protocol_streams(record_dirs: list[Path]) -> list[tuple[Path, str]]:
    """(tune directory, stream) for every ``<dir>/<stream>/selected.yaml`` among the given directories."""
    return [(Path(d), sel.parent.name) for d in record_dirs if Path(d).is_dir()
            for sel in sorted(Path(d).glob("*/selected.yaml"))]


# ---- drawing: heat maps, trade-off scatter, loss curves

def heatmap(matrix: list[list[float]], rows: list[str], cols: list[str], caption: str) -> str:
    """An HTML table whose cells' background runs from white (the matrix's lowest value) to blue (its highest)."""
    vals = [v for row in matrix for v in row]
    if not vals:
        return f"<p>{esc(caption)}: none.</p>"
    lo, hi = min(vals), max(vals)
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for label, row in zip(rows, matrix):
        cells = []
        for v in row:
            t = (v - lo) / (hi - lo) if hi > lo else 0.5
            rgb = [round(a + (b - a) * t) for a, b in ((247, 8), (251, 48), (255, 107))]
            ink = "#fff" if t > 0.55 else "#111"
            cells.append(f'<td data-value="{v!r}" style="background:rgb({rgb[0]},{rgb[1]},{rgb[2]});color:{ink}">'
                         f"{v:.3f}</td>")
        body.append(f"<tr><th>{esc(label)}</th>{''.join(cells)}</tr>")
    return (f'<table class="heatmap"><caption>{esc(caption)} (white {lo:.3f} … blue {hi:.3f})</caption>'
            f"<thead><tr><th></th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _span(vals: list[float]) -> tuple[float, float]:
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.08 or max(abs(lo) * 0.1, 0.05)
    return lo - pad, hi + pad


def _tick(v: float, span: float) -> float:
    return 0.0 if abs(v) < 1e-9 * span else v  # not 6.9e-18 for a rounding error around zero


def _finite(x: Any) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else math.nan


def tradeoff_svg(points: list[tuple[str, float, float, float, float]], xlabel: str, ylabel: str) -> str:
    """An inline SVG scatter of (label, x, x half-width, y, y half-width), one colour per point, with CI bars."""
    pts = [(lab, x, 0.0 if math.isnan(xh) else xh, y, 0.0 if math.isnan(yh) else yh)
           for lab, x, xh, y, yh in points if not (math.isnan(x) or math.isnan(y))]
    if not pts:
        return f"<p>No runs with both {esc(xlabel)} and {esc(ylabel)}.</p>"
    W, H, L, R, T, B = 440, 300, 64, 16, 14, 46
    x0, x1 = _span([x + s * h for _, x, h, _, _ in pts for s in (-1, 1)])
    y0, y1 = _span([y + s * h for _, _, _, y, h in pts for s in (-1, 1)])

    def sx(v: float) -> float:
        return L + (v - x0) / (x1 - x0) * (W - L - R)

    def sy(v: float) -> float:
        return H - B - (v - y0) / (y1 - y0) * (H - T - B)

    out = [(f'<svg class="tradeoff" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
            f'aria-label="{esc(ylabel)} against {esc(xlabel)}">'),
           f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="#fafafa" stroke="#999"/>']
    for k in range(3):
        xv, yv = _tick(x0 + (x1 - x0) * (k + 0.5) / 3, x1 - x0), _tick(y0 + (y1 - y0) * (k + 0.5) / 3, y1 - y0)
        out.append(f'<text x="{sx(xv):.1f}" y="{H - B + 14}" text-anchor="middle" class="tick">{xv:.3g}</text>'
                   f'<text x="{L - 4}" y="{sy(yv) + 4:.1f}" text-anchor="end" class="tick">{yv:.3g}</text>')
    out.append(f'<text x="{(L + W - R) / 2:.0f}" y="{H - 8}" text-anchor="middle">{esc(xlabel)}</text>'
               f'<text transform="translate(14 {(T + H - B) / 2:.0f}) rotate(-90)" text-anchor="middle">'
               f"{esc(ylabel)}</text>")
    for k, (lab, x, xh, y, yh) in enumerate(pts):
        c, px, py = COLOURS[k % len(COLOURS)], sx(x), sy(y)
        right = px < (L + W - R) / 2  # the label on the side with room: it never leaves the figure
        out.append(f'<g class="point"><title>{esc(lab)}: {x:.3f} ± {xh:.3f}, {y:.3f} ± {yh:.3f}</title>'
                   f'<line x1="{sx(x - xh):.1f}" y1="{py:.1f}" x2="{sx(x + xh):.1f}" y2="{py:.1f}" stroke="{c}"/>'
                   f'<line x1="{px:.1f}" y1="{sy(y - yh):.1f}" x2="{px:.1f}" y2="{sy(y + yh):.1f}" stroke="{c}"/>'
                   f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="{c}"/>'
                   f'<text x="{px + (6 if right else -6):.1f}" y="{py - 6 - 11 * (k % 3):.1f}" class="label" '
                   f'text-anchor="{"start" if right else "end"}">{esc(lab)}</text></g>')
    return "".join(out) + "</svg>"


def loss_svg(curve: list[Any], title: str) -> str:
    """An inline SVG polyline of one experience's loss curve (non-finite values left out)."""
    ys = [(i, v) for i, v in enumerate(curve) if isinstance(v, (int, float)) and math.isfinite(v)]
    if not ys:
        return f'<p class="loss">{esc(title)}: no loss curve.</p>'
    W, H, P = 240, 120, 8
    lo, hi = _span([v for _, v in ys])
    n = max(len(curve) - 1, 1)
    pts = " ".join(f"{P + i / n * (W - 2 * P):.1f},{H - P - (v - lo) / (hi - lo) * (H - 2 * P - 14):.1f}"
                   for i, v in ys)
    return (f'<figure class="loss"><svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
            f'aria-label="loss curve: {esc(title)}"><rect width="{W}" height="{H}" fill="#fafafa" stroke="#ccc"/>'
            f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>'
            f'<text x="{P}" y="14" class="tick">{ys[0][1]:.3g} → {ys[-1][1]:.3g}</text></svg>'
            f"<figcaption>{esc(title)}</figcaption></figure>")


# ---- markdown (a protocol leaderboard.md) to HTML

def _inline(text: str) -> str:
    """One line of markdown text as HTML: record text in it is already HTML-escaped once, so unescape, then escape."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(html.unescape(text.strip())))


def _md_table(lines: list[str]) -> str:
    rows = [re.sub(r"^\||\|$", "", ln.strip()).split("|") for ln in lines]  # one outer pipe each side
    sep = len(rows) > 1 and all(re.fullmatch(r"\s*:?-+:?\s*", c) for c in rows[1])
    head, body = (rows[0], rows[2:]) if sep else ([], rows)
    thead = f"<thead><tr>{''.join(f'<th>{_inline(c)}</th>' for c in head)}</tr></thead>" if head else ""
    tbody = "".join(f"<tr>{''.join(f'<td>{_inline(c)}</td>' for c in r)}</tr>" for r in body)
    return f'<div class="wide"><table class="sortable">{thead}<tbody>{tbody}</tbody></table></div>'


def markdown_html(md: str, assets: Path | None = None, prefix: str = "") -> str:
    """Headings, paragraphs, github tables, `code` and ``![alt](file)`` images (a file in ``assets``, linked as
    ``prefix/file``) of a leaderboard.md as HTML; everything else is text."""
    out: list[str] = []
    para: list[str] = []
    lines = md.splitlines()

    def flush() -> None:
        if para:
            out.append(f"<p>{' '.join(_inline(p) for p in para)}</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i].strip()
        image = re.fullmatch(r"!\[([^\]]*)\]\(([\w.-]+)\)", line)
        heading = re.match(r"(#{1,5})\s+(.*)", line)
        if line.startswith("|"):
            flush()
            j = i
            while j < len(lines) and lines[j].strip().startswith("|"):
                j += 1
            out.append(_md_table(lines[i:j]))
            i = j
            continue
        if not line:
            flush()
        elif heading:
            flush()
            level = min(len(heading.group(1)) + 2, 6)  # under the page's own h1 and the section's h2
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif image and assets is not None and (Path(assets) / image.group(2)).is_file():
            flush()
            out.append(f'<img src="{esc(prefix + image.group(2))}" alt="{_inline(image.group(1))}">')
        else:
            para.append(line)
        i += 1
    flush()
    return "\n".join(out)


# ---- pages

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#111}
table{border-collapse:collapse;margin:.6em 0 1.2em}th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}
table.sortable thead th{cursor:pointer;background:#eef;user-select:none}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.heatmap td{text-align:right;min-width:4em}
input.filter{font-size:14px;padding:4px 8px;width:22em;margin:.4em 0}pre{background:#f6f6f6;padding:.6em;overflow:auto}
figure.loss{display:inline-block;margin:0 1em 1em 0}figure.loss figcaption{font-size:12px}
.figures{display:flex;flex-wrap:wrap;gap:1em}svg text{font-size:11px}svg text.tick{font-size:10px;fill:#444}
svg text.label{font-size:10px}.wide{overflow-x:auto}img{max-width:100%}.note{color:#555}.failed{color:#b00}
"""

JS = r"""// clsuite site: click a column header to sort its table (numbers as numbers, again to reverse); type in the
// filter box to hide the rows of every sortable table that do not contain each word typed.
(function () {
  "use strict";
  function key(cell) {
    if (!cell) return "";
    return (cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent).trim();
  }
  function missing(s) { return s === "" || s === "–" || s === "-"; }
  function number(s) {
    return /^[-+−]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?/i.test(s) ? parseFloat(s.replace("−", "-")) : NaN;
  }
  function compare(a, b) {
    var x = number(a), y = number(b);
    if (!isNaN(x) && !isNaN(y)) return x - y;
    if (!isNaN(x) !== !isNaN(y)) return isNaN(x) ? 1 : -1;
    return a.localeCompare(b, undefined, {numeric: true, sensitivity: "base"});
  }
  function sortBy(th) {
    var table = th.closest("table"), body = table.tBodies[0];
    if (!body) return;
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var rows = Array.prototype.slice.call(body.rows).map(function (row, i) {
      return {row: row, key: key(row.cells[col]), i: i};
    });
    rows.sort(function (a, b) {
      var ma = missing(a.key), mb = missing(b.key);
      if (ma || mb) return ma === mb ? a.i - b.i : (ma ? 1 : -1);  // no value: last either way
      return (ascending ? compare(a.key, b.key) : compare(b.key, a.key)) || a.i - b.i;
    });
    rows.forEach(function (r) { body.appendChild(r.row); });
  }
  document.addEventListener("click", function (e) {
    var th = e.target.closest("table.sortable thead th");
    if (th) sortBy(th);
  });
  document.addEventListener("keydown", function (e) {
    var th = e.target.closest && e.target.closest("table.sortable thead th");
    if (th && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); sortBy(th); }
  });
  document.addEventListener("input", function (e) {
    if (!e.target.matches("input.filter")) return;
    var words = e.target.value.toLowerCase().split(/\s+/).filter(Boolean);
    document.querySelectorAll("table.sortable tbody tr").forEach(function (row) {
      var text = row.textContent.toLowerCase();
      row.hidden = !words.every(function (w) { return text.indexOf(w) >= 0; });
    });
  });
  document.querySelectorAll("table.sortable thead th").forEach(function (th) {
    th.tabIndex = 0;
    th.title = "sort by this column (again to reverse)";
  });
})();
"""

FILTER = '<p><input class="filter" type="search" placeholder="filter rows: type words…" aria-label="filter rows"></p>'


def page(title: str, body: str, root: str = "../") -> str:
    """A whole HTML page whose stylesheet and script are the site's own files under ``root``."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{esc(title)}</title>\n'
            f'<link rel="stylesheet" href="{root}site.css">\n</head>\n<body>\n{body}\n'
            f'<script src="{root}site.js"></script>\n</body>\n</html>\n')


def table(head: list[str], rows: list[list[str]], ident: str = "") -> str:
    """A sortable table; ``head`` is escaped, the cells are HTML already (``<td>`` included)."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    id_ = f' id="{ident}"' if ident else ""
    return (f'<div class="wide"><table class="sortable"{id_}><thead><tr>{th}</tr></thead><tbody>{body}</tbody>'
            "</table></div>")


def td(text: Any, sort: Any = None, num: bool = False) -> str:
    """A cell of escaped text, with its numeric sort key (``data-sort``) where given."""
    key = "" if sort is None else f' data-sort="{"" if _nan(sort) else esc(repr(float(sort)))}"'
    return f'<td{key}{" class=num" if num else ""}>{esc(text)}</td>'


def _nan(v: Any) -> bool:
    try:
        return v is None or math.isnan(float(v))
    except (TypeError, ValueError):
        return True


def _metric_cell(mean: Any, std: Any, n: int, digits: int = 3) -> str:
    if _nan(mean):
        return td("–", math.nan, num=True)
    hw = t_half_width(float(std), n) if not _nan(std) else math.nan
    text = f"{mean:.{digits}f}" if math.isnan(hw) else f"{mean:.{digits}f} ± {hw:.{digits}f}"
    return td(text, mean, num=True)


def _arrow(m: str) -> str:
    return "↑" if METRICS.get(m).higher_is_better else "↓"


def _aggregates(runs: list[Run]) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Per split: (mean and std per strategy and tag, one row per run) of the complete runs."""
    out = {}
    for split in SPLITS:
        recs = [r.record for r in runs if r.record.split == split and r.record.status == "complete"]
        if recs:
            df = frame(recs)
            out[split] = (aggregate(df), df)
    return out


def stream_page(stream: str, runs: list[Run], protocol: str) -> str:
    """The page of one stream: ranked rows per split, paired effects of adding sam, trade-off figures, its runs."""
    aggs = _aggregates(runs)
    metrics = [m for m in shown_metrics() if any(m in a and a[m].notna().any() for a, _ in aggs.values())]
    head = ["strategy", "tag", "split", "n", *(f"{m} {_arrow(m)}" for m in metrics), *(v[0] for v in COST.values())]
    rows, effects, figures = [], [], []
    for split, (agg, df) in aggs.items():
        for _, a in agg.iterrows():
            n = int(a["n"])
            rows.append([td(a["strategy"]), td(a["tag"]), td(split), td(n, n, num=True),
                         *(_metric_cell(a.get(m), a.get(f"{m}_std"), n) for m in metrics),
                         *(_metric_cell(a.get(c), math.nan, n, d) for c, (_, d) in COST.items())])
        eff = paired_effects(df)
        for _, e in eff.iterrows():
            effects.append([td(split), td(e["comparison"]), td(int(e["n"]), int(e["n"]), num=True),
                            *(td(e.get(m) if isinstance(e.get(m), str) else "–", num=True) for m in metrics)])
        figures.append(_tradeoffs(split, agg))
    body = [f'<p><a href="../index.html">← all streams</a></p><h1>{esc(stream)}</h1>', FILTER]
    if rows:
        body += ["<h2>Leaderboard</h2>",
                 ('<p class="note">Mean ± half-width of the 95% Student t interval over seeds (n runs; no interval '
                  "for n = 1); ↑ higher is better, ↓ lower is better. Click a column header to sort.</p>"),
                 table(head, rows, "leaderboard")]
    if effects:
        body += ["<h2>Effect of adding sam</h2>",
                 ('<p class="note">Paired by seed: mean per-seed difference ± the half-width of its 95% t interval '
                  "(the paired t p-value, not adjusted for multiple comparisons).</p>"),
                 table(["split", "comparison", "n", *metrics], effects, "effects")]
    body += figures
    if protocol:
        body += ['<h2 id="protocol">Protocol leaderboard</h2>', protocol]
    body += ["<h2>Runs</h2>", _runs_table(runs)]
    return page(f"clsuite: {stream}", "\n".join(body))


def _tradeoffs(split: str, agg: pd.DataFrame) -> str:
    panels = []
    for x in ("probe_retention", "forgetting"):
        if x not in agg or "acc" not in agg:
            continue
        pts = [(row_label(a["strategy"], a["tag"]), _finite(a[x]), t_half_width(_finite(a[f"{x}_std"]), int(a["n"])),
                _finite(a["acc"]), t_half_width(_finite(a["acc_std"]), int(a["n"]))) for _, a in agg.iterrows()]
        panels.append(tradeoff_svg(pts, f"{x} {_arrow(x)}", f"acc {_arrow('acc')}"))
    if not panels:
        return ""
    return (f'<h2>Trade-off ({esc(split)} split)</h2><p class="note">One point per row, bars: 95% t intervals.</p>'
            f'<div class="figures">{"".join(panels)}</div>')


def _runs_table(runs: list[Run]) -> str:
    ms = ["acc", "forgetting", "probe_retention"]
    rows = []
    for run in runs:
        r = run.record
        status = '<td class="failed">failed</td>' if r.status == "failed" else "<td>complete</td>"
        rows.append([td(r.strategy), td(r.tag), td(r.split), td(r.seed, r.seed, num=True), status,
                     *(td(fmt(r.metrics.get(m)), r.metrics.get(m), num=True) for m in ms),
                     f'<td><a href="../runs/{esc(run.name)}.html">{esc(run.name)}</a></td>'])
    return table(["strategy", "tag", "split", "seed", "status", *ms, "page"], rows, "runs")


def run_page(run: Run, stream_href: str) -> str:
    """The page of one run: matrices as heat maps, loss curves, metrics, cost, provenance, config, its record."""
    r = run.record
    title = f"{r.stream} | {row_label(r.strategy, r.tag)} | {r.split} | seed {r.seed}"
    body = [(f'<p><a href="../index.html">all streams</a> · <a href="{esc(stream_href)}">{esc(r.stream)}</a> · '
             f'<a href="{esc(run.name)}.json">the run record (JSON)</a></p>'), f"<h1>{esc(title)}</h1>",
            f"<p>model {esc(r.model)} · status {esc(r.status)}"
            + (f" · {r.wall_seconds:.1f} s" if r.wall_seconds is not None else "") + "</p>"]
    if r.status == "failed":
        body.append(f'<p class="failed">error: {esc(r.error)}</p>')
    else:
        rows = ["initial", *(f"after {t}" for t in r.tasks)]
        body += ["<h2>Metrics</h2>",
                 table(["metric", "value"], [[td(f"{k} {_arrow(k) if k in METRICS else ''}".strip()),
                                              td(fmt(_finite(v) if v is not None else None), v, num=True)]
                                             for k, v in r.metrics.items()]),
                 ('<h2>Scores</h2><p class="note">Row i: after training on the first i tasks; colour scaled to '
                  "each matrix's own range.</p><div class=\"figures\">"),
                 heatmap(r.R, rows, r.tasks, "R: task scores"), heatmap(r.P, rows, r.probes, "P: probe scores"),
                 "</div>"]
    if r.experiences:
        body += ["<h2>Training</h2>", '<div class="figures">']
        for i, e in enumerate(r.experiences):
            curve = e.get("loss_curve") if isinstance(e.get("loss_curve"), list) else []
            body.append(loss_svg(curve, f"{i + 1}. {e.get('task', '')}: loss over {e.get('steps', '?')} steps"))
        body.append("</div>")
        keys = ["task", "steps", "tokens", "train_seconds", "first_loss", "final_loss"]
        body.append(table(keys, [[td(fmt(e.get(k))) for k in keys] for e in r.experiences]))
    body += ["<h2>Cost</h2>", table(["", "value"], [[td(k), td(fmt(v), v, num=True)] for k, v in r.cost.items()]),
             "<h2>Provenance</h2>", f"<pre>{esc(_dump(r.provenance))}</pre>",
             "<h2>Config</h2>", f"<pre>{esc(_dump(r.config))}</pre>"]
    return page(f"clsuite: {title}", "\n".join(body))


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False, default=str)


def index_page(streams: dict[str, list[Run]], pages: dict[str, str], protocols: set[str]) -> str:
    """The index: one row per stream, linking to its page."""
    rows = []
    for stream, runs in streams.items():
        recs = [r.record for r in runs]
        done = sum(r.status == "complete" for r in recs)
        cells = len({(r.strategy, r.tag) for r in recs})
        rows.append([f'<td><a href="streams/{esc(pages[stream])}.html">{esc(stream)}</a></td>',
                     td(done, done, num=True), td(len(recs) - done, len(recs) - done, num=True),
                     td(cells, cells, num=True),
                     td(", ".join(s for s in SPLITS if any(r.split == s for r in recs))),
                     td("yes" if stream in protocols else "")])
    body = ["<h1>clsuite leaderboards</h1>", FILTER,
            table(["stream", "complete runs", "failed runs", "rows", "splits", "protocol"], rows, "streams")]
    return page("clsuite leaderboards", "\n".join(body), root="")


def _protocol(tune_dir: Path, stream: str, folder: Path, name: str) -> str:
    """The protocol leaderboard of ``stream`` in a tune directory, written into ``folder`` and rendered as HTML."""
    from .protocol import publish_protocol  # scipy and the bootstrap: only for tune directories
    try:
        md = publish_protocol(tune_dir, stream, folder)
    except UserError as e:
        return f'<p class="note">Not available: {esc(e)}</p>'
    links = f'<p><a href="{name}/leaderboard.md">leaderboard.md</a> · <a href="{name}/leaderboard.csv">CSV</a></p>'
    return links + markdown_html(md, folder, f"{name}/")


def _check_out(record_dirs: list[Path], out: Path) -> None:
    out = Path(out).resolve()
    for d in (Path(p).resolve() for p in record_dirs):
        if out == d or out in d.parents or d in out.parents:
            raise UserError(f"--out {out} overlaps the records at {d}: give a site folder outside the record "
                            "directories (its JSON copies would be read as records)")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise UserError(f"--out {out} exists and is not a site written by 'clsuite site': give a new or empty "
                        "folder (the site replaces it whole)")


def write_site(record_dirs: list[Path], out: Path) -> Path:
    """Write the static site of the records under ``record_dirs`` to ``out`` (replaced whole); returns index.html."""
    record_dirs = [Path(d) for d in record_dirs]
    if not record_dirs:
        raise UserError("no record directories given: pass run-record files or directories")
    _check_out(record_dirs, out)
    runs = load_runs(record_dirs)
    tunes = protocol_streams(record_dirs)
    streams: dict[str, list[Run]] = {}
    for run in runs:
        streams.setdefault(run.record.stream, []).append(run)
    for _, stream in tunes:
        streams.setdefault(stream, [])
    taken: set[str] = set()
    pages = {s: _unique(slug(s), taken) for s in streams}

    def fill(tmp: Path) -> None:
        write_text(tmp / MARKER, "written by clsuite site; `clsuite site --out` replaces this folder whole\n")
        write_text(tmp / "site.css", CSS)
        write_text(tmp / "site.js", JS)
        (tmp / "runs").mkdir()
        for stream, stream_runs in streams.items():
            dirs = [d for d, s in tunes if s == stream]  # one protocol folder per tune directory of the stream
            proto = "".join(_protocol(d, stream, tmp / "streams" / name, name) for k, d in enumerate(dirs)
                            for name in [f"{pages[stream]}-protocol" + (f"-{k + 1}" if k else "")])
            write_text(tmp / "streams" / f"{pages[stream]}.html", stream_page(stream, stream_runs, proto))
            for run in stream_runs:
                dest = tmp / "runs" / f"{run.name}.json"
                if isinstance(run.source, Path):
                    shutil.copyfile(run.source, dest)
                else:  # an archive member: the record as validated
                    write_json(dest, run.record.model_dump(mode="json"))
                write_text(tmp / "runs" / f"{run.name}.html", run_page(run, f"../streams/{pages[stream]}.html"))
        write_text(tmp / "index.html", index_page(streams, pages, {s for _, s in tunes}))

    write_dir(Path(out), fill)
    return Path(out) / "index.html"
