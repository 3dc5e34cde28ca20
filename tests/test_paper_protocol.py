"""The paper's protocol offline: the real paper-*.yaml definitions on local files shaped like the hub datasets,
lm-eval probes on the in-memory model (a local task via include_path), and the epoch-based training budget."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import yaml

from clsuite.config import RunConfig, TrainConfig
from clsuite.errors import UserError
from clsuite.streams import load_stream

from conftest import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
BENCH = ROOT / "benchmarks" / "streams"
TASKS = "tests/data/lm_eval_tasks"  # relative to the repository root, as the task YAMLs' data_files are
# hub load_dataset arguments of each paper stream -> the same loader on a local file shaped like that dataset
LOCAL = {
    "garage-bAInd/Open-Platypus": {"path": "json", "data_files": str(DATA / "paper" / "open-platypus.jsonl")},
    "meta-math/MetaMathQA": {"path": "json", "data_files": str(DATA / "paper" / "metamathqa.jsonl")},
    "json": {"path": "json", "data_files": str(DATA / "paper" / "sharegpt-v3.json")},  # ShareGPT: already json
    "yahma/alpaca-cleaned": {"path": "json", "data_files": str(DATA / "paper" / "alpaca-cleaned.jsonl")},
}
LOCAL_PROBE = {"name": "tiny_mc", "category": "knowledge",
               "lm_eval": {"task": "tiny_mc", "include_path": TASKS, "include_defaults": False}}
HEAD = "Below is an instruction that describes a task"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _local(source: dict) -> dict:
    """The same source with only its load_dataset arguments pointed at the local fixture."""
    out = copy.deepcopy(source)
    out["load"] = {**LOCAL[source["load"]["path"]], "split": source["load"]["split"]}
    return out


def offline_stream(tmp_path: Path, name: str, **override) -> Path:
    """A stream file that includes benchmarks/streams/<name>.yaml and overrides only data paths, model and probes."""
    real = yaml.safe_load((BENCH / f"{name}.yaml").read_text())
    base = yaml.safe_load((BENCH / "_paper-base.yaml").read_text())
    doc = {"include": str(BENCH / f"{name}.yaml"), "name": f"{name}-offline", "model": "tiny-synthetic-base",
           "tasks": [{**t, "source": _local(t["source"])} for t in real["tasks"]],
           "general_data": {**base["general_data"], "source": _local(base["general_data"]["source"])},
           "probes": [LOCAL_PROBE], **override}
    path = tmp_path / f"{name}-offline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _rows(name: str) -> list[dict]:
    text = (DATA / "paper" / name).read_text()
    return json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]


# --- the paper streams, loaded through the same load_dataset path ---------------------------------------------
@pytest.mark.parametrize("name, fixture, instruction, output", [
    ("paper-platypus", "open-platypus.jsonl", "instruction", "output"),
    ("paper-metamath", "metamathqa.jsonl", "query", "response"),
])
def test_instruction_streams_are_alpaca_prompts(tmp_path, name, fixture, instruction, output):
    s = load_stream(str(offline_stream(tmp_path, name)))
    rows = _rows(fixture)
    t = s.tasks[0]
    assert len(t.train) + len(t.val) + len(t.eval) == len(rows)
    assert len(t.eval) == len(t.val) == 1  # eval_size 1%: one test row; as many validation rows
    by_target = {r[output]: r for r in rows}
    for ex in list(t.train) + list(t.val) + list(t.eval):
        src = by_target[ex["target"]]
        assert ex["prompt"].startswith(HEAD) and ex["prompt"].endswith("### Response:\n")
        assert f"### Instruction:\n{src[instruction]}\n\n" in ex["prompt"]
        assert ("### Input:\n" in ex["prompt"]) == bool(src.get("input", "").strip())
    # the real paper settings arrive through include: (only data, model and probes were overridden)
    assert s.train["epochs"] == 2 and s.train["lr"] == 5e-6 and s.train["batch_size"] == 128
    assert s.general is not None and all(r["prompt"].startswith(HEAD) for r in s.general)
    assert [(p.name, p.category) for p in s.probes] == [("tiny_mc", "knowledge")]


def test_sharegpt_stream_first_exchanges(tmp_path):
    s = load_stream(str(offline_stream(tmp_path, "paper-sharegpt")))
    rows = list(s.tasks[0].train) + list(s.tasks[0].val) + list(s.tasks[0].eval)
    convs = _rows("sharegpt-v3.json")
    assert len(rows) == len(convs) - 1  # the conversation with no answered human turn has no pair
    targets = {r["target"] for r in rows}
    assert "The capital of France is Paris." in targets and "Rome is the capital of Italy." not in targets
    assert "It sums a list of numbers with a for loop." in targets  # a leading gpt turn is skipped


def test_conversation_flattener_all_turns():
    from clsuite.benchmarks.builders.paper import alpaca_prompt, conversation_pairs
    conv = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
            {"from": "human", "value": "bye"}]
    first = conversation_pairs(conv, "value", all_turns=False)
    assert first == [(alpaca_prompt("hi"), "hello")]
    both = conversation_pairs(conv, "value", all_turns=True)
    assert [t for _, t in both] == ["hello", "4"]
    assert both[1][0] == alpaca_prompt("2+2?").replace(
        "### Instruction:", "### Instruction:\nhi\n\n### Response:\nhello\n\n### Instruction:", 1)
    assert "be brief" not in both[1][0]


@pytest.mark.parametrize("source, match", [
    ({"builder": "alpaca", "load": {"path": "json", "data_files": str(DATA / "paper" / "metamathqa.jsonl"),
                                    "split": "train"}}, "column.*instruction.*not in the data"),
    ({"builder": "alpaca", "load": "meta-math/MetaMathQA"}, "'load:' must be load_dataset arguments"),
    ({"builder": "sharegpt", "turns": "some", "load": {"path": "json", "data_files": "x.json"}}, "turns must be"),
    ({"builder": "sharegpt", "load": {"path": "json", "data_files": str(DATA / "paper" / "metamathqa.jsonl"),
                                      "split": "train"}}, "conversations.*not in the data"),
])
def test_builder_errors(tmp_path, source, match):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(
        {"name": "x", "model": "m", "tasks": [{"name": "t", "scorer": "loglik", "source": source}]}))
    with pytest.raises(UserError, match=match):
        load_stream(str(tmp_path / "s.yaml"))


def test_paper_probes_are_lm_eval_tasks_with_their_metric():
    """The real probe definitions: strict schema, task names and metrics as lm-eval's own YAML files declare them."""
    from clsuite.lm_eval_probe import check_task, parse_spec, task_manager
    from clsuite.benchmarks.builders.real_text import package_dir
    root = package_dir("lm_eval") / "tasks"
    folders = ["mmlu/default", "super_glue/boolq", "super_glue/copa", "glue/rte", "siqa", "race", "hellaswag",
               "openbookqa", "arc"]
    tm = task_manager(tuple(str(root / f) for f in folders), False)
    probes = yaml.safe_load((BENCH / "_paper-base.yaml").read_text())["probes"]
    assert {p["category"] for p in probes} == {"knowledge", "reasoning", "understanding", "exams"}
    for p in probes:
        check_task(tm, parse_spec(p, p["name"]), p["name"])


