"""The protocol leaderboard of a ``clsuite tune`` directory: test-seed means with 95% intervals, paired effects with
Holm-adjusted p-values, matched plasticity, equal compute, reference rows and the validation trade-off figure."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from tabulate import tabulate

from ..atomic import save_figure, write_text
from ..errors import UserError
from ..metrics import METRICS
from ..records import RunRecord, item_scores
from ..stats import holm, min_detectable_effect, paired_test, t_interval, two_way_bootstrap
from .leaderboard import _escape, category_retention, load_records
from .plots import _new_figure

SHOWN = ("acc", "bwt", "fwt", "forgetting", "plasticity", "probe_retention")  # the table's metrics
EFFECTS = ("acc", "forgetting", "probe_retention")  # the paired comparisons' metrics
N_BOOT = 2000


@dataclass
class Row:
    """One test row: a tuned strategy in a role (selected, matched, budget), its records by seed."""
    name: str
    role: str
    spec: str
    settings: dict[str, Any]
    records: dict[int, RunRecord]
    seeds: list[int]  # the test seeds it must have


def tuned_streams(path: Path) -> list[str]:
    """The streams of a ``clsuite tune`` directory (``<path>/<stream>/selected.yaml`` beside ``<path>/test``)."""
    path = Path(path)
    if not (path / "test").is_dir():
        return []
    return sorted(p.parent.name for p in path.glob("*/selected.yaml"))


def read_selection(tune_dir: Path, stream: str) -> dict[str, Any]:
    path = Path(tune_dir) / stream / "selected.yaml"
    if not path.exists():
        raise UserError(f"{path} not found: run 'clsuite tune GRID --out {tune_dir}' first")
    return yaml.safe_load(path.read_text())


def test_rows(tune_dir: Path, stream: str, selection: dict[str, Any]) -> list[Row]:
    """Every ``runs:`` entry of the selection with its test records (each role of an entry is a row)."""
    complete, failed = load_records([Path(tune_dir) / "test" / stream])
    base = set(selection["selection"]["test_seeds"])
    if failed:
        raise UserError(f"{len(failed)} test run(s) failed, e.g. {failed[0].strategy} seed {failed[0].seed}: the "
                        "protocol reports every selected setting or none; see its record")
    rows = []
    for entry in selection["runs"]:
        tag = ",".join(f"{k}={v}" for k, v in sorted(entry["set"].items()))
        seeds = base | set(entry.get("seeds", []))
        recs = {r.seed: r for r in complete if r.strategy == entry["strategy"] and _same_tag(r.tag, tag)
                and r.seed in seeds}  # records of other test seeds (an earlier --test-seeds) are not this table's
        for role in entry["roles"]:
            role, _, name = role.partition(":")
            rows.append(Row(name or entry["name"], role, entry["strategy"], entry["set"], recs, sorted(seeds)))
    return rows


def _same_tag(a: str, b: str) -> bool:
    """Tags compare by value: ``lr=0.001`` and ``lr=1e-3`` are one setting."""
    def value(v: str) -> Any:
        v = yaml.safe_load(v)
        try:
            return float(v) if isinstance(v, str) else v
        except ValueError:
            return v

    def parse(t: str) -> dict[str, Any]:
        return {k: value(v) for k, _, v in (p.partition("=") for p in t.split(",") if p)}
    return parse(a) == parse(b)


def _metric(record: RunRecord, m: str) -> float:
    v = record.metrics.get(m)
    return math.nan if v is None else float(v)


def _ci(x: list[float]) -> str:
    x = [v for v in x if not math.isnan(v)]
    if not x:
        return "–"
    iv = t_interval(x)
    return f"{iv.mean:.3f} ± {iv.half_width:.3f}" if iv.n > 1 else f"{iv.mean:.3f}"


def _items(records: list[RunRecord]) -> list[dict[str, np.ndarray]] | None:
    runs = [item_scores(r) for r in records]
    return None if any(r is None for r in runs) else [{k: np.asarray(v, float) for k, v in r.items()} for r in runs]


def _metric_fn(record: RunRecord, m: str):
    """``metric(run_means)`` for the bootstrap: R and P rebuilt from per-row item means."""
    fn = METRICS.get(m).fn

    def metric(means: dict[str, np.ndarray]) -> float:
        R = np.stack([means[t] for t in record.tasks], axis=1)
        P = np.stack([means[p] for p in record.probes], axis=1) if record.probes else None
        v = fn(R, P)
        return math.nan if v is None else float(v)
    return metric


def _boot(a: list[RunRecord], b: list[RunRecord] | None, m: str) -> str:
    """± half-width of the two-way (items and seeds) bootstrap interval, or – without per-item results."""
    ia, ib = _items(a), _items(b) if b is not None else None
    if ia is None or (b is not None and ib is None) or len(a) < 2:
        return "–"
    iv = two_way_bootstrap(ia, ib, metric=_metric_fn(a[0], m), n_boot=N_BOOT, seed=0)
    return f"± {iv.half_width:.3f}" if math.isfinite(iv.half_width) else "–"


def main_table(rows: list[Row], selection: dict[str, Any], role: str = "selected") -> tuple[str, list[dict]]:
    """Each strategy at its ``role`` setting: n, each metric's mean ± 95% t half-width over test seeds, the
    items-and-seeds half-width of probe retention and forgetting; † marks a learning rate at the edge of its grid."""
    per = selection["selection"]["strategies"]
    table, csv = [], []
    for r in [r for r in rows if r.role == role]:
        recs = list(r.records.values())
        vals = {m: [_metric(x, m) for x in recs] for m in SHOWN}
        edge = " †" if _at_edge(per.get(r.name, {}), r.settings) else ""
        cells = [_escape(r.name), _escape(_setting(r)) + edge, len(recs)] + [_ci(vals[m]) for m in SHOWN]
        cells += [_boot(recs, None, "probe_retention"), _boot(recs, None, "forgetting")]
        table.append(cells)
        csv.append({"table": role, "strategy": r.name, "setting": _setting(r), "lr_at_grid_edge": bool(edge),
                    "n": len(recs), **{m: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
                                        for m, v in vals.items()}})  # a metric no run has (BWT of one task): NaN
    head = ["strategy", "setting", "n"] + [f"{m} {_arrow(m)} (95% CI)" for m in SHOWN] + [
        "probe_retention items+seeds", "forgetting items+seeds"]
    return tabulate(table, headers=head, tablefmt="github", disable_numparse=True), csv


def _at_edge(info: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether the chosen learning rate is the smallest or largest of the strategy's candidates (of 3 or more)."""
    lrs = sorted({c["set"]["lr"] for c in info.get("candidates", []) if "lr" in c.get("set", {})})
    return len(lrs) >= 3 and settings.get("lr") in (lrs[0], lrs[-1])


