"""Property tests: malformed user input gives a one-line UserError, never another exception or a partial write.

Each property feeds arbitrary text/bytes and near-valid inputs built from a grammar (so the real code paths are
reached) to a user-facing entry point, and accepts exactly two outcomes: a valid result, or a UserError whose
message is one non-empty line (the CLI prints it as ``error: ...`` and exits with code 2).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clsuite import atomic
from clsuite.config import EvalConfig, RunConfig, TrainConfig
from clsuite.errors import UserError
from clsuite.lm_eval_probe import LmEvalSpec
from clsuite.reports.leaderboard import aggregate, frame, to_markdown
from clsuite.atomic import write_json as atomic_write_json
from clsuite.records import RunRecord, read_record
from clsuite.config import resolve_config
from clsuite.spec import parse_spec, split_specs
from clsuite.strategy import KINDS, STRATEGIES, Strategy, _load_builtins, build_strategy, canonical_spec
from clsuite.stream_schema import DataSpec, LmEvalProbeSpec, StreamSpec, TaskSpec
from clsuite.streams import Stream, Task, load_stream

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny-test.yaml"

# CLSUITE_FUZZ_SCALE=10 runs ten times as many examples (a deeper search than the ~1 min default).
SCALE = float(os.environ.get("CLSUITE_FUZZ_SCALE", "1"))


def examples(n: int) -> settings:
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


FUZZ, SLOW = examples(150), examples(60)

_load_builtins()
NAMES = STRATEGIES.names() + sorted(getattr(STRATEGIES, "_aliases", {}))
PARAMS = {n: sorted({f.alias or k for k, f in STRATEGIES.get(n).Params.model_fields.items()}
                    | set(STRATEGIES.get(n).Params.model_fields)) for n in NAMES}
ALL_PARAMS = sorted({p for ps in PARAMS.values() for p in ps})
LITERALS = ["true", "false", "none", "null", "True", "all-linear", "q_proj", "v_proj", "merge", "continue",
            "online", "separate", "reservoir", "balanced", "linear", "constant", "cosine", "initial",
            "previous", "inf", "nan", "''", '""']


def user_error_or(fn, *args, **kwargs):
    """``fn(*args)``, or None when it raises a UserError; the message must be one non-empty line."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        msg = str(e)
        assert msg.strip(), "empty UserError message"
        assert "\n" not in msg and "\r" not in msg, f"UserError message spans lines: {msg!r}"
        return None


# --- 1. strategy specs ------------------------------------------------------------------------------------
_word = st.from_regex(r"[A-Za-z_][\w.\-]{0,8}", fullmatch=True)
_num = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(0, 2).map(lambda x: f"{x:.3g}"),
    st.sampled_from(["0", "-1", "1e999", "-1e999", "1e-999", ".5", "5.", "+3", "1_000", "0x10", "1e", "1.2.3",
                     "-0", "1e308", "18446744073709551616"]),
    st.integers(300, 6000).map(lambda n: "9" * n),        # more digits than int() converts
    st.integers(305, 400).map(lambda n: "1" * n + ".5"),  # a float literal that overflows to inf
)
_quoted = st.one_of(st.text(max_size=8).filter(lambda s: "'" not in s).map(lambda s: f"'{s}'"),
                    st.text(max_size=8).filter(lambda s: '"' not in s).map(lambda s: f'"{s}"'))
_scalar = st.one_of(_num, st.sampled_from(LITERALS), _word, _quoted)
_value = st.one_of(
    st.recursive(_scalar, lambda inner: st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
                 max_leaves=8),
    st.integers(1, 5000).map(lambda n: "[" * n + "]" * n),  # nested brackets, deeper than the recursion limit
    st.integers(1, 3000).map(lambda n: "[" * n),
)
_space = st.sampled_from(["", "", " ", "  ", "\t", "\n"])