# --- lm-eval probes on the in-memory model ----------------------------------------------------------------------
def _bos_tokenizer():
    """tiny-synthetic's tokenizer, adding BOS itself as Llama's does (lm-eval relies on that, clsuite prepends it)."""
    from tokenizers import processors

    from clsuite.benchmarks.models.tiny_synthetic import make_tokenizer
    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


def _probe(**lm_eval):
    from clsuite.lm_eval_probe import load_probe
    return load_probe({**LOCAL_PROBE, "lm_eval": {**LOCAL_PROBE["lm_eval"], **lm_eval}}, "test probe")


def test_lm_eval_score_equals_clsuite_multiple_choice():
    from clsuite.scoring import choice_logliks, multiple_choice
    model, _ = tiny_llama(seed=3, hidden=32, layers=2)
    tok = _bos_tokenizer()
    assert tok("ab")["input_ids"][0] == tok.bos_token_id
    probe = _probe()
    model.train()
    got = probe.score(model, tok, batch_size=5)
    assert model.training, "the model's train mode is restored"
    rows = [{"prompt": r["question"] + ":", "choices": [" " + c for c in r["choices"]], "answer": r["label"],
             "target": " " + r["choices"][r["label"]]} for r in map(json.loads, open(f"{TASKS}/tiny_mc.jsonl"))]
    mine = multiple_choice(model.eval(), tok, rows, False, 64, 5)
    assert 0 < got["score"] < 1 and got["n_samples"] == len(rows)
    assert got["score"] == mine["score"] == got["acc"]
    # the same choice log-likelihoods, request by request
    ll = choice_logliks(model, tok, rows, False, 64, 5)
    inst = sorted(probe.loaded["tasks"]["tiny_mc"].instances, key=lambda i: (i.doc_id, i.idx))
    assert [i.args for i in inst] == [(r["prompt"], c) for r in rows for c in r["choices"]]
    assert [i.resps[0][0] for i in inst] == pytest.approx([x for row in ll for x in row], abs=1e-4)


