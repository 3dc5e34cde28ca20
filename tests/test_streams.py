import json

import pytest

from clsuite.errors import UserError
from clsuite.streams import load_stream


def test_builtin_stream_loads():
    s = load_stream("tiny-synthetic")
    assert [t.name for t in s.tasks] == ["addition", "reversal", "sorting", "recall", "cipher"]
    assert all(t.train is not None and len(t.eval) == 100 for t in s.tasks)
    assert all(p.train is None for p in s.probes)
    t = s.tasks[0]
    assert not set(t.train["prompt"]) & set(t.eval["prompt"]), "train and eval must not share prompts"


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
    assert len(s.tasks[0].eval) == 5 and len(s.tasks[0].train) == 15
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
