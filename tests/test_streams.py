import json

import pytest

from clsuite.errors import UserError
from clsuite.streams import load_stream


def test_builtin_stream_loads():
    s = load_stream("tiny-synthetic")
    assert [t.name for t in s.tasks] == ["reversal", "sorting", "cipher"]
    assert all(t.train is not None and len(t.eval) == 100 for t in s.tasks)
    assert all(len(t.val) == 100 and len(t.train) == 2000 - 100 for t in s.tasks)  # as many val rows as test rows
    assert all(p.train is None and len(p.val) == len(p.eval) == 100 for p in s.probes)  # val_size: 100 of 200
    for t in s.tasks + s.probes:
        parts = [set(d["prompt"]) for d in (t.train or {"prompt": []}, t.val, t.eval)]
        assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2], t.name


def test_data_is_deterministic():
    a, b = load_stream("tiny-synthetic"), load_stream("tiny-synthetic")
    assert a.tasks[2].train["prompt"][:50] == b.tasks[2].train["prompt"][:50]


def test_include_overrides(tiny_stream):
    assert tiny_stream.name == "tiny-test"
    assert tiny_stream.model == "tiny-synthetic-base"  # inherited
    assert tiny_stream.train["steps"] == 3 and tiny_stream.train["lr"] == load_stream("tiny-synthetic").train["lr"]
    assert len(tiny_stream.tasks) == 2


def test_local_json_files_through_datasets(tmp_path):
    rows = [{"q": f"{i}+1=", "a": str(i + 1)} for i in range(20)]
    (tmp_path / "d.json").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "s.yaml").write_text(
        "name: local\nmodel: tiny-synthetic-base\n"
        "tasks:\n  - name: inc\n    scorer: exact_match\n    eval_size: 5\n"
        "    prompt: '{q}'\n    target: '{a}'\n"
        f"    source: {{path: json, data_files: '{tmp_path / 'd.json'}'}}\n")
    s = load_stream(str(tmp_path / "s.yaml"))
    assert len(s.tasks[0].eval) == 5 and len(s.tasks[0].val) == 5 and len(s.tasks[0].train) == 15 - 5
    assert set(s.tasks[0].train.column_names) == {"prompt", "target"}