def _good_value(annotation) -> st.SearchStrategy[str]:
    """Plausible text for a parameter of this type (in range or near it), so valid specs with parameters occur."""
    if annotation is bool:
        return st.sampled_from(["true", "false", "True", "FALSE"])
    if annotation is int:
        return st.one_of(st.integers(0, 500).map(str), st.sampled_from(["1.0", "64", "'8'"]))
    if annotation is float:
        return st.one_of(st.floats(0, 1).map(repr), st.floats(0, 1).map(lambda x: f"{x:.2e}"),
                         st.integers(0, 300).map(str), st.sampled_from(["1e-3", ".5", "'0.5'", "true"]))
    if get_origin(annotation) is Literal:
        return st.sampled_from([str(a) for a in get_args(annotation)])
    quoted = st.text(max_size=6).filter(lambda s: "'" not in s).map(lambda s: f"'{s}'")
    return st.one_of(st.sampled_from(["all-linear", "q_proj", "[q_proj, v_proj]", "['all-linear']", "[]"]),
                     st.lists(st.one_of(_word, quoted), min_size=1, max_size=3).map(lambda xs: f"[{', '.join(xs)}]"))


GOOD = {n: {f.alias or k: _good_value(f.annotation) for k, f in STRATEGIES.get(n).Params.model_fields.items()}
        for n in NAMES}


@st.composite
def _good_term(draw) -> str:
    name = draw(st.sampled_from(NAMES))
    keys = draw(st.lists(st.sampled_from(sorted(GOOD[name]) or ["x"]), unique=True, max_size=3))
    args = [f"{k}={draw(GOOD[name][k])}" for k in keys if k in GOOD[name]]
    return f"{name}({', '.join(args)})" if args or draw(st.booleans()) else name


@st.composite
def _term(draw) -> str:
    if draw(st.booleans()):
        return draw(_good_term())
    name = draw(st.one_of(st.sampled_from(NAMES), st.sampled_from(NAMES), _word))
    if draw(st.booleans()):
        return name
    keys = PARAMS.get(name, ALL_PARAMS) or ALL_PARAMS
    args = []
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.one_of(st.sampled_from(keys), st.sampled_from(keys), st.sampled_from(ALL_PARAMS), _word))
        args.append(f"{key}{draw(_space)}={draw(_space)}{draw(_value)}")
    return f"{name}({draw(_space)}{(',' + draw(_space)).join(args)})"


@st.composite
def _spec(draw) -> str:
    text = "+".join(draw(st.lists(_term(), min_size=1, max_size=3)))
    if draw(st.integers(0, 5)) == 0:  # one typo: insert or delete a character
        i = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:i] + draw(st.sampled_from(list("()[]=,+'\" é\n\\-.0") + ["\x00"])) + text[i:]
        else:
            text = text[:i] + text[i + 1:]
    return text


def _signature(plugins: list[Strategy]) -> list:
    return [(p.name, p.params.model_dump()) for p in plugins]


def _check_plugins(plugins: list[Strategy]) -> None:
    assert plugins and all(isinstance(p, Strategy) for p in plugins)
    kinds = [KINDS.index(p.kind) for p in plugins]
    assert kinds == sorted(kinds)
    assert len({p.name for p in plugins}) == len(plugins)
    for p in plugins:
        for v in p.params.model_dump().values():
            assert not isinstance(v, float) or math.isfinite(v), f"{p!r} accepted a non-finite number"


def _check_spec(text: str) -> None:
    parsed = user_error_or(parse_spec, text)
    if parsed is not None:
        assert parsed and all(isinstance(n, str) and isinstance(p, dict) for n, p in parsed)
    plugins = user_error_or(build_strategy, text)
    if plugins is None:
        return
    assert parsed is not None
    _check_plugins(plugins)
    canon = canonical_spec(text)
    assert canonical_spec(canon) == canon, (text, canon)
    assert _signature(build_strategy(canon)) == _signature(plugins), (text, canon)


@FUZZ
@given(st.text(max_size=80))
def test_spec_arbitrary_text(text):
    specs = user_error_or(split_specs, text)
    if specs is not None:
        assert specs and all(s and s == s.strip() for s in specs)
    _check_spec(text)


@FUZZ
@given(_spec())
def test_spec_near_valid(text):
    _check_spec(text)


@pytest.mark.slow
@FUZZ
@given(st.lists(_spec(), min_size=1, max_size=3))
def test_split_specs_inverts_join(specs):
    """Valid specs joined with commas split back into themselves (brackets and quotes respected)."""
    specs = [s.strip() for s in specs if user_error_or(parse_spec, s) is not None]
    if specs:
        assert split_specs(", ".join(specs)) == specs


