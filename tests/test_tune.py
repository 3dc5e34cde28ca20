"""clsuite tune: selection on validation, the test runs it reproduces, its input checks, the protocol report, joint."""
from __future__ import annotations

import json
import time
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from clsuite import tune
from clsuite.config import RunConfig
from clsuite.errors import UserError
from clsuite.fingerprint import fingerprint
from clsuite.records import SCHEMA_VERSION, find_records, read_record
from clsuite.reports.protocol import _same_tag, publish_protocol
from clsuite.streams import for_split
from clsuite.cost import time_one as real_time_one  # before fixed_clock patches it
from clsuite.sweep import Outcome, run_cells
from clsuite.tune import Rule, Scored, Setting, budget_factor, matched, same_but_lr, space

from conftest import TINY_STREAM

STREAM = "tiny-test"
SAM_COST, BASE_COST = 0.02, 0.01  # measured seconds per step, fixed by fixed_clock: sam costs 2x naive


def grid_doc(**kw) -> dict:
    """A seconds-long tuning grid on tests/data/tiny-test.yaml: 2 steps, 1 tuning seed, 2 test seeds."""
    return {"streams": [TINY_STREAM], "tuning_seeds": [100], "test_seeds": [0, 1], "set": {"steps": 2},
            "strategies": {"naive": {"lr": [1.0e-3, 3.0e-2]}, "sam": {"lr": [1.0e-3]}, "joint": {"lr": [1.0e-3]}},
            **kw}


def write_grid(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(autouse=True, scope="module")
def fixed_clock():
    """Measured costs (clsuite.cost.time_one) fixed: sam's step takes twice naive's, so the equal-compute factor does
    not depend on how busy the machine is; ``calls`` counts the measurements."""
    from clsuite import cost
    calls = []

    def fake(stream, cfg, steps):
        calls.append(cfg.strategy)
        return SAM_COST if "sam" in cfg.strategy else BASE_COST

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cost, "time_one", fake)
        yield calls


class Runner:
    """A ``run`` for run_tune: run_cells' outcomes, the cells that ran counted by split; ``run_test=False`` runs no
    test cell (reports each as skipped)."""

    def __init__(self, run_test: bool = True):
        self.run_test, self.ran, self.test_cells = run_test, {"val": 0, "test": 0}, []

    def __call__(self, cells: list) -> list:
        split = cells[0].config.eval.split if cells else "val"
        assert all(c.config.eval.split == split for c in cells)  # one phase per call
        if split == "test":
            self.test_cells += [c.path for c in cells]
            if not self.run_test:
                return [Outcome(c.label, "skipped", str(c.path)) for c in cells]
        outcomes = run_cells(cells, progress=False)
        self.ran[split] += sum(o.status == "ran" for o in outcomes)
        return outcomes


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tuned directory for the module (do not modify it: copy it): naive (2 lr), sam, joint, equal compute;
    ``scored``: the rows each phase scored, as JSON."""
    from clsuite import engine
    root = tmp_path_factory.mktemp("tune")
    grid = write_grid(root / "grid.yaml", grid_doc(equal_compute=True))
    runner, scored, real = Runner(), {"val": set(), "test": set()}, engine.score

    def spy(scorer, model, tok, rows, *args, **kwargs):
        phase = "test" if runner.test_cells else "val"
        scored[phase].update(json.dumps(dict(r), sort_keys=True) for r in rows)
        return real(scorer, model, tok, rows, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "score", spy)
        written = tune.run_tune(grid, root / "out", run=runner)
    return SimpleNamespace(grid=grid, out=root / "out", selected=written[STREAM], first=runner, scored=scored)


def copy_of(tuned, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tuned directory and of its grid: (grid, out)."""
    shutil.copytree(tuned.out, tmp_path / "out")
    return shutil.copy(tuned.grid, tmp_path / "grid.yaml"), tmp_path / "out"