@pytest.mark.parametrize("body, match", [
    ("name: x\n  bad: [", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("name: x\nmodel: m\n", "no tasks"),
    ("name: x\nmodel: m\ntasks:\n  - {name: a, scorer: exact_match}\n", "missing 'source:'"),
    ("name: x\nmodel: m\ntasks:\n  - {name: a, scorer: nope, source: {builder: tiny_task, skill: addition}}\n",
     "unknown scorer"),
    ("name: x\nmodel: m\ntasks:\n  - {name: a, scorer: exact_match, source: {builder: tiny_tsk}}\n", "did you mean"),
    ("include: self.yaml\nname: x\n", "includes itself"),
    ("name: x\nmodel: m\ntasks:\n  - {name: a, scorer: exact_match, prompt: '{q.__class__}', target: '{a}',"
     " source: {builder: tiny_task, skill: addition}}\n", "plain column name"),
])
def test_bad_stream_files(tmp_path, body, match):
    (tmp_path / "self.yaml").write_text(body)
    with pytest.raises(UserError, match=match):
        load_stream(str(tmp_path / "self.yaml"))


def test_unknown_stream_name():
    with pytest.raises(UserError, match="did you mean 'tiny-synthetic'"):
        load_stream("tiny-synthetc")


# --- strict schemas: a misspelt or mistyped key is refused, with the closest known key ---------------------------
TASK = "{name: a, scorer: exact_match, source: {builder: tiny_task, skill: addition, n_train: 8, n_eval: 4}}"
PROBE = "{name: p, category: general, scorer: exact_match, source: {builder: tiny_general, skill: copy, n_eval: 4}}"


def _stream(tmp_path, top: str = "", task: str = TASK, probe: str = PROBE) -> str:
    (tmp_path / "s.yaml").write_text(f"name: x\nmodel: tiny-synthetic-base\n{top}tasks:\n  - {task}\nprobes:\n"
                                     f"  - {probe}\n")
    return str(tmp_path / "s.yaml")


@pytest.mark.parametrize("change, match", [
    ({"top": "trian: {steps: 1}\n"}, r"^stream s\.yaml: trian: unknown key; did you mean 'train'\? known: "),
    ({"top": "train: {stpes: 1}\n"}, r"^stream s\.yaml: train\.stpes: unknown key; did you mean 'steps'\? known: "),
    ({"top": "eval: {batch_sise: 4}\n"}, r"eval\.batch_sise: unknown key; did you mean 'batch_size'\?"),
    ({"top": "general_data: {source: {builder: tiny_general_mix}, eval_sise: 2}\n"},
     r"general_data\.eval_sise: unknown key; did you mean 'eval_size'\?"),
    ({"task": TASK.replace("scorer", "eval_sise: 0.5, scorer")},
     r"^stream s\.yaml, task 1 \(a\): eval_sise: unknown key; did you mean 'eval_size'\? known: answer, bos, category"),
    ({"probe": PROBE.replace("category", "categroy")},
     r"^stream s\.yaml, probe 1 \(p\): categroy: unknown key; did you mean 'category'\?"),
    ({"probe": "{name: p, lm_eval: {task: mmlu, num_fewshots: 5}}"},
     r"probe 1 \(p\): lm_eval\.num_fewshots: unknown key; did you mean 'num_fewshot'\?"),
    ({"probe": "{name: p, scorer: loglik, lm_eval: {task: mmlu}}"}, r"probe 1 \(p\): scorer: unknown key; known: "
                                                                    r"category, lm_eval, name"),
    ({"task": TASK.replace("skill", "skil")}, r"task 1 \(a\): source\.skil: unknown argument of data builder "
                                              r"'tiny_task'; did you mean 'skill'\? it takes: skill, n_train, n_eval"),
    ({"task": TASK.replace("skill: addition, ", "")}, r"source: data builder 'tiny_task' needs skill:"),
    ({"task": TASK.replace("skill", "seed: 3, skill")}, r"source\.seed: unknown argument.*data_seed"),
    ({"top": "data_seed: '7'\n"}, r"data_seed: Input should be a valid integer, got str '7'"),
    ({"top": "chat_template: 'yes'\n"}, r"chat_template: Input should be a valid boolean"),
    ({"top": "train: {steps: 0}\n"}, r"train\.steps: Input should be greater than or equal to 1"),
    ({"task": TASK.replace("scorer", "max_eval: 0, scorer")}, r"max_eval: Input should be greater than or equal"),
    ({"task": TASK.replace("scorer", "choices: c, scorer")}, r"'choices:'.*and 'answer:'.*go together"),
    ({"task": "{name: a, scorer: exact_match, source: {split: train}}"}, r"source: names neither 'builder:'"),
    ({"task": "{name: a, scorer: exact_match, source: tiny_task}"}, r"'source:' must be a mapping, got str"),
    ({"task": "just-a-name"}, r"task 1: task must be a mapping, got str 'just-a-name'"),
    ({"top": "description: [a]\n"}, r"description: Input should be a valid string"),
])
def test_typos_and_wrong_types_are_refused(tmp_path, change, match):
    with pytest.raises(UserError, match=match) as e:
        load_stream(_stream(tmp_path, **change))
    assert "\n" not in str(e.value)


def test_every_builder_gets_its_arguments_checked(tmp_path, monkeypatch):
    """A third-party builder with no checks of its own: unknown and missing arguments are refused before it runs."""
    from datasets import Dataset

    from clsuite.streams import DATA_BUILDERS
    calls = []

    def rows(seed: int, n: int, *, word: str = "a") -> dict:
        calls.append((seed, n, word))
        return {"train": Dataset.from_dict({"prompt": [word] * n, "target": [word] * n})}

    monkeypatch.setitem(DATA_BUILDERS._items, "test_rows", rows)
    with pytest.raises(UserError, match=r"source\.wrod: unknown argument of data builder 'test_rows'; "
                                        r"did you mean 'word'\? it takes: n, word"):
        load_stream(_stream(tmp_path, task="{name: a, scorer: loglik, source: {builder: test_rows, n: 6, wrod: b}}"))
    with pytest.raises(UserError, match=r"data builder 'test_rows' needs n:; it takes: n, word"):
        load_stream(_stream(tmp_path, task="{name: a, scorer: loglik, source: {builder: test_rows}}"))
    assert not calls
    s = load_stream(_stream(tmp_path, top="data_seed: 3\n",
                            task="{name: a, scorer: loglik, eval_size: 2, source: {builder: test_rows, n: 6}}"))
    assert calls == [(3, 6, "a")] and len(s.tasks[0].train) == 4 - 2 and len(s.tasks[0].val) == 2


# --- validation rows: held out of a task's training rows (or the source's validation split), never tested on ------
def _prompts(rows) -> set:
    return set(rows["prompt"])


def _local_rows(tmp_path, n: int = 40) -> str:
    """A JSON-lines file of ``n`` distinct rows; its path."""
    (tmp_path / "rows.json").write_text("\n".join(json.dumps({"q": f"{i}+1=", "a": str(i + 1)}) for i in range(n)))
    return str(tmp_path / "rows.json")


def _local_task(path: str, more: str = "") -> str:
    return f"{{name: a, scorer: exact_match, prompt: '{{q}}', target: '{{a}}', eval_size: 8, {more}source: " \
           f"{{path: json, data_files: '{path}'}}}}"


@pytest.mark.parametrize("more, n_val", [("", 8), ("val_size: 5, ", 5), ("val_size: 0.25, ", 8)])
def test_validation_rows_are_held_out_of_the_training_rows(tmp_path, more, n_val):
    """Default: as many as the test rows; ``val_size:`` a row count or a fraction of the training rows."""
    path = _local_rows(tmp_path)
    t = load_stream(_stream(tmp_path, task=_local_task(path, more))).tasks[0]
    assert (len(t.train), len(t.val), len(t.eval)) == (40 - 8 - n_val, n_val, 8)
    train, val, test = _prompts(t.train), _prompts(t.val), _prompts(t.eval)
    assert not train & val and not val & test and not train & test
    assert train | val | test == {f"{i}+1=" for i in range(40)}  # only held out: every row is somewhere
    assert set(t.val.column_names) == {"prompt", "target"}


def test_default_validation_part_is_at_most_half_the_training_rows(tmp_path, tiny_stream):
    for t in tiny_stream.tasks:  # 64 training rows, 10 test rows: 10 held out
        assert (len(t.train), len(t.val), len(t.eval)) == (54, 10, 10)
        assert not _prompts(t.train) & _prompts(t.val) and not _prompts(t.val) & _prompts(t.eval)
    few = TASK.replace("n_train: 8, n_eval: 4", "n_train: 6, n_eval: 10")  # half of 6 training rows < 10 test rows
    t = load_stream(_stream(tmp_path, task=few)).tasks[0]
    assert (len(t.train), len(t.val), len(t.eval)) == (3, 3, 10)
    capped = load_stream(_stream(tmp_path, task=TASK.replace("scorer", "max_eval: 2, scorer"))).tasks[0]
    assert (len(capped.train), len(capped.val), len(capped.eval)) == (4, 2, 2)  # max_eval caps what is scored


def test_validation_rows_are_fixed_by_data_seed(tmp_path):
    path = _local_rows(tmp_path)
    a, b, c = (load_stream(_stream(tmp_path, top=f"data_seed: {seed}\n", task=_local_task(path))).tasks[0]
               for seed in (3, 3, 4))
    assert a.val["prompt"] == b.val["prompt"] and a.train["prompt"] == b.train["prompt"]  # the same rows on reload
    assert _prompts(c.val) != _prompts(a.val)  # another data_seed holds out other rows, of the same data
    every = [set().union(*map(_prompts, (t.train, t.val, t.eval))) for t in (a, c)]
    assert every[0] == every[1] == {f"{i}+1=" for i in range(40)}


def test_the_sources_validation_split_is_taken_as_it_is(tmp_path):
    for split, n in (("train", 30), ("validation", 7), ("dev", 5)):
        rows = [json.dumps({"q": f"{split} {i}", "a": "x"}) for i in range(n)]
        (tmp_path / f"{split}.json").write_text("\n".join(rows))
    files = f"{{train: '{tmp_path / 'train.json'}', validation: '{tmp_path / 'validation.json'}', " \
            f"dev: '{tmp_path / 'dev.json'}'}}"
    task = f"{{name: a, scorer: exact_match, prompt: '{{q}}', target: '{{a}}', eval_size: 6, " \
           f"source: {{path: json, data_files: {files}}}}}"
    t = load_stream(_stream(tmp_path, task=task)).tasks[0]
    assert _prompts(t.val) == {f"validation {i}" for i in range(7)}  # none held out of the training rows
    assert (len(t.train), len(t.eval)) == (24, 6)
    assert all(p.startswith("train") for p in [*t.train["prompt"], *t.eval["prompt"]])
    dev = load_stream(_stream(tmp_path, task=task.replace("eval_size: 6", "eval_size: 6, val_split: dev"))).tasks[0]
    assert _prompts(dev.val) == {f"dev {i}" for i in range(5)} and len(dev.train) == 24


def test_a_probe_has_validation_rows_only_with_val_size(tmp_path, tiny_stream):
    assert all(p.val is None for p in tiny_stream.probes)
    probe = PROBE.replace("n_eval: 4", "n_eval: 10").replace("scorer", "val_size: 3, scorer")
    p = load_stream(_stream(tmp_path, probe=probe)).probes[0]
    assert p.train is None and (len(p.val), len(p.eval)) == (3, 7)  # held out of its evaluation rows
    assert not _prompts(p.val) & _prompts(p.eval)


def test_for_split_scores_the_validation_rows_and_drops_probes_without(tmp_path):
    from clsuite.streams import for_split
    probes = PROBE + "\n  - " + PROBE.replace("name: p", "name: q").replace("n_eval: 4", "n_eval: 8").replace(
        "scorer", "val_size: 2, scorer")
    s = load_stream(_stream(tmp_path, probe=probes))
    assert for_split(s, "test") is s
    v = for_split(s, "val")
    assert [p.name for p in v.probes] == ["q"] and [t.name for t in v.tasks] == [t.name for t in s.tasks]
    for new, old in zip(v.tasks + v.probes, s.tasks + s.probes[1:]):
        assert new.eval["prompt"] == old.val["prompt"] and new.train == old.train
        assert not _prompts(new.eval) & _prompts(old.eval)
    assert [p.name for p in s.probes] == ["p", "q"] and len(s.tasks[0].eval) == 4  # the stream itself is left as it was
    with pytest.raises(UserError, match=r"^unknown split 'dev': choose one of test, val$"):
        for_split(s, "dev")


@pytest.mark.parametrize("change, match", [
    ({"task": TASK.replace("scorer", "val_size: 0, scorer")}, r"task 1 \(a\): val_size: give a fraction in \(0, 1\) "
                                                              r"or a whole number of rows \(>= 1\), got 0"),
    ({"task": TASK.replace("scorer", "val_size: 1.5, scorer")}, r"val_size: give a fraction in \(0, 1\)"),
    ({"task": TASK.replace("scorer", "val_size: many, scorer")}, r"val_size: give a fraction .* got 'many'"),
    ({"task": TASK.replace("scorer", "val_size: true, scorer")}, r"val_size: give a fraction .* got True"),
    ({"task": TASK.replace("scorer", "val_size: 5, scorer")},
     r"^stream s\.yaml, task 1 \(a\): val_size: 5 holds out 5 of 8 training rows; give a size of at least 1 and at "
     r"most half of them \(4\)$"),
    ({"task": TASK.replace("scorer", "val_size: 0.01, scorer")}, r"val_size: 0\.01 holds out 0 of 8 training rows"),
    ({"probe": PROBE.replace("scorer", "val_size: 3, scorer")},
     r"^stream s\.yaml, probe 1 \(p\): val_size: 3 holds out 3 of 4 evaluation rows; give a size of at least 1 "
     r"and at most half of them \(2\)$"),
    ({"task": TASK.replace("scorer", "val_sise: 2, scorer")}, r"val_sise: unknown key; did you mean 'val_size'\?"),
])
def test_a_bad_val_size_is_one_line(tmp_path, change, match):
    with pytest.raises(UserError, match=match) as e:
        load_stream(_stream(tmp_path, **change))
    assert "\n" not in str(e.value)


def _stream_files() -> list:
    from pathlib import Path

    from clsuite.streams import builtin_stream_files
    data = Path(__file__).parent / "data"
    return sorted(builtin_stream_files().values()) + sorted(data.glob("*.yaml"))


@pytest.mark.parametrize("path", _stream_files(), ids=lambda p: p.name)
def test_shipped_stream_files_fit_the_schema(path):
    """Every built-in and test stream validates, and each builder source fits its builder's signature (no data read)."""
    from clsuite import benchmarks  # noqa: F401  (registers the builders)
    from clsuite.stream_schema import LmEvalProbeSpec, StreamSpec, TaskSpec
    from clsuite.streams import DATA_BUILDERS, _check_arguments, _read_yaml
    spec = StreamSpec.model_validate(_read_yaml(path))
    entries = [LmEvalProbeSpec.model_validate(t) if "lm_eval" in t else TaskSpec.model_validate(t)
               for t in (spec.tasks or []) + (spec.probes or [])]
    sources = [e.source for e in entries if isinstance(e, TaskSpec)] + (
        [spec.general_data.source] if spec.general_data else [])
    for src in sources:
        if src.builder is not None:
            _check_arguments(DATA_BUILDERS.get(src.builder), src.builder, src.arguments(), path.name)
    assert entries and spec.model


@pytest.mark.slow
def test_cli_refuses_a_misspelt_key_with_exit_2(tmp_path):
    import subprocess
    import sys
    path = _stream(tmp_path, top="trian: {steps: 1}\n")
    r = subprocess.run([sys.executable, "-m", "clsuite.cli", "run", "--stream", path, "--out", str(tmp_path / "runs"),
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
    assert "stream s.yaml: trian: unknown key; did you mean 'train'?" in r.stderr
    assert not (tmp_path / "runs").exists()


# --- task orders: each seed trains the tasks in one of the stream's orders ---------------------------------------
TASK_B = TASK.replace("name: a", "name: b").replace("addition", "reversal")


def test_orders_give_each_seed_its_task_order(tmp_path):
    from clsuite.streams import in_order
    s = load_stream(_stream(tmp_path, top="orders: [[a, b], [b, a]]\n", task=TASK + "\n  - " + TASK_B))
    assert [t.name for t in s.tasks] == ["a", "b"]
    assert [[t.name for t in in_order(s, k).tasks] for k in range(4)] == [["a", "b"], ["b", "a"]] * 2
    plain = load_stream(_stream(tmp_path, task=TASK + "\n  - " + TASK_B))
    assert in_order(plain, 1) is plain  # no orders: as listed


@pytest.mark.parametrize("orders", ["[[a, b], [a]]", "[[a, a]]", "[[a, c]]"])
def test_an_order_must_name_each_task_once(tmp_path, orders):
    with pytest.raises(UserError, match=r"orders entry .* must name each task once \(a, b\)"):
        load_stream(_stream(tmp_path, top=f"orders: {orders}\n", task=TASK + "\n  - " + TASK_B))


def test_a_run_trains_and_records_its_seeds_order(tmp_path):
    """The record's task list (its R columns) is the order trained, and the fingerprint differs by order."""
    from clsuite.config import resolve_config
    from clsuite.records import cell_fingerprint
    from clsuite.streams import in_order
    s = load_stream(_stream(tmp_path, top="orders: [[a, b], [b, a]]\n", task=TASK + "\n  - " + TASK_B))
    fps = [cell_fingerprint(resolve_config(s, "naive", k), in_order(s, k))["train_data"] for k in (0, 1, 2)]
    assert fps[0] == fps[2] != fps[1]