# --- 2. training / evaluation settings --------------------------------------------------------------------
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-5, 300), st.floats(),
                       st.text(max_size=6), st.sampled_from(["AdamW", "SGD", "cosine", "linear", "off", "cheap",
                                                             "full", "1e-3", "inf", "nan", "8"]))
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
_key = st.one_of(st.text(max_size=8), st.integers(), st.none(), st.just("a\nb"))


def _good_setting(annotation) -> st.SearchStrategy:
    """Values of the field's type, in range or near it (so that valid settings occur)."""
    args = set(get_args(annotation)) or {annotation}
    if get_origin(annotation) is Literal:
        return st.sampled_from(sorted(args))
    options = [st.none()] if type(None) in args else []
    if int in args:
        options.append(st.integers(-1, 64))
    if float in args:
        options += [st.floats(0, 1), st.floats(-1, 1e6), st.sampled_from([float("inf"), float("nan"), "1e-3"])]
    if str in args:
        options.append(st.sampled_from(["AdamW", "SGD", "Adam", ""]))
    return st.one_of(*options) if options else _json_leaf


@st.composite
def _settings_dict(draw, cls) -> dict:
    out = {}
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 4)):
            key = draw(st.sampled_from(sorted(cls.model_fields)))
            out[key] = draw(_good_setting(cls.model_fields[key].annotation))
        else:
            out[draw(_key)] = draw(st.one_of(_json_leaf, _json))
    return out


@FUZZ
@given(_settings_dict(TrainConfig), _settings_dict(EvalConfig))
def test_resolve_config(tiny_stream, train, eval):
    cfg = user_error_or(resolve_config, tiny_stream, "naive", 0, train=train, eval=eval)
    if cfg is not None:
        assert isinstance(cfg, RunConfig)
        for block in (cfg.train, cfg.eval):
            for v in block.model_dump().values():
                assert not isinstance(v, float) or math.isfinite(v), f"accepted a non-finite setting: {cfg}"


# --- 3. stream YAML files ---------------------------------------------------------------------------------
SOURCE = {"builder": "tiny_task", "skill": "addition", "n_train": 8, "n_eval": 4}
_small = st.one_of(st.integers(-2, 12), st.none(), st.booleans(), st.floats(-2, 12), st.text(max_size=4),
                   st.lists(st.integers(0, 3), max_size=2))
GENERAL = {"builder": "tiny_general", "skill": "copy", "n_eval": 4}


@st.composite
def _source(draw, probe: bool = False):
    if draw(st.integers(0, 19)) == 0:
        return draw(_small)
    src = dict(draw(st.sampled_from([SOURCE, GENERAL] if probe else [SOURCE] * 5 + [GENERAL])))
    for _ in range(draw(st.sampled_from([0] * 6 + [1, 2]))):
        key = draw(st.sampled_from(sorted(src) + ["extra", "seed"]))
        if draw(st.integers(0, 4)) == 0:
            src.pop(key, None)
        elif key == "builder":
            src[key] = draw(st.one_of(st.sampled_from(["tiny_task", "tiny_general", "nope", ""]), _small))
        elif key == "skill":
            src[key] = draw(st.one_of(st.sampled_from(["addition", "reversal", "copy", "max", "nope"]), _small))
        elif key in ("n_train", "n_eval"):
            src[key] = draw(st.one_of(st.integers(-2, 12), _small))
        else:
            src[key] = draw(_small)
    return src


_template = st.one_of(st.sampled_from(["{prompt}", "{target}", "{prompt} {target}", "{0}", "{", "}", "{a.b}",
                                       "{prompt:d}", "{prompt!r}", "{prompt[0]}", "{missing}", "plain", "{}",
                                       "{prompt:{target}}", "{prompt:>99999999999}", "{{x}} {prompt}"]), _small)
TASK_KEYS = ["name", "scorer", "source", "category", "train_split", "eval_split", "eval_size", "max_eval", "prompt",
             "target", "choices", "answer", "chat_template", "extra"]