def _arrow(m: str) -> str:
    return "↑" if METRICS.get(m).higher_is_better else "↓"


def _setting(r: Row) -> str:
    """The strategy's own knobs (its spec, when it has any) and its training settings."""
    return ", ".join(x for x in [r.spec if "(" in r.spec else "", *(f"{k}={v}" for k, v in r.settings.items())] if x)


def references(rows: list[Row]) -> str:
    """Zero-shot (row 0 of the test records) and joint training, where tuned."""
    any_rec = next((x for r in rows for x in r.records.values()), None)
    out = []
    if any_rec is not None:
        acc0 = float(np.mean(any_rec.R[0]))
        out.append(["zero-shot (before training)", 1, f"{acc0:.3f}", "0 (by definition)"])
    for r in [r for r in rows if r.name == "joint" and r.role == "selected"]:
        recs = list(r.records.values())
        out.append([f"joint [{_escape(_setting(r))}]", len(recs), _ci([_metric(x, "acc") for x in recs]),
                    _ci([_metric(x, "probe_retention") for x in recs])])
    return tabulate(out, headers=["reference", "n", "acc ↑ (95% CI)", "probe_retention ↑ (95% CI)"],
                    tablefmt="github", disable_numparse=True)


def categories_table(rows: list[Row], role: str = "selected") -> str:
    """Each strategy's change of general ability per probe category (TRACE's general ability delta, the paper's
    ΔAVG): mean ± 95% t half-width over test seeds of mean_p in category (P[T, p] − P[0, p])."""
    sel = [r for r in rows if r.role == role and r.records]
    cats = sorted({c for r in sel for x in r.records.values() for c in category_retention(x)})
    if not cats:
        return "No probes."
    table = [[_escape(r.name), len(r.records)] + [_ci([category_retention(x).get(c, math.nan)
                                                       for x in r.records.values()]) for c in cats] for r in sel]
    return tabulate(table, headers=["strategy", "n"] + [f"{c} ↑ (95% CI)" for c in cats], tablefmt="github",
                    disable_numparse=True)