def roles(doc: dict) -> set[tuple[str, str]]:
    """(name, role) of every ``runs:`` entry of a selected.yaml, as the protocol report reads them."""
    out = set()
    for entry in doc["runs"]:
        for r in entry["roles"]:
            role, _, name = r.partition(":")
            out.add((name or entry["name"], role))
    return out


def edit_record(path: Path, **metrics) -> None:
    rec = json.loads(path.read_text())
    rec["metrics"].update(metrics)
    path.write_text(json.dumps(rec))


def dry_run_paths(cli, out: Path) -> set[Path]:
    code, stdout, err = cli("sweep", "--dry-run", out / STREAM / "test-grid.yaml", "--out", out / "test")
    assert code == 0, err
    return {Path(line.split("  ->  ")[1]) for line in stdout.splitlines() if "  ->  " in line}


def scored(name: str, plasticity: float, acc: float = 0.0, retention: float | None = None) -> Scored:
    val = {"acc": acc, "plasticity": plasticity, **({"probe_retention": retention} if retention is not None else {})}
    return Scored(Setting(name, name, (("lr", plasticity),)), val, 1)


# --- 1. end to end ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_selection_names_every_strategy_and_reproduces_the_test_runs(tuned, cli):
    doc = yaml.safe_load(tuned.selected.read_text())
    budget = {"of": "naive", "factor": 2.0, "for": "sam - naive", "steps": 4}  # sam's 2x cost, 2 steps each
    assert doc["selection"]["strategies"]["naive@2.0x"]["budget"] == budget
    assert {n for n, r in roles(doc) if r == "selected"} == {"naive", "sam", "joint", "naive@2.0x"}
    assert {e["set"]["steps"] for e in doc["runs"] if ("naive@2.0x", "selected") in roles({"runs": [e]})} == {4}
    paths = dry_run_paths(cli, tuned.out)
    assert len(paths) == 2 * len(doc["runs"]) and all(p.exists() for p in paths)
    assert set(find_records([tuned.out / "test"])) == paths  # the test runs are exactly the selection's
    assert tuned.first.ran == {"val": 6, "test": len(paths)}  # val: naive 2, sam, joint, naive@2.0x 2


@pytest.mark.slow
def test_running_tune_again_runs_nothing(tuned):
    before = tuned.selected.read_text()
    again = Runner()
    tune.run_tune(tuned.grid, tuned.out, run=again)
    assert again.ran == {"val": 0, "test": 0} and again.test_cells
    assert tuned.selected.read_text() == before


# --- 2. splits -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_validation_runs_score_validation_rows_and_test_runs_test_rows(tuned, tiny_stream):
    val, test = for_split(tiny_stream, "val"), for_split(tiny_stream, "test")
    def rows(parts: list) -> set[str]:
        return {json.dumps(dict(r), sort_keys=True) for t in parts for r in t.eval}

    assert rows(val.tasks) != rows(test.tasks)
    assert tuned.scored["val"] == rows(val.tasks)  # no probe: tiny-test's have no validation part
    assert tuned.scored["test"] == rows(test.tasks + test.probes)
    for split, stream in (("val", val), ("test", test)):
        recs = [read_record(p) for p in find_records([tuned.out / split])]
        assert recs and {r.split for r in recs} == {split}
        assert {tuple(r.probes) for r in recs} == {tuple(p.name for p in stream.probes)}
        for r in recs:
            want = fingerprint(RunConfig.model_validate(r.config), stream, SCHEMA_VERSION)["eval_data"]
            assert r.fingerprint["eval_data"] == want
            assert [len(r.details[-1]["tasks"][t.name]["items"]) for t in stream.tasks] == \
                [len(t.eval) for t in stream.tasks]


# --- 3. the selection never reads test -------------------------------------------------------------------------
def test_acc_rule_takes_the_highest_validation_acc_first_on_ties():
    a, b, c = scored("a", 0.1, acc=0.2), scored("b", 0.2, acc=0.5), scored("c", 0.3, acc=0.5)
    assert tune.RULES.get("acc")([a, b, c], [a], Rule()) is b