@st.composite
def _task(draw, i: int, probe: bool = False):
    if draw(st.integers(0, 29)) == 0:
        return draw(st.one_of(_small, st.just(["name", "source", "scorer"])))
    t = {"name": f"{'p' if probe else 't'}{i}", "scorer": draw(st.sampled_from(["exact_match", "loglik"])),
         "source": draw(_source(probe))}
    for _ in range(draw(st.sampled_from([0] * 6 + [1, 2]))):
        key = draw(st.sampled_from(TASK_KEYS))
        if draw(st.integers(0, 4)) == 0:
            t.pop(key, None)
        elif key == "scorer":
            t[key] = draw(st.one_of(st.sampled_from(["exact_match", "loglik", "nope"]), _small))
        elif key in ("prompt", "target"):
            t[key] = draw(_template)
        elif key in ("choices", "answer"):
            t[key] = draw(st.one_of(st.sampled_from(["prompt", "target", "missing"]), _small))
        elif key in ("train_split", "eval_split"):
            t[key] = draw(st.one_of(st.sampled_from(["train", "eval", "test"]), _small))
        elif key == "name":
            t[key] = draw(st.one_of(st.sampled_from(["t0", "t1", "p0", "a\nb", ""]), _small))
        elif key == "category":
            t[key] = draw(st.one_of(st.sampled_from(["general", ""]), _small))
        else:
            t[key] = draw(st.one_of(_small, st.floats(0, 1)))
    return t


def _task_list(probe: bool):
    return st.integers(0 if probe else 1, 2).flatmap(lambda n: st.tuples(*[_task(i, probe) for i in range(n)])
                                                     .map(list))


@st.composite
def _stream_doc(draw):
    doc = {"name": "fuzz", "model": "tiny-synthetic-base", "tasks": draw(_task_list(False))}
    if draw(st.booleans()):
        doc["probes"] = draw(_task_list(True))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        key = draw(st.sampled_from(["name", "model", "tasks", "probes", "train", "eval", "include", "data_seed",
                                    "chat_template", "general_data", "description"]))
        if draw(st.integers(0, 4)) == 0:
            doc.pop(key, None)
        elif key in ("tasks", "probes"):
            doc[key] = draw(st.one_of(_task_list(key == "probes"), _small))
        elif key in ("train", "eval"):
            doc[key] = draw(st.one_of(_settings_dict(TrainConfig if key == "train" else EvalConfig), _small))
        elif key == "include":
            inc = st.sampled_from(["base.yaml", "base.yaml", "missing.yaml", "", ".", "doc.yaml", "junk.bin",
                                   "deep.yaml", "a\x00b"])
            doc[key] = draw(st.one_of(inc, st.lists(inc, max_size=2), _small))
        elif key == "general_data":
            doc[key] = draw(st.one_of(st.fixed_dictionaries({"source": _source()}), _small))
        elif key == "data_seed":
            doc[key] = draw(st.one_of(st.integers(0, 3), _small, st.sampled_from(["abc", "1e400", "7", 1e400])))
        elif key == "name":
            doc[key] = draw(st.one_of(st.sampled_from(["x", "", "a\nb", "a\rb", "über"]), _small))
        elif key == "model":
            doc[key] = draw(st.one_of(st.sampled_from(["tiny-synthetic-base", "some/hub-id", ""]), _small))
        else:
            doc[key] = draw(_small)
    return doc


def _write_siblings(d: Path) -> None:
    (d / "base.yaml").write_text(yaml.safe_dump({"model": "tiny-synthetic-base", "train": {"steps": 2},
                                                 "tasks": [{"name": "b", "scorer": "loglik", "source": SOURCE}]}))
    (d / "junk.bin").write_bytes(b"\xff\xfe\x00name: \x80")
    (d / "deep.yaml").write_text("[" * 20000)


def _check_stream(path: Path) -> None:
    s = user_error_or(load_stream, str(path))
    if s is None:
        return
    assert isinstance(s, Stream) and isinstance(s.name, str) and isinstance(s.model, str)
    assert s.tasks and all(isinstance(t, Task) for t in s.tasks + s.probes)
    assert all(isinstance(t.name, str) for t in s.tasks + s.probes)
    assert isinstance(s.train, dict) and isinstance(s.eval, dict)
    user_error_or(resolve_config, s, "naive", 0)