def test_lm_eval_fewshot_prompts_are_the_same_at_every_evaluation():
    model, tok = tiny_llama(seed=1)
    probe = _probe(task="tiny_mc_fewshot", num_fewshot=3, limit=4)
    first = probe.score(model, tok, batch_size=8)
    args1 = [i.args for i in probe.loaded["tasks"]["tiny_mc_fewshot"].instances]
    second = probe.score(model, tok, batch_size=8)
    args2 = [i.args for i in probe.loaded["tasks"]["tiny_mc_fewshot"].instances]
    assert len(args1) == 12 and args1 == args2 and first == second
    assert all(a[0].count("\n\n") == 3 for a in args1), "three few-shot examples before each question"


def test_lm_eval_group_probe_and_max_examples():
    model, tok = tiny_llama(seed=2)
    probe = _probe(task="tiny_group")
    whole = probe.score(model, tok, batch_size=8)
    a = _probe().score(model, tok, batch_size=8)
    b = _probe(task="tiny_mc_fewshot").score(model, tok, batch_size=8)
    assert whole["score"] == pytest.approx((a["score"] + b["score"]) / 2)  # equal sizes: the mean
    assert whole["n_samples"] == 24
    assert probe.score(model, tok, batch_size=8, max_examples=3)["n_samples"] == 6  # 3 per task
    # what identifies the probe's data (the initial-row cache keys on it): the same for every load, no object ids
    assert repr(probe) == repr(_probe(task="tiny_group")) and "'tiny_mc_fewshot': [1.0, 12]" in repr(probe)


@pytest.mark.parametrize("probe, match", [
    ({"name": "p", "lm_eval": {"task": "tiny_mc", "include_path": TASKS, "shots": 5}},
     r"lm_eval\.shots: unknown key; known: fewshot_seed, include_defaults, include_path, limit, metric"),
    ({"name": "p", "scorer": "multiple_choice", "lm_eval": {"task": "tiny_mc", "include_path": TASKS}},
     r"probe 1 \(p\): scorer: unknown key; known: category, lm_eval, name"),
    ({"name": "p", "lm_eval": "tiny_mc"}, "'lm_eval:' must be a mapping"),
    ({"name": "p", "lm_eval": {"task": "tiny_m", "include_path": TASKS, "include_defaults": False}},
     "unknown lm-eval task 'tiny_m': did you mean 'tiny_mc'"),
    ({"name": "p", "lm_eval": {"task": "tiny_mc", "include_path": TASKS, "include_defaults": False,
                               "metric": "f1"}}, "reports acc, acc_norm, not 'f1'"),
    ({"name": "p", "lm_eval": {"task": "tiny_mc_plain", "include_path": TASKS, "include_defaults": False,
                               "metric": "exact_match"}}, "reports acc, acc_norm, not 'exact_match'"),
    ({"name": "p", "lm_eval": {"task": "tiny_group", "include_path": TASKS, "include_defaults": False,
                               "metric": "acc_norm"}}, "group 'tiny_group' reports acc, not 'acc_norm'"),
    ({"name": "p", "lm_eval": {"task": "tiny_mc", "include_path": "no/such/dir"}}, "is not a folder"),
    ({"name": "p", "lm_eval": {"task": "tiny_mc", "include_defaults": False}}, "no include_path"),
    ({"name": "p", "lm_eval": {"task": "tiny_mc", "include_path": TASKS, "num_fewshot": -1}},
     "num_fewshot: Input should be greater than or equal to 0"),
    ({"lm_eval": {"task": "tiny_mc", "include_path": TASKS}}, "missing 'name:'"),
    ({"name": "p", "lm_eval": {"task": "tiny_mc_missing", "include_path": TASKS, "include_defaults": False}},
     "lm-eval cannot load task 'tiny_mc_missing'"),
])
def test_lm_eval_probe_yaml_is_strict(tmp_path, probe, match):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(
        {"include": str(ROOT / "tests" / "data" / "tiny-test.yaml"), "name": "x", "probes": [probe]}))
    with pytest.raises(UserError, match=match) as e:
        load_stream(str(tmp_path / "s.yaml"))
    assert "\n" not in str(e.value)