def test_retention_rule_reads_retention_among_plastic_enough_settings():
    rule = tune.RULES.get("retention_at_plasticity")
    ref = [scored("r1", 0.5), scored("r2", 1.0)]  # level: 0.9 * 1.0
    low, high, best = scored("low", 0.5, retention=0.9), scored("high", 0.95, retention=0.1), \
        scored("best", 0.9, retention=0.3)
    assert rule([low, high, best], ref, Rule(name="retention_at_plasticity")) is best
    assert rule([low, high, best], ref, Rule(name="retention_at_plasticity", fraction=0.4)) is low
    none = [scored("x", 0.2, retention=0.9), scored("y", 0.4, retention=0.1)]
    assert rule(none, ref, Rule(name="retention_at_plasticity")) is none[1]  # the most plastic


@pytest.mark.slow
def test_selection_follows_validation_where_test_favours_another_setting(tuned, tmp_path):
    grid, out = copy_of(tuned, tmp_path)
    edit_record(out / "val" / STREAM / "naive" / "lr=0.03_steps=2" / "seed100.val.json", acc=0.9)
    for p in (out / "test" / STREAM / "naive" / "lr=0.001_steps=2").glob("seed*.json"):
        edit_record(p, acc=1.0)  # the test runs favour the other learning rate
    runner = Runner(run_test=False)
    tune.run_tune(grid, out, run=runner)
    assert runner.ran["val"] == 0  # the edited record was read, not replaced
    naive = yaml.safe_load((out / STREAM / "selected.yaml").read_text())["selection"]["strategies"]["naive"]
    assert naive["selected"]["set"] == {"lr": 0.03}


@pytest.mark.slow
def test_deleting_test_records_leaves_the_selection(tuned, tmp_path, cli):
    grid, out = copy_of(tuned, tmp_path)
    shutil.rmtree(out / "test")
    runner = Runner(run_test=False)
    tune.run_tune(grid, out, run=runner)
    assert runner.ran["val"] == 0
    assert (out / STREAM / "selected.yaml").read_text() == tuned.selected.read_text()
    assert set(runner.test_cells) == dry_run_paths(cli, out)