@SLOW
@given(_stream_doc())
def test_stream_yaml_near_valid(doc):
    with tempfile.TemporaryDirectory() as d:
        _write_siblings(Path(d))
        path = Path(d) / "doc.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        _check_stream(path)


@pytest.mark.slow
@SLOW
@given(st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode),
                 st.sampled_from([b"[" * 20000, b"{a: " * 3000, b"a: &x [*x]\nname: *x", b"name: !!python/none x",
                                  b"- 1\n- 2", b"tasks: {", b"\xef\xbb\xbfname: x", b"", b"include: " + b"x" * 5000])))
def test_stream_yaml_arbitrary_bytes(data):
    with tempfile.TemporaryDirectory() as d:
        _write_siblings(Path(d))
        path = Path(d) / "doc.yaml"
        path.write_bytes(data)
        _check_stream(path)


# every schema level refuses a key it does not know: a UserError naming where, never a silently ignored key
LM_EVAL_TASKS = str(ROOT / "tests" / "data" / "lm_eval_tasks")
SCHEMA_KEYS = {  # where an unknown key goes -> the keys known there
    "top": set(StreamSpec.model_fields), "task": set(TaskSpec.model_fields) | {"lm_eval"},
    "probe": set(TaskSpec.model_fields) | {"lm_eval"}, "lm_eval_probe": set(LmEvalProbeSpec.model_fields),
    "lm_eval": set(LmEvalSpec.model_fields), "source": {"skill", "n_train", "n_eval"},  # tiny_task's arguments
    "train": set(TrainConfig.model_fields), "eval": set(EvalConfig.model_fields),
    "general_data": set(DataSpec.model_fields)}
SCHEMA_WHERE = {"top": "stream doc.yaml: ", "task": "task 1 (t0): ", "probe": "probe 1 (p0): ",
                "lm_eval_probe": "probe 1 (lp): ", "lm_eval": "probe 1 (lp): lm_eval.",
                "source": "task 1 (t0): source.", "train": "stream doc.yaml: train.",
                "eval": "stream doc.yaml: eval.", "general_data": "stream doc.yaml: general_data."}


@st.composite
def _near_miss(draw, known: set) -> str:
    """A known key with one character deleted, doubled or swapped with the next: a typo."""
    key = draw(st.sampled_from(sorted(known)))
    i = draw(st.integers(0, len(key) - 1))
    op = draw(st.sampled_from(["delete", "double", "swap"]))
    return {"delete": key[:i] + key[i + 1:], "double": key[:i] + key[i] + key[i:],
            "swap": key[:i] + key[i + 1:i + 2] + key[i] + key[i + 2:]}[op]


@st.composite
def _unknown_key_doc(draw) -> tuple[dict, str, object, bool]:
    where = draw(st.sampled_from(sorted(SCHEMA_KEYS)))
    known = SCHEMA_KEYS[where]
    typo = draw(st.booleans())
    key = draw(_near_miss(known) if typo else st.one_of(st.text(max_size=12), st.integers(), st.booleans(),
                                                         st.none(), st.sampled_from(["extra", "seed", "Name"])))
    assume(key not in known and not (where == "source" and key == "builder"))
    lm_eval = where in ("lm_eval_probe", "lm_eval")
    probe = ({"name": "lp", "lm_eval": {"task": "tiny_mc", "include_path": LM_EVAL_TASKS, "include_defaults": False}}
             if lm_eval else {"name": "p0", "scorer": "exact_match", "source": dict(GENERAL)})
    doc = {"name": "fuzz", "model": "tiny-synthetic-base", "train": {"steps": 2}, "eval": {"batch_size": 4},
           "tasks": [{"name": "t0", "scorer": "exact_match", "source": dict(SOURCE)}], "probes": [probe],
           "general_data": {"source": {"builder": "tiny_general_mix", "n": 20}, "eval_size": 2}}
    target = {"top": doc, "task": doc["tasks"][0], "probe": probe, "lm_eval_probe": probe,
              "lm_eval": probe.get("lm_eval"), "source": doc["tasks"][0]["source"], "train": doc["train"],
              "eval": doc["eval"], "general_data": doc["general_data"]}[where]
    target[key] = draw(_small)
    return doc, where, key, typo