def orders_table(rows: list[Row], role: str = "selected", metrics: tuple[str, ...] = ("acc", "bwt",
                                                                                      "probe_retention")) -> str:
    """Each strategy's means per task order (its test seeds grouped by the order they trained in); one line per
    strategy when every seed trained in one order."""
    sel = [r for r in rows if r.role == role and r.records]
    orders = sorted({tuple(x.tasks) for r in sel for x in r.records.values()})
    if len(orders) < 2:
        return "Every test seed trained the tasks in the same order."
    table = []
    for r in sel:
        for i, order in enumerate(orders):
            recs = [x for x in r.records.values() if tuple(x.tasks) == order]
            table.append([_escape(r.name), f"{i + 1}", len(recs)] + [_ci([_metric(x, m) for x in recs])
                                                                     for m in metrics])
    legend = "; ".join(f"{i + 1}: {' → '.join(map(_escape, o))}" for i, o in enumerate(orders))
    return tabulate(table, headers=["strategy", "order", "n"] + [f"{m} {_arrow(m)} (95% CI)" for m in metrics],
                    tablefmt="github", disable_numparse=True) + f"\n\nOrders: {legend}."


def paired_effects(rows: list[Row], pairs: list[tuple[str, str]], role_a: str, role_b: str,
                   kind: str) -> list[dict]:
    """Paired by test seed: A − B per metric, mean with its 95% CI, p, the two-way bootstrap half-width; ``kind``
    names the comparison's setting (selected, matched, equal compute)."""
    found = {(r.name, r.role): r for r in rows}
    res: list[dict] = []
    for a, b in pairs:  # at matched plasticity B may have been matched to A (``matched@A``)
        ra, rb = found.get((a, role_a)), found.get((b, f"{role_b}@{a}")) or found.get((b, role_b))
        if ra is None or rb is None:
            continue
        seeds = sorted(set(ra.records) & set(rb.records))
        xa, xb = [ra.records[s] for s in seeds], [rb.records[s] for s in seeds]
        for m in EFFECTS:
            x, y = [_metric(r, m) for r in xa], [_metric(r, m) for r in xb]
            if len(seeds) < 2 or any(math.isnan(v) for v in x + y):
                continue
            t = paired_test(x, y)
            res.append({"comparison": f"{a} − {b}", "kind": kind, "metric": m, "n": t.n, "diff": t.mean,
                        "lo": t.lo, "hi": t.hi, "p": t.p, "sd": t.sd, "boot": _boot(xa, xb, m)})
    return res


def adjust(res: list[dict]) -> list[dict]:
    """Holm-adjusted p and the minimum detectable effect (power 0.8, Bonferroni level) over ``res``, per metric."""
    for m in EFFECTS:
        mine = [e for e in res if e["metric"] == m]
        for e, adj in zip(mine, holm([e["p"] for e in mine])):
            e["holm"] = adj
            e["mde"] = min_detectable_effect(e["sd"], e["n"], m=len(mine))
    return res


def effects_table(res: list[dict]) -> str:
    table = [[_escape(e["comparison"]), e["metric"], e["n"], f"{e['diff']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]",
              e["boot"], _p(e["p"]), _p(e["holm"]) + (" *" if e["holm"] < 0.05 else ""),
              f"{e['mde']:.3f}" if e["sd"] > 0 else "– (no spread)"]
             for e in res]
    head = ["comparison", "metric", "n", "mean diff [95% CI]", "items+seeds", "p", "Holm p", "MDE (power 0.8)"]
    return tabulate(table, headers=head, tablefmt="github", disable_numparse=True)


