import re

import pandas as pd
import pytest

from clsuite.atomic import write_json as atomic_write_json
from clsuite.errors import UserError
from clsuite.reports.leaderboard import aggregate, frame, load_records, to_markdown
from clsuite.fingerprint import PARTS
from clsuite.records import SCHEMA_VERSION, RunRecord


def _rec(strategy, seed, acc, forgetting):
    return RunRecord(schema_version=SCHEMA_VERSION, status="complete", stream="s", strategy=strategy, seed=seed,
                     model="m", config={}, fingerprint={p: "0" for p in PARTS}, tasks=["a", "b"], probes=[],
                     R=[[0, 0], [1, 0], [acc, acc]], P=[[], [], []],
                     metrics={"acc": acc, "forgetting": forgetting}, cost={"compute_multiplier": 1.0})


def test_mean_std_and_rank():
    recs = [_rec("naive", 0, 0.2, 0.5), _rec("naive", 1, 0.4, 0.3), _rec("sam", 0, 0.9, 0.1)]
    agg = aggregate(frame(recs), "acc")
    assert list(agg["strategy"]) == ["sam", "naive"]
    naive = agg[agg.strategy == "naive"].iloc[0]
    assert naive["n"] == 2 and abs(naive["acc"] - 0.3) < 1e-12 and abs(naive["acc_std"] - 0.1414213) < 1e-6
    assert pd.isna(agg[agg.strategy == "sam"].iloc[0]["acc_std"])
    by_forgetting = aggregate(frame(recs), "forgetting")
    assert list(by_forgetting["strategy"]) == ["sam", "naive"]  # lower is better


def test_markdown_escapes_untrusted_text():
    md = to_markdown(aggregate(frame([_rec("x|<script>", 0, 0.5, 0.1)])))
    assert "<script>" not in md and "&lt;script&gt;" in md and "x&#124;" in md


def test_sharpness_columns():
    r = _rec("sam", 0, 0.5, 0.1)
    r.experiences = [{"sharpness": {"sharpness_worst": 1.0}}, {"sharpness": {"sharpness_worst": 3.0}}]
    agg = aggregate(frame([r, _rec("naive", 0, 0.4, 0.2)]))
    assert agg[agg.strategy == "sam"].iloc[0]["sharpness_worst"] == 2.0
    assert "sharpness_worst ↓" in to_markdown(agg)


def test_paired_effect_of_sam():
    from clsuite.reports.leaderboard import paired_effects
    recs = [_rec("naive", 0, 0.2, 0.5), _rec("naive", 1, 0.4, 0.3), _rec("sam", 0, 0.3, 0.4), _rec("sam", 1, 0.6, 0.2),
            _rec("ewc+sam", 0, 0.9, 0.0)]  # no ewc run: no comparison
    eff = paired_effects(frame(recs), metrics=("acc",))
    assert list(eff["comparison"]) == ["sam − naive"]
    assert eff.iloc[0]["n"] == 2 and eff.iloc[0]["acc"] == "+0.150 ± 0.635 (p 0.20)"  # t(1) = 3.0: p = 0.205 by hand


def test_duplicate_cells_are_refused(tmp_path):
    rec = _rec("naive", 0, 0.2, 0.5).model_dump()
    atomic_write_json(tmp_path / "a" / "seed0.json", rec)
    atomic_write_json(tmp_path / "b" / "seed0.json", rec)
    with pytest.raises(UserError, match="both naive seed 0"):
        load_records([tmp_path / "a", tmp_path / "b"])
    assert len(load_records([tmp_path / "a"])[0]) == 1


def test_splits_of_one_stream_are_not_ranked_together(tmp_path):
    test, val = tmp_path / "test" / "seed0.json", tmp_path / "val" / "seed1.json"
    atomic_write_json(test, _rec("naive", 0, 0.2, 0.5).model_dump())
    atomic_write_json(val, {**_rec("naive", 1, 0.4, 0.3).model_dump(), "split": "val"})
    with pytest.raises(UserError, match=rf"^{re.escape(str(test))} scored the test split and {re.escape(str(val))} the "
                                        r"val split of s: a leaderboard reports one split \(test\); rank them apart$"):
        load_records([tmp_path / "test", tmp_path / "val"])
    assert [r.split for r in load_records([tmp_path / "val"])[0]] == ["val"]


def test_records_from_other_base_weights_are_not_ranked_together(tmp_path):
    for seed, base in ((0, "a" * 64), (1, None), (2, "a" * 64)):  # a record of before the field carries none
        atomic_write_json(tmp_path / f"seed{seed}.json", {**_rec("naive", seed, 0.2, 0.5).model_dump(),
                                                         "provenance": {"base_weights": base}})
    assert len(load_records([tmp_path])[0]) == 3
    atomic_write_json(tmp_path / "seed3.json", {**_rec("naive", 3, 0.2, 0.5).model_dump(),
                                               "provenance": {"base_weights": "b" * 64}})
    with pytest.raises(UserError, match=r"seed3.json started from other base weights \(aaaaaaaaaaaa and bbbbbbbbbbbb\) "
                                        r"on s: rebuild the model"):
        load_records([tmp_path])


def test_retention_by_probe_category():
    r = _rec("naive", 0, 0.5, 0.1).model_copy(update={
        "probes": ["capitals", "currencies", "grammar"],
        "probe_categories": {"capitals": "knowledge", "currencies": "knowledge", "grammar": "linguistic"},
        "P": [[0.8, 0.6, 0.9], [0.7, 0.5, 0.9], [0.6, 0.2, 0.8]]})
    agg = aggregate(frame([r]))
    row = agg.iloc[0]
    assert abs(row["Δ knowledge"] - (-0.3)) < 1e-12 and abs(row["Δ linguistic"] - (-0.1)) < 1e-12
    md = to_markdown(agg)
    assert "Δ knowledge ↑" in md and "-0.300" in md
    one = _rec("naive", 0, 0.5, 0.1).model_copy(update={"probes": ["g"], "probe_categories": {"g": "x"},
                                                      "P": [[1.0], [1.0], [0.5]]})
    assert "Δ x" not in to_markdown(aggregate(frame([one])))  # one category repeats probe_retention