@SLOW
@given(_unknown_key_doc())
def test_stream_unknown_keys_are_refused(case):
    doc, where, key, typo = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "doc.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        with pytest.raises(UserError) as e:
            load_stream(str(path))
    msg = str(e.value)
    assert msg.strip() and "\n" not in msg and "\r" not in msg, msg
    assert SCHEMA_WHERE[where] in msg, (where, msg)
    if isinstance(key, str):
        assert "unknown key" in msg or "unknown argument" in msg, msg
        if typo and len(key) >= 3:
            assert "did you mean" in msg, msg
    else:
        assert "Keys should be strings" in msg, msg


def test_stream_path_is_directory(tmp_path):
    (tmp_path / "d.yaml").mkdir()
    assert user_error_or(load_stream, str(tmp_path / "d.yaml")) is None


# --- 4. run records ---------------------------------------------------------------------------------------
VALID = {"schema_version": 1, "status": "complete", "stream": "s", "strategy": "naive", "seed": 0, "model": "m",
         "config": {}, "tasks": ["a", "b"], "probes": ["p"], "R": [[0.1, 0.2], [0.9, 0.2], [0.5, 0.8]],
         "P": [[0.3], [0.3], [0.2]], "metrics": {"acc": 0.65, "bwt": None}}
_jsonish = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


@st.composite
def _mutated_record(draw) -> str:
    rec = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(VALID) + ["extra", "cost", "error", "wall_seconds", "_private",
                                                    "model_config", "experiences"]))
        op = draw(st.integers(0, 5))
        if op == 0:
            rec.pop(key, None)
        elif op == 1:
            rec[key] = draw(_jsonish)
        elif op == 2 and key in ("R", "P"):
            rows = rec[key] if isinstance(rec.get(key), list) else []
            if rows and draw(st.booleans()):
                rows.pop(draw(st.integers(0, len(rows) - 1)))
            elif rows:
                rows[draw(st.integers(0, len(rows) - 1))] = draw(st.lists(st.floats(), max_size=3))
        elif op == 3:
            rec[key] = draw(st.sampled_from([float("nan"), float("inf"), [[float("nan")]], "x" * 200_000]))
        elif op == 4 and key in ("R", "P", "tasks", "probes"):
            rec[key] = [] if key in ("tasks", "probes") else [[]]
        else:
            rec["status"] = draw(st.sampled_from(["complete", "failed", "running", 1]))
    text = json.dumps(rec)  # NaN/Infinity literals where the values are non-finite
    if draw(st.integers(0, 5)) == 0:
        text = text.replace('"seed": 0', '"seed": ' + "9" * draw(st.integers(1, 6000)))
    return text


def _check_record(path: Path) -> None:
    r = user_error_or(read_record, path)
    if r is None:
        return
    assert isinstance(r, RunRecord)
    if r.status == "complete":
        assert len(r.R) == len(r.tasks) + 1 and len(r.P) == len(r.tasks) + 1
        assert all(math.isfinite(x) for row in r.R + r.P for x in row)


@FUZZ
@given(st.one_of(_mutated_record(), _jsonish.map(json.dumps), st.binary(max_size=60),
                 st.sampled_from(["[" * 100_000, '{"a": ' * 100_000, '{"seed": ' + "1" * 5000 + "}", "NaN",
                                  json.dumps(VALID).replace("0.65", "NaN"), "\ufeff{}"])))
def test_read_record(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.json"
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        _check_record(path)


def test_read_record_directory_and_missing(tmp_path):
    for p in (tmp_path, tmp_path / "missing.json"):
        assert user_error_or(read_record, p) is None


_MARKUP = list("|<>`*_[]()#&\\\n\t -ab\u2028\x0b\x00") + ["<script>", "</td>", "&#124;", "**", "```"]
_markup = st.lists(st.sampled_from(_MARKUP), min_size=1, max_size=12).map("".join)


def _markdown(strategies: list[str], stream: str) -> str:
    recs = [RunRecord(**{**VALID, "strategy": s, "stream": stream, "seed": k, "metrics": {"acc": 0.1 * k}})
            for k, s in enumerate(strategies)]
    return to_markdown(aggregate(frame(recs)))


def _check_table(md: str, rows: int) -> None:
    lines = md.split("\n")
    assert len(lines) == 2 + rows, md  # no cell was split over lines
    assert "<" not in md and "\r" not in md, md
    assert len({line.count("|") for line in lines}) == 1, md  # no cell was split by a raw '|'


@pytest.mark.slow
@FUZZ
@given(st.lists(_markup, min_size=1, max_size=4, unique=True), _markup)
def test_markdown_escapes_record_text(strategies, stream):
    _check_table(_markdown(strategies, stream), len(strategies))


def test_markdown_escapes_carriage_return():
    _check_table(_markdown(["|\r|"], "s"), 1)


# --- 5. CLI -----------------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "clsuite.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def _check_cli(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
    assert res.stderr.startswith("error: ")


_arg = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=20)


