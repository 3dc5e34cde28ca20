"""Replay: buffer policies (uniform reservoir, balanced shares), batch mixing, general data, state, engine."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

from conftest import tiny_llama
import pytest
from datasets import Dataset

from clsuite.errors import UserError
from clsuite.strategies.replay import Replay, ReplayParams
from clsuite.strategy import Strategy, build_strategy


def _task(t: int, n: int = 100) -> list[dict]:
    return [{"prompt": f"t{t} q{i}", "target": f"a{i}", "id": t * n + i} for i in range(n)]


def _replay(seed: int = 0, **kw) -> Replay:
    r = Replay(ReplayParams(**kw))
    r.rng = random.Random(seed)
    return r


def _inclusion(policy: str, trials: int) -> list[int]:
    counts = [0] * 300
    for seed in range(trials):
        r = _replay(seed, size=30, policy=policy)
        for t in range(3):
            r.add_task(f"task{t}", _task(t))
        assert len(r.buffer) == 30
        for row in r.buffer:
            counts[row["id"]] += 1
    return counts


@pytest.mark.parametrize("policy", ["reservoir", "balanced"])
def test_every_example_equally_likely(policy):
    """3 tasks x 100 examples into 30 slots: each example is kept with probability 0.1 (both policies here)."""
    trials, p = 1000, 0.1
    counts = _inclusion(policy, trials)
    expected = trials * p
    chi2 = sum((c - expected) ** 2 for c in counts) / (expected * (1 - p))  # ~ chi-square, ~300 degrees of freedom
    assert 200 < chi2 < 420, chi2
    for t in range(3):  # each task keeps a third of the buffer on average
        assert sum(counts[t * 100:(t + 1) * 100]) / trials == pytest.approx(10, abs=0.4)


def test_reservoir_is_uniform_over_unequal_tasks():
    """Reservoir keeps tasks in proportion to their size (uniform over examples), balanced does not."""
    sizes, trials = (20, 180), 400
    shares = {"reservoir": [0, 0], "balanced": [0, 0]}
    for policy in shares:
        for seed in range(trials):
            r = _replay(seed, size=20, policy=policy)
            for t, n in enumerate(sizes):
                r.add_task(f"task{t}", _task(t, n))
            c = r.counts()
            shares[policy][0] += c["task0"]
            shares[policy][1] += c["task1"]
    assert shares["reservoir"][0] / trials == pytest.approx(2, abs=0.3)  # 20 * 20/200
    assert shares["balanced"] == [10 * trials, 10 * trials]


def test_balanced_equal_shares():
    r = _replay(size=31, policy="balanced")
    r.add_task("a", _task(0))
    assert r.counts() == {"a": 31}
    r.add_task("b", _task(1))
    assert r.counts() == {"a": 16, "b": 15}
    r.add_task("c", _task(2))
    assert r.counts() == {"a": 11, "b": 10, "c": 10}
    assert len({row["id"] for row in r.buffer}) == 31  # no duplicates
    r.add_task("tiny", _task(3, 2))  # a task smaller than its share keeps all its rows
    assert r.counts() == {"a": 8, "b": 8, "c": 8, "tiny": 2}  # shares 8, 8, 8, 7: "tiny" has only 2 rows


def test_reservoir_fills_then_stays_at_size_and_reads_datasets():
    r = _replay(size=50)
    ds = Dataset.from_dict({"prompt": [f"p{i}" for i in range(30)], "target": [f"t{i}" for i in range(30)]})
    r.add_task("a", ds)
    assert len(r.buffer) == 30 and r.seen == 30
    assert sorted(row["prompt"] for row in r.buffer) == sorted(ds["prompt"])
    r.add_task("b", ds)
    assert len(r.buffer) == 50 and r.seen == 60
    assert r.extra_memory_bytes() == sum(len(row["prompt"]) + len(row["target"]) for row in r.buffer)
    empty = _replay(size=0)
    empty.add_task("a", ds)
    assert empty.buffer == [] and empty.extra_memory_bytes() == 0


def _batch(n: int = 8) -> list[dict]:
    return [{"prompt": f"cur{i}", "target": "x"} for i in range(n)]


def test_mixing_replaces_a_ratio_of_the_batch():
    r = _replay(size=100, ratio=0.25)
    batch = _batch()
    assert r.mix(batch) is batch  # empty buffer: nothing changes
    r.add_task("old", [{"prompt": f"old{i}", "target": "y"} for i in range(40)])
    for _ in range(20):
        out = r.mix(_batch())
        assert len(out) == 8
        assert out[:6] == _batch()[:6]
        assert all(e["prompt"].startswith("old") and "_task" not in e for e in out[6:])
    # a ratio that is not a whole number of examples is met in expectation (stochastic rounding)
    r = _replay(size=100, ratio=0.1)
    r.add_task("old", [{"prompt": f"old{i}", "target": "y"} for i in range(40)])
    replayed = [sum(e["prompt"].startswith("old") for e in r.mix(_batch(10))) for _ in range(2000)]
    assert set(replayed) == {1} and all(len(r.mix(_batch(10))) == 10 for _ in range(5))
    replayed = [sum(e["prompt"].startswith("old") for e in r.mix(_batch(8))) for _ in range(4000)]
    assert set(replayed) <= {0, 1} and sum(replayed) / 4000 == pytest.approx(0.8, abs=0.03)


def test_general_fraction():
    general = Dataset.from_dict({"prompt": [f"gen{i}" for i in range(50)], "target": ["g"] * 50})
    r = _replay(size=100, ratio=0.5, general=0.5)
    out = r.mix(_batch(), general)  # buffer still empty: only the general half is replayed
    assert len(out) == 8 and [e["prompt"][:3] for e in out] == ["cur"] * 6 + ["gen"] * 2
    r.add_task("old", [{"prompt": f"old{i}", "target": "y"} for i in range(40)])
    out = r.mix(_batch(), general)
    assert len(out) == 8 and sorted(e["prompt"][:3] for e in out[4:]) == ["gen", "gen", "old", "old"]


def _ctx(general=None, seed=0):
    return SimpleNamespace(config=SimpleNamespace(seed=seed), stream=SimpleNamespace(name="s", general=general))


def test_general_without_general_data_is_a_user_error():
    (plugin,) = build_strategy("replay(general=0.3)")
    with pytest.raises(UserError, match="general data"):
        plugin.before_training(_ctx(general=None))
    build_strategy("replay")[0].before_training(_ctx(general=None))  # general=0 needs none


@pytest.mark.parametrize("spec, match", [("replay(ratio=1.5)", "ratio"), ("replay(policy=fifo)", "policy"),
                                         ("replay(size=-1)", "size")])
def test_bad_params(spec, match):
    with pytest.raises(UserError, match=match):
        build_strategy(spec)


def test_state_dict_is_json_and_resumes_identically():
    a = _replay(3, size=20)
    a.add_task("a", _task(0, 50))
    state = json.loads(json.dumps(a.state_dict()))
    b = Replay(ReplayParams(size=20))
    b.load_state_dict(state)
    a.add_task("b", _task(1, 50))
    b.add_task("b", _task(1, 50))
    assert a.buffer == b.buffer and a.seen == b.seen == 100
    assert a.mix(_batch()) == b.mix(_batch())


@pytest.mark.slow
def test_engine_keeps_batch_size_and_fills_buffer(tiny_stream):
    """Through the real engine: compute stays that of plain fine-tuning, the buffer holds both tasks."""

    from clsuite.config import EvalConfig, RunConfig, TrainConfig
    from clsuite.engine import Context, run_stream

    model, tok = tiny_llama()
    cfg = RunConfig(stream="tiny-test", strategy="replay(size=20, general=0.5)",
                    train=TrainConfig(steps=3, batch_size=8, max_length=32), eval=EvalConfig(max_examples=2))
    plugins = build_strategy(cfg.strategy)
    seen: list[list[dict]] = []

    class Spy(Strategy):  # records the batches the closure trains on (after replay mixed them)
        kind = "loss"

        def before_training_iteration(self, ctx, examples):
            seen.append(examples)
            return examples

    ctx = Context(model, tok, tiny_stream, cfg, plugins + [Spy()], random.Random(0))
    run_stream(ctx, progress=False)
    assert ctx.example_passes == 2 * 3 * 8 and all(len(b) == 8 for b in seen)
    counts = plugins[0].counts()
    assert list(counts) == ["addition", "reversal"] and sum(counts.values()) == 20
    general = set(tiny_stream.general["prompt"])
    assert any(e["prompt"] in general for b in seen for e in b)  # general data from the first step on
    old = {r["prompt"] for r in tiny_stream.tasks[0].train}
    assert any(e["prompt"] in old for b in seen[3:] for e in b)  # task 1 replayed during task 2