def effects(rows: list[Row], pairs: list[tuple[str, str]], role_a: str, role_b: str) -> tuple[str, list[dict]]:
    """``paired_effects`` of ``pairs`` adjusted among themselves, as a table and rows."""
    res = adjust(paired_effects(rows, pairs, role_a, role_b, role_a))
    return effects_table(res), res


def _p(p: float) -> str:
    return "–" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def matched_table(rows: list[Row], selection: dict[str, Any]) -> str:
    """Each strategy at the setting whose validation plasticity is closest to the reference's from above; one that
    never reaches it at its most plastic setting, beside the reference's setting matched to it."""
    per, ref = selection["selection"]["strategies"], selection["selection"]["reference"]
    found = {(r.name, r.role): r for r in rows}
    out = []
    for name, info in per.items():
        if "budget" in info or name == "joint" or "matched" not in info:
            continue
        pairs = [(name, found.get((name, "matched")), info["matched"])]
        if "matched_reference" in info:
            pairs.append((f"{ref} (matched to {name})", found.get((ref, f"matched@{name}")), info["matched_reference"]))
        for label, r, cand in pairs:
            if r is None:
                out.append([_escape(label), "not run", "", "", "", "", ""])
                continue
            recs = list(r.records.values())
            out.append([_escape(label), _escape(_setting(r)), f"{cand['val']['plasticity']:.3f}", len(recs),
                        _ci([_metric(x, "plasticity") for x in recs]),
                        _ci([_metric(x, "probe_retention") for x in recs]),
                        _ci([_metric(x, "forgetting") for x in recs])])
    head = ["strategy", "matched setting", "val plasticity", "n", "test plasticity (95% CI)",
            "test probe_retention (95% CI)", "test forgetting (95% CI)"]
    notes = [f"- {_escape(n)}: {_escape(i['matched_note'])}" for n, i in per.items() if i.get("matched_note")]
    return tabulate(out, headers=head, tablefmt="github", disable_numparse=True) + (
        "\n\n" + "\n".join(notes) if notes else "")


