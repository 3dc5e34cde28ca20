"""clsuite.overlap: shared answers and n-grams between training rows and probe items."""
from __future__ import annotations

from clsuite.overlap import probe_overlap, stream_overlap, words


def test_words_and_shares():
    assert words("The Capital, of France!") == ["the", "capital", "of", "france"]
    train = [{"prompt": "Where is the capital of France located", "target": "Paris"},
             {"prompt": "Name a fruit", "target": "apple"}]
    probe = [{"prompt": "The capital of France is", "target": " Paris", "choices": [" Paris", " Rome"], "answer": 0},
             {"prompt": "The plural of mouse is", "target": " mice", "choices": [" mice", " mouses"], "answer": 0},
             {"prompt": "A red fruit is an", "target": " apple", "choices": [" pear", " apple"], "answer": 1}]
    out = probe_overlap(train, probe, n=4)
    assert out["items"] == 3
    assert out["answer"] == 2 / 3  # Paris and apple occur in the training text
    assert out["target"] == 2 / 3  # both are training targets
    assert out["ngram"] == 1 / 3  # only "the capital of france" is a shared 4-gram
    assert out["examples"]["ngram"] == ["The capital of France is → Paris"]
    assert probe_overlap(train, probe, n=8)["ngram"] == 0


def test_stream_overlap_covers_every_task_and_probe(tiny_stream):
    rows = stream_overlap(tiny_stream)
    pairs = {(r["task"], r["probe"]) for r in rows}
    tasks = [t.name for t in tiny_stream.tasks] + (["general data"] if tiny_stream.general is not None else [])
    assert pairs == {(t, p.name) for t in tasks for p in tiny_stream.probes}
    assert all(0 <= r[k] <= 1 for r in rows for k in ("answer", "target", "ngram"))