@pytest.mark.slow
@examples(8)
@given(st.one_of(st.binary(max_size=40), _mutated_record(), st.sampled_from([b"[" * 100_000, "DIR", "MISSING"])))
def test_cli_show_bad_record(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.json"
        if content == "DIR":
            path.mkdir()
        elif content != "MISSING":
            (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        res = _cli("show", str(path))
        if res.returncode == 0:  # a mutation that is still a valid record
            assert read_record(path)
            return
        _check_cli(res)


def _check_cli_run(arg: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        _check_cli(_cli("run", f"--stream={TINY}", f"--out={d}", "--quiet", arg))
        assert not any(Path(d).iterdir())  # nothing written


@pytest.mark.slow
@examples(3)
@given(st.one_of(_arg.map(lambda s: f"--seeds=x{s}"), _arg.map(lambda s: f"--set={s.replace('=', '')}"),
                 _arg.map(lambda s: f"--strategies=naive,({s}"), _arg.map(lambda s: f"--sharpness=x{s}"),
                 st.integers(max_value=0).map(lambda n: f"--set=steps={n}"),
                 st.from_regex(r"[a-z_]{1,8}", fullmatch=True).map(lambda k: f"--set=x_{k}=1")))
def test_cli_run_bad_argument(arg):
    _check_cli_run(arg)


@pytest.mark.slow
def test_cli_set_value_that_is_not_yaml():
    _check_cli_run("--set=lr=[0")


# --- 6. atomic writes -------------------------------------------------------------------------------------
class _Boom(BaseException):  # like KeyboardInterrupt: not an Exception
    pass


def _finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(map(_finite, obj.values()))
    if isinstance(obj, list):
        return all(map(_finite, obj))
    return not isinstance(obj, float) or math.isfinite(obj)


@pytest.mark.slow
@FUZZ
@given(_jsonish, _jsonish, st.sampled_from(["dump", "write", "fsync", "replace", "none"]), st.integers(0, 5))
def test_atomic_write_json_interrupted(old, new, where, after):
    """An interrupted write leaves the previous content and no temp file; a finished one the new content."""
    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        path = Path(d) / "sub" / "r.json"
        if _finite(old):  # else: no previous file
            atomic_write_json(path, old)
        before = path.read_bytes() if path.exists() else None
        real_dump = json.dump

        def boom(*a, **k):
            raise _Boom

        if where == "dump":  # write some chunks, then fail
            def dump(obj, f, **kw):
                text = json.dumps(obj, **kw)
                f.write(text[:after * 7])
                raise _Boom
            mp.setattr(atomic.json, "dump", dump)
        elif where == "fsync":
            mp.setattr(atomic.os, "fsync", boom)
        elif where == "replace":
            mp.setattr(atomic.os, "replace", boom)
        elif where == "write":
            def dump(obj, f, **kw):
                real_dump(obj, f, **kw)
                f.write("x" * after)
                raise _Boom
            mp.setattr(atomic.json, "dump", dump)
        try:
            atomic_write_json(path, new)
            finished = True
        except (_Boom, ValueError):  # ValueError: NaN/Infinity are refused
            finished = False
        mp.undo()
        names = sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else []
        assert names in ([], ["r.json"]), names  # no temp file left behind
        if finished:
            assert where == "none"
            assert json.loads(path.read_text()) == json.loads(json.dumps(new))
        else:
            assert (path.read_bytes() if path.exists() else None) == before
            if _finite(old):
                assert json.loads(path.read_text()) == json.loads(json.dumps(old))