def plot_frontier(selection: dict[str, Any], path: Path) -> None:
    """Validation plasticity against validation probe retention: every tuned setting, each strategy's frontier
    (settings no other of its settings beats on both), its selected setting ringed."""
    fig = _new_figure((7.5, 5.5), dpi=120)
    ax = fig.add_subplot()
    per = selection["selection"]["strategies"]
    for k, (name, info) in enumerate((n, i) for n, i in per.items() if "budget" not in i):
        pts = [(c["val"]["plasticity"], c["val"].get("probe_retention")) for c in info["candidates"]]
        pts = [(x, y) for x, y in pts if y is not None]
        if not pts:
            continue
        c, style = f"C{k % 10}", "-" if k < 10 else "--"  # past ten strategies the colours repeat, dashed
        ax.scatter(*zip(*pts), s=14, color=c, alpha=0.6, marker="o" if k < 10 else "s")
        front = sorted(p for p in pts if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts))
        ax.plot(*zip(*front), color=c, linestyle=style, linewidth=1.2, label=name)
        sel = info["selected"]["val"]
        if sel.get("probe_retention") is not None:
            ax.scatter([sel["plasticity"]], [sel["probe_retention"]], s=90, facecolors="none", edgecolors=c)
    ax.axvline(selection["selection"]["reference_val_plasticity"], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("validation plasticity ↑ (score right after learning each task)")
    ax.set_ylabel("validation probe retention ↑")
    ax.set_title(f"{selection['selection']['stream']}: trade-off of every tuned setting (ringed: selected)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    else:  # no probe has a validation part: the frontier is not measured
        ax.text(0.5, 0.5, "no probe has a validation part (val_size:)", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    save_figure(fig, path)


def publish_protocol(tune_dir: Path, stream: str, out: Path) -> str:
    """Write ``out/leaderboard.{md,csv}`` and ``out/tradeoff.png`` from a tune directory; returns the markdown."""
    selection = read_selection(tune_dir, stream)
    sel = selection["selection"]
    rows = test_rows(tune_dir, stream, selection)
    missing = [f"{r.name} ({r.role}) seed {', '.join(map(str, sorted(set(r.seeds) - set(r.records))))}"
               for r in rows if set(r.seeds) - set(r.records)]
    if missing:
        raise UserError(f"test records missing for {', '.join(missing)}: run 'clsuite tune' again to finish them")
    names = [n for n in sel["strategies"] if "budget" not in sel["strategies"][n]]
    family = [tuple(f.split(" - ")) for f in sel["family"]]
    main, csv = main_table(rows, selection)
    budget_pairs = [tuple(e.split(" -> ")[1].split(" - ")) for e in sel["equal_compute"]]
    primary = adjust(paired_effects(rows, family, "selected", "selected", "selected")
                     + paired_effects(rows, family, "matched", "matched", "matched")
                     + paired_effects(rows, budget_pairs, "selected", "selected", "equal compute"))
    eff_rows = primary
    eff, matched_eff, equal = (effects_table([e for e in primary if e["kind"] == k])
                               for k in ("selected", "matched", "equal compute"))
    secondary = [tuple(f.split(" - ")) for f in sel.get("secondary", [])]
    second, second_rows = effects(rows, secondary, "selected", "selected")
    ns = sorted({len(r.records) for r in rows})
    n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}; each row's n is in its table"
    md = "\n".join([
        f"# Leaderboard: {_escape(stream)} (protocol)", "",
        f"Each strategy's setting was selected on the validation parts by the rule `{sel['rule']['name']}` over tuning "
        f"seeds {sel['tuning_seeds']}; every number below is on the test parts over test seeds {sel['test_seeds']}"
        + (f", the rows the family compares also over {sel['primary_seeds']}" if sel.get("primary_seeds") else "")
        + f" (n = {n} per row)."
        f" `mean ± h`: h is the half-width of the 95% Student t interval over test seeds; "
        "`items+seeds`: half-width of the 95% two-way bootstrap interval over evaluation items and seeds. "
        f"{len(names)} tuned strategies.", "",
        "## Selected settings", "", main, "", "†: the selected learning rate is at the edge of the grid tried; a "
        "wider grid might have chosen otherwise.", "",
        "## Reference rows", "", references(rows), "",
        "## General ability by probe category (selected settings)", "", categories_table(rows), "",
        "## Per task order (selected settings)", "", orders_table(rows), "",
        "## Paired effects (selected settings)", "",
        "Paired by test seed. Holm-adjusted over the declared family (its comparisons at the selected settings, at "
        "matched plasticity and at equal compute, below, together), per metric; `*`: distinguishable from zero at "
        "0.05 after adjustment. MDE: the smallest true difference a paired t test over these n seeds detects with "
        "power 0.8 at the adjusted level, given the observed spread of differences; `no spread`: every paired "
        "difference is the same (e.g. both sides at the floor of the metric), so no effect size can be read.", "",
        eff, "",
        "## Matched plasticity", "",
        f"Reference: {sel['reference']} at its selected setting, validation plasticity "
        f"{sel['reference_val_plasticity']:.3f}; each strategy at its setting closest to it from above.", "",
        matched_table(rows, selection), "", "Paired effects at matched plasticity:", "", matched_eff, "",
        "## Equal compute", "",
        "Each comparison A − B with B trained as many times longer as A's measured time per step (its learning rate "
        "re-tuned at that budget): " + (", ".join(sel["equal_compute"]) or "none needed") + ".", "", equal, "",
        *(["## Secondary comparisons", "", "Exploratory: Holm-adjusted among themselves, not with the family.", "",
           second, ""] if secondary else []),
        "![trade-off](tradeoff.png)", ""])
    out = Path(out)
    write_text(out / "leaderboard.md", md)
    write_text(out / "leaderboard.csv", pd.DataFrame(csv + [{"table": "effect", **e} for e in eff_rows]
                                                     + [{"table": "secondary", **e} for e in second_rows])
               .to_csv(index=False))
    plot_frontier(selection, out / "tradeoff.png")
    return md