def test_lm_eval_is_for_probes_only(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(
        {"name": "x", "model": "m", "tasks": [{"name": "t", "lm_eval": {"task": "tiny_mc"}}]}))
    with pytest.raises(UserError, match="'lm_eval:' is for probes"):
        load_stream(str(tmp_path / "s.yaml"))


# --- the training budget in epochs --------------------------------------------------------------------------------
def test_epochs_budget_settings():
    assert TrainConfig().steps == 100 and TrainConfig().epochs is None
    cfg = TrainConfig(epochs=2, batch_size=4)
    assert cfg.steps is None and cfg.steps_for(10) == 5 and TrainConfig(epochs=0.5, batch_size=4).steps_for(10) == 2
    assert TrainConfig(steps=7).steps_for(10_000) == 7
    with pytest.raises(ValueError, match="both set"):
        TrainConfig(steps=7, epochs=1)
    dumped = RunConfig(stream="s", train=cfg).model_dump()  # a record's config validates back to the same config
    assert RunConfig.model_validate(dumped) == RunConfig(stream="s", train=cfg)


def test_epochs_conflict_with_a_streams_steps_is_one_line(tiny_stream):
    from clsuite.config import resolve_config
    with pytest.raises(UserError, match=r"steps \(3\) and epochs \(1\.0\) are both set.*--set epochs=null"):
        resolve_config(tiny_stream, "naive", 0, train={"epochs": 1})
    assert resolve_config(tiny_stream, "naive", 0, train={"epochs": 1, "steps": None}).train.epochs == 1


def test_paper_run_sam_one_epoch_vs_adamw_two(tmp_path):
    """The paper's comparison end to end on the tiny model: steps from epochs, lm-eval probe in P with its category."""
    from clsuite.records import read_record
    from clsuite.config import resolve_config
    from clsuite.runner import run_one
    s = load_stream(str(offline_stream(tmp_path, "paper-platypus")))
    small = {"batch_size": 6, "grad_accum": 2, "max_length": 96, "lr": 1e-3}
    rows = len(s.tasks[0].train)
    assert rows == 6  # 8 rows less a test and a validation row: whole batches, so 2 epochs take twice 1's steps
    out = {}
    for spec, epochs in (("naive", 2), ("sam(rho=0.05)+replay(general=1)", 1)):
        cfg = resolve_config(s, spec, 0, train={**small, "epochs": epochs}, eval={"batch_size": 8, "max_length": 96})
        out[spec] = read_record(run_one(s, cfg, tmp_path / "runs", progress=False))
        r = out[spec]
        assert [e["steps"] for e in r.experiences] == [math.ceil(epochs * rows / 6)]
        assert r.probes == ["tiny_mc"] and r.probe_categories == {"tiny_mc": "knowledge"}
        assert len(r.P) == 2 and all(0 <= row[0] <= 1 for row in r.P)
        assert r.details[0]["probes"]["tiny_mc"]["n_samples"] == 12
        assert r.cost["compute_multiplier"] == pytest.approx(2.0 if spec.startswith("sam") else 1.0)
    naive, sam = out["naive"], out["sam(rho=0.05)+replay(general=1)"]
    assert naive.P[0] == sam.P[0]  # the same base model and probe before training
    passes = [r.cost["compute_multiplier"] * r.experiences[0]["steps"] for r in (naive, sam)]
    assert passes[0] == passes[1], "SAM for 1 epoch costs what AdamW costs for 2"