# --- 4. tuning and test seeds never overlap --------------------------------------------------------------------
def test_overlapping_seeds_in_the_grid_are_refused(tmp_path, cli):
    grid = write_grid(tmp_path / "g.yaml", grid_doc(tuning_seeds=[0, 100]))
    code, _, err = cli("tune", grid, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "tuning_seeds and test_seeds share [0]" in err
    assert not (tmp_path / "out").exists()


def test_overlapping_test_seeds_option_is_refused(tmp_path, cli):
    grid = write_grid(tmp_path / "g.yaml", grid_doc())
    code, _, err = cli("tune", grid, "--out", tmp_path / "out", "--test-seeds", "1,100")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --test-seeds") and "share [100]" in err
    assert not (tmp_path / "out").exists()


# --- 5. bad input ----------------------------------------------------------------------------------------------
SMALL = {"naive": {"lr": [1.0e-3]}, "sam": {"lr": [1.0e-3]}}


@pytest.mark.parametrize("change, message", [
    ({"budgett": 3}, "budgett: unknown key; did you mean 'budget'?"),
    ({"rule": {"name": "acx"}}, "rule: unknown rule 'acx': did you mean 'acc'?"),
    ({"strategies": {**SMALL, "sam": {"rhoo": [0.1]}}},
     "strategy sam: knob 'rhoo': neither a training setting nor a parameter of sam; did you mean 'rho'?"),
    ({"strategies": {**SMALL, "lora+wiseft": {"alpha": [0.5]}}},
     "knob 'alpha': 2 of its strategies take it: write it as strategy.alpha"),
    ({"family": ["sam - ewc"]}, "family entry 'sam - ewc': ewc is not tuned here"),
    ({"family": ["sam-naive"]}, "family entry 'sam-naive': write it as 'A - B'"),
    ({"reference": "ewc"}, "reference: 'ewc' is not tuned here"),
    ({"eval": {"split": "test"}}, "eval: split is set by clsuite tune"),
    ({"test_eval": {"sharpnes": "worst"}}, "test_eval: unknown setting 'sharpnes': did you mean 'sharpness'?"),
    ({"test_eval": {"sharpness": "wrost"}}, "test_eval: sharpness: Input should be"),
])
def test_bad_grid_is_a_one_line_error(tmp_path, cli, change, message):
    grid = write_grid(tmp_path / "g.yaml", {**grid_doc(strategies=SMALL), **change})
    code, _, err = cli("tune", grid, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert message in err
    assert not (tmp_path / "out").exists()


def test_ambiguous_knob_lists_the_qualified_names(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", grid_doc(strategies={**SMALL, "lora+wiseft": {"alpha": [0.5]}}))
    with pytest.raises(UserError, match=r"lora\.alpha.*wiseft\.alpha"):
        tune.run_tune(grid, tmp_path / "out", run=lambda cells: pytest.fail("ran cells"))
    grid = write_grid(tmp_path / "g.yaml", grid_doc(strategies={**SMALL, "lora+wiseft": {"wiseft.alpha": [0.7]}}))
    assert [s.spec for s in tune.spaces(tune.load_tune_grid(grid), "g")["lora+wiseft"]] == ["lora+wiseft(alpha=0.7)"]


def test_the_example_grid_named_in_errors_loads():
    path = Path(__file__).parent.parent / tune.EXAMPLE.removeprefix("see ")
    grid = tune.load_tune_grid(path)
    assert set(tune.spaces(grid, str(path))) == set(grid.strategies)


# --- 6. the selection helpers ----------------------------------------------------------------------------------
def test_matched_takes_the_lowest_plasticity_at_or_above_the_level():
    cands = [scored("a", 0.5), scored("b", 0.3), scored("c", 0.8), scored("d", 0.35)]
    assert matched(cands, 0.32) is cands[3]
    assert matched(cands, 0.3) is cands[1]  # at the level counts
    assert matched(cands, 0.6) is cands[2]
    assert matched(cands, 0.81) is None


@pytest.mark.parametrize("a, b, k", [(1.0, 1.0, None), (0.5, 1.0, None), (1.1, 1.0, None), (1.14, 1.0, None),
                                     (1.2, 1.0, 1.2), (2.26, 1.0, 2.3), (3.0, 1.5, 2.0)])
def test_budget_factor(a, b, k):
    assert budget_factor(a, b) == k


def test_same_but_lr_keeps_the_settings_differing_in_lr_only():
    settings = space("ewc", {"lr": [1e-3, 2e-3], "lambda": [100, 1000], "steps": [2, 3]}, 100, "test")
    assert len(settings) == 8
    chosen = next(s for s in settings if s.spec == "ewc(lambda=1000.0)" and dict(s.train) == {"lr": 1e-3, "steps": 3})
    kept = same_but_lr(settings, chosen)
    assert [dict(s.train) for s in kept] == [{"lr": 1e-3, "steps": 3}, {"lr": 2e-3, "steps": 3}]
    assert {s.spec for s in kept} == {chosen.spec}


def test_space_samples_budget_settings_deterministically_in_space_order():
    knobs = {"lr": [1e-4, 2e-4, 5e-4, 1e-3], "rho": [0.02, 0.05, 0.1]}
    full = space("sam", knobs, 100, "test")
    first, second = space("sam", knobs, 5, "test"), space("sam", knobs, 5, "test")
    assert len(full) == 12 and len(first) == 5 and first == second
    assert first == [s for s in full if s in first]  # a subset, in space order
    assert space("sam", knobs, 12, "test") == full


# --- 7. the protocol report ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_protocol_report(tuned, tmp_path):
    md = publish_protocol(tuned.out, STREAM, tmp_path / "lb")
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    for section in ("Selected settings", "Paired effects", "Matched plasticity", "Equal compute", "Reference rows",
                    "General ability by probe category", "Per task order"):
        assert any(h.startswith(f"## {section}") for h in heads), section
    assert "sam - naive -> sam - naive@2.0x" in md
    csv = pd.read_csv(tmp_path / "lb" / "leaderboard.csv")
    main = csv[csv["table"] == "selected"]
    assert set(main["strategy"]) == {"naive", "sam", "joint", "naive@2.0x"} and set(main["n"]) == {2}
    effect = csv[csv["table"] == "effect"]  # the family at selected and matched settings, and at equal compute
    assert set(zip(effect["comparison"], effect["kind"])) == {
        ("sam − naive", "selected"), ("sam − naive", "matched"), ("sam − naive@2.0x", "equal compute")}
    for _, part in effect.groupby("metric"):  # Holm over the three together: never below the raw p
        assert (part["holm"] >= part["p"] - 1e-12).all() and part["holm"].max() >= part["p"].max()
    assert (tmp_path / "lb" / "tradeoff.png").stat().st_size > 0


@pytest.mark.slow
def test_protocol_report_refuses_a_missing_test_record(tuned, tmp_path):
    _, out = copy_of(tuned, tmp_path)
    (out / "test" / STREAM / "sam" / "lr=0.001_steps=2" / "seed1.json").unlink()
    with pytest.raises(UserError, match=r"test records missing for sam \(selected\)"):
        publish_protocol(out, STREAM, tmp_path / "lb")
    assert not (tmp_path / "lb").exists()


# --- bugs found (kept failing until fixed) ---------------------------------------------------------------------
@pytest.mark.slow
def test_protocol_report_counts_only_the_selected_test_seeds(tuned, tmp_path):
    _, out = copy_of(tuned, tmp_path)
    d = out / "test" / STREAM / "sam" / "lr=0.001_steps=2"
    stale = json.loads((d / "seed1.json").read_text())
    (d / "seed5.json").write_text(json.dumps({**stale, "seed": 5}))  # e.g. left by an earlier --test-seeds 0,1,5
    (d / "seed0.json").unlink()
    with pytest.raises(UserError, match=r"test records missing for sam \(selected\)"):
        publish_protocol(out, STREAM, tmp_path / "lb")


def test_tags_compare_by_value():
    assert _same_tag("lr=0.001", "lr=1e-3")


@pytest.mark.slow
def test_equal_compute_scales_the_selected_settings_steps(tmp_path, monkeypatch):
    monkeypatch.setitem(tune.RULES._items, "last", lambda cands, ref, rule: cands[-1])
    grid = write_grid(tmp_path / "g.yaml", {**grid_doc(test_seeds=[], equal_compute=True, rule={"name": "last"}),
                                            "set": {}, "strategies": {"naive": {"lr": [1e-3], "steps": [2, 3]},
                                                                      "sam": {"lr": [1e-3]}}})
    doc = yaml.safe_load(tune.run_tune(grid, tmp_path / "out", run=Runner())[STREAM].read_text())
    per = doc["selection"]["strategies"]
    assert per["naive"]["selected"]["set"] == {"lr": 1e-3, "steps": 3}
    assert per["naive@2.0x"]["budget"]["steps"] == 6  # 3 selected steps x 2.0


def test_equal_compute_can_name_the_comparisons(tmp_path, monkeypatch):
    """A list gives equal compute to the comparisons named only; a name not tuned is a one-line error."""
    monkeypatch.setitem(tune.RULES._items, "last", lambda cands, ref, rule: cands[-1])
    strategies = {"naive": {"lr": [1e-3]}, "sam": {"lr": [1e-3]}, "ewc": {"lr": [1e-3]}}
    doc = {**grid_doc(test_seeds=[], rule={"name": "last"}), "set": {}, "strategies": strategies,
           "family": ["sam - naive", "ewc - naive"], "equal_compute": ["ewc - naive"]}
    monkeypatch.setattr(tune, "costs", lambda grid, ref, chosen, names, path: {
        n: {"seconds_per_step": {"naive": 1.0, "sam": 2.0, "ewc": 1.5}[n]} for n in names})
    grid = write_grid(tmp_path / "g.yaml", doc)
    per = yaml.safe_load(tune.run_tune(grid, tmp_path / "out", run=Runner())[STREAM].read_text())
    assert {n for n in per["selection"]["strategies"] if "@" in n} == {"naive@1.5x"}
    write_grid(tmp_path / "bad.yaml", {**doc, "equal_compute": ["sam - nave"]})
    with pytest.raises(UserError, match="family entry 'sam - nave'"):
        tune.run_tune(tmp_path / "bad.yaml", tmp_path / "out2", run=Runner())


def test_primary_seeds_go_to_the_rows_the_family_reads_and_secondary_is_apart(tmp_path, monkeypatch):
    """Extra test seeds for the family's rows only; a secondary comparison in its own table; overlapping seeds refused."""
    monkeypatch.setitem(tune.RULES._items, "last", lambda cands, ref, rule: cands[-1])
    doc = {**grid_doc(rule={"name": "last"}), "strategies": {"naive": {"lr": [1e-3]}, "sam": {"lr": [1e-3]},
                                                             "ewc": {"lr": [1e-3]}},
           "family": ["sam - naive"], "secondary": ["ewc - naive"], "primary_seeds": [2]}
    runner = Runner()
    sel = yaml.safe_load(tune.run_tune(write_grid(tmp_path / "g.yaml", doc), tmp_path / "out",
                                       run=runner)[STREAM].read_text())
    seeds = {e["name"]: e.get("seeds", []) for e in sel["runs"]}
    assert seeds == {"naive": [2], "sam": [2], "ewc": []}
    ran = {(Path(p).relative_to(tmp_path / "out" / "test").parts[1], Path(p).stem) for p in runner.test_cells}
    assert ran == {(n, f"seed{k}") for n in ("naive", "sam") for k in (0, 1, 2)} | {("ewc", "seed0"), ("ewc", "seed1")}
    md = publish_protocol(tmp_path / "out", STREAM, tmp_path / "lb")
    second = md.split("## Secondary comparisons", 1)[1]
    assert "ewc − naive" in second and "ewc − naive" not in md.split("## Secondary comparisons", 1)[0]
    with pytest.raises(UserError, match="tuning_seeds and test_seeds share"):
        tune.run_tune(write_grid(tmp_path / "bad.yaml", {**doc, "primary_seeds": [100]}), tmp_path / "o2",
                      run=Runner())


def test_test_eval_measures_sharpness_in_the_test_runs_only(tmp_path):
    doc = {**grid_doc(strategies={"naive": {"lr": [1e-3]}}), "test_eval": {"sharpness": "worst"}}
    tune.run_tune(write_grid(tmp_path / "g.yaml", doc), tmp_path / "out", run=Runner())
    for split, want in (("val", "off"), ("test", "worst")):
        recs = [read_record(p) for p in find_records([tmp_path / "out" / split])]
        assert recs and {r.config["eval"]["sharpness"] for r in recs} == {want}
        assert all(("sharpness" in e) == (split == "test") for r in recs for e in r.experiences)
    assert {k for r in recs for e in r.experiences for k in e["sharpness"]} == {"sharpness_worst"}


# --- 8. joint --------------------------------------------------------------------------------------------------
def joint_batches(stream, seed: int, n: int, state: dict | None = None) -> tuple[list[list[dict]], dict]:
    """``n`` batches of 8 from a fresh joint plugin in the first experience, after loading ``state`` if given;
    returns them and the plugin's state after them."""
    from clsuite.strategy import build_strategy
    plugin, = build_strategy("joint")
    ctx = SimpleNamespace(config=SimpleNamespace(seed=seed), stream=stream, task=stream.tasks[0], experience=0)
    plugin.before_training(ctx)
    if state is not None:
        plugin.load_state_dict(state)
    first_task = [dict(r) for r in stream.tasks[0].train][:8]
    batches = [plugin.before_training_iteration(ctx, first_task) for _ in range(n)]
    return batches, json.loads(json.dumps(plugin.state_dict()))  # as a checkpoint keeps it


def test_joint_draws_every_task_from_the_first_experience(tiny_stream):
    rows = {t.name: {json.dumps(dict(r), sort_keys=True) for r in t.train} for t in tiny_stream.tasks}
    batches, _ = joint_batches(tiny_stream, 0, 4)
    drawn = [json.dumps(r, sort_keys=True) for b in batches for r in b]
    assert all(len(b) == 8 for b in batches)
    assert all(any(d in rows[t] for d in drawn) for t in rows)  # both tasks, while training the first
    assert all(any(d in r for r in rows.values()) for d in drawn)  # training rows only


def test_joint_is_deterministic_by_seed_and_resumes_from_its_state(tiny_stream):
    a, _ = joint_batches(tiny_stream, 0, 4)
    assert joint_batches(tiny_stream, 0, 4)[0] == a
    assert joint_batches(tiny_stream, 1, 4)[0] != a
    _, state = joint_batches(tiny_stream, 0, 2)
    assert joint_batches(tiny_stream, 0, 2, state)[0] == a[2:]


def test_costs_are_measured_once_and_kept(tuned, tmp_path, fixed_clock):
    grid, out = copy_of(tuned, tmp_path)
    kept = yaml.safe_load((out / STREAM / "costs.yaml").read_text())
    assert kept["sam"]["seconds_per_step"] == SAM_COST and kept["naive"]["seconds_per_step"] == BASE_COST
    assert kept["sam"]["repeats"] == 3 and kept["sam"]["setting"]["spec"] == "sam"
    before = len(fixed_clock)
    tune.run_tune(grid, out, run=Runner())
    assert len(fixed_clock) == before  # a resumed tune scales the same budgets: nothing measured again


def test_measure_costs_interleaves_and_takes_the_median(monkeypatch):
    from clsuite import cost
    order, clock = [], iter([9.0, 3.0, 1.0, 5.0, 2.0, 4.0, 6.0])  # the first call is the warm-up

    def fake(stream, cfg, steps):
        order.append(cfg)
        return next(clock)

    monkeypatch.setattr(cost, "time_one", fake)
    got = cost.measure_costs(None, {"a": "A", "b": "B"}, repeats=3)
    assert order == ["A", "A", "B", "A", "B", "A", "B"]  # warm-up, then rounds visiting each once
    assert got["a"] == {"seconds_per_step": 4.0, "spread": [3.0, 5.0], "repeats": 3}  # a: 3, 5, 4
    assert got["b"]["seconds_per_step"] == 2.0  # b: 1, 2, 6


def test_time_one_counts_the_strategys_hooks(tiny_stream, monkeypatch):
    from clsuite.config import resolve_config
    from clsuite.engine import Context
    cfg = resolve_config(tiny_stream, "naive", 0)  # 3 steps per experience
    call = Context.call

    def slow_merge(self, hook, *args):  # a strategy whose after_training_exp takes 0.3 s (e.g. a Fisher)
        if hook == "after_training_exp":
            time.sleep(0.3)
        return call(self, hook, *args)

    monkeypatch.setattr(Context, "call", slow_merge)
    assert real_time_one(tiny_stream, cfg, 2) >= 0.3 / 3  # spread over the experience's 3 real steps, not the 2 timed
