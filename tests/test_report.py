"""Reports: D4RL normalisation, the SE formula, Markdown/JSON writers, seed merging, tables, plots, `report` CLI."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from idql_cm.data.scores import normalized_score
from idql_cm.errors import DataError
from idql_cm.eval.report import (
    add_report_parser,
    build_report,
    combined_table,
    mean_se,
    merge_seeds,
    nfe_result,
    plot_scores,
    render_markdown,
    short_task,
    write_report,
)

HC_RANGE = 12135.0 + 280.178953


@pytest.mark.parametrize("task,lo,hi", [("halfcheetah-medium-v2", -280.178953, 12135.0),
                                        ("hopper-medium-expert-v2", -20.272305, 3234.3),
                                        ("walker2d-medium-replay-v2", 1.629008, 4592.3)])
def test_normalised_scores_match_the_d4rl_reference_numbers(task, lo, hi):
    assert normalized_score(task, hi) == pytest.approx(100.0, abs=1e-9)
    assert normalized_score(task, lo) == pytest.approx(0.0, abs=1e-9)
    assert normalized_score(task, (lo + hi) / 2) == pytest.approx(50.0, abs=1e-9)


def rollout(returns, nfe=1, unstable=None, env_id="HalfCheetah-v5"):
    return {"nfe": nfe, "env_id": env_id, "returns": list(returns), "lengths": [1000] * len(returns),
            "unstable": unstable or [False] * len(returns), "seconds": 2.0, "action_latency_ms": 0.5,
            "env_steps": 1000 * len(returns), "env_steps_per_second": 500.0 * len(returns), "num_envs": 2,
            "seed": 0}


def test_se_is_the_sample_std_over_episodes_over_sqrt_n():
    r = nfe_result(rollout([1000.0, 2000.0, 3000.0, 4000.0]), "halfcheetah-medium-v2")
    # by hand: mean 2500, deviations ±1500, ±500 → s² = (2·1500² + 2·500²)/3 = 5e6/3, SE = s/2
    se = math.sqrt(5e6 / 3) / 2
    assert r["return_mean"] == 2500.0 and r["return_se"] == pytest.approx(se, rel=1e-12)
    assert r["normalized_score_mean"] == pytest.approx(100 * (2500.0 + 280.178953) / HC_RANGE, rel=1e-12)
    assert r["normalized_score_se"] == pytest.approx(100 * se / HC_RANGE, rel=1e-12)
    assert mean_se([5.0]) == (5.0, None) and mean_se([]) == (None, None)


def test_unstable_episodes_are_reported_but_not_averaged():
    r = nfe_result(rollout([100.0, -1e9, 300.0], unstable=[False, True, False]), "halfcheetah-medium-v2")
    assert r["episodes"] == 3 and r["counted_episodes"] == 2 and r["unstable_episodes"] == 1
    assert r["return_mean"] == 200.0


def make_report(backbone="ct", means=(53.2, 54.0, 54.1), task="halfcheetah-medium-v2", step=1_000_000, critic="iql.ckpt",
                se=0.1):
    results = []
    for k, m in zip((1, 2, 4), means, strict=True):
        results.append({"nfe": k, "episodes": 150, "unstable_episodes": 0, "normalized_score_mean": m,
                        "normalized_score_se": se, "return_mean": m * 100, "return_se": se * 100, "seconds": 10.0,
                        "action_latency_ms": 1.0, "env_steps_per_second": 5000.0, "counted_episodes": 150})
    return build_report(results, task=task, env_id="HalfCheetah-v5", backbone=backbone, step=step, critic=critic,
                        selection="softmax", temperature=100.0, num_candidates=256)


def test_markdown_lays_out_rows_by_nfe_like_the_tutorial():
    md = render_markdown(make_report())
    assert "| Environment | NFE | CT (1M) |" in md
    assert "| HalfCheetah-m | 1 | 53.2±0.1 |" in md and "|  | 4 | 54.1±0.1 |" in md
    bc = render_markdown(make_report(critic=None))
    assert "Behaviour policy alone" in bc


def test_write_report_is_atomic_and_strict_json(tmp_path):
    rep = make_report()
    rep["results"][0]["seconds"] = float("nan")
    j, m = write_report(rep, tmp_path / "out")
    assert j.name == "eval_report.json" and m.name == "eval_report.md"
    data = json.loads(j.read_text())
    assert {"task", "env_id", "backbone", "step", "critic", "selection", "results", "idql"} <= set(data)
    assert data["results"][0]["seconds"] is None and data["idql"] is True
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval_report.json", "eval_report.md"]


def test_merge_seeds_is_mean_and_se_of_per_seed_means():
    s0 = [make_report("ct", (50.0, 52.0, 54.0)), make_report("edm", (40.0, 90.0, 91.0))]
    s1 = [make_report("ct", (54.0, 52.0, 56.0)), make_report("edm", (44.0, 92.0, 93.0))]
    merged = {r["backbone"]: r for r in merge_seeds([s0, s1])}
    ct = {x["nfe"]: x for x in merged["ct"]["results"]}
    assert merged["ct"]["seeds"] == 2 and ct[1]["seeds"] == 2 and ct[1]["se_over"] == "seeds"
    assert ct[1]["normalized_score_mean"] == pytest.approx(52.0)
    assert ct[1]["normalized_score_se"] == pytest.approx(np.std([50, 54], ddof=1) / math.sqrt(2))  # = 2.0
    assert ct[1]["normalized_score_se"] == pytest.approx(2.0)
    assert ct[2]["normalized_score_se"] == 0.0 and ct[1]["episodes"] == 300
    one = merge_seeds([s0])[0]["results"][0]
    assert one["se_over"] == "episodes" and one["normalized_score_se"] == 0.1


def test_combined_table_rows_nfe_columns_backbones():
    reps = [make_report("edm", (44.1, 93.2, 92.8), "halfcheetah-medium-expert-v2"),
            make_report("cd", (46.0, 73.3, 58.6), "halfcheetah-medium-expert-v2", step=200_000),
            make_report("ct", (44.6, 38.6, 37.7), "halfcheetah-medium-expert-v2")]
    table = combined_table(reps)
    lines = table.splitlines()
    assert lines[0] == "| Environment | NFE | EDM (1M) | CD (200K) | CT (1M) |"
    assert "| HalfCheetah-me | 1 | 44.1±0.1 | 46.0±0.1 | 44.6±0.1 |" in lines
    assert "|  | 2 | 93.2±0.1 | 73.3±0.1 | 38.6±0.1 |" in lines
    assert "|  | 4 | 92.8±0.1 | 58.6±0.1 | 37.7±0.1 |" in lines
    # columns: the backbones present, registry order first; two seeds of the same run are merged
    two = combined_table([make_report("ct", (50.0, 52.0, 54.0)), make_report("ct", (54.0, 52.0, 56.0))])
    assert "| HalfCheetah-m | 1 | 52.0±2.0 |" in two and "2 training seeds" in two
    # a backbone missing on one task shows a dash there
    mixed = combined_table([make_report("ct", (50.0, 52.0, 54.0)), make_report("meanflow", (1.0, 2.0, 3.0)),
                            make_report("edm", (9.0, 9.0, 9.0), "halfcheetah-medium-expert-v2")])
    assert mixed.splitlines()[0] == "| Environment | NFE | EDM (1M) | CT (1M) | MEANFLOW (1M) |"
    assert "| HalfCheetah-m | 1 | — | 50.0±0.1 | 1.0±0.1 |" in mixed


def test_short_task_labels():
    assert short_task("halfcheetah-medium-replay-v2") == "HalfCheetah-mr"
    assert short_task("/data/hopper_medium_expert-v2.hdf5") == "Hopper-me"
    assert short_task(None, "Walker2d-v5") == "Walker2d"
    assert short_task("my-robot-data") == "my-robot-data"


def test_plot_scores_writes_a_png(tmp_path):
    reps = [make_report("edm", (44.1, 93.2, 92.8)), make_report("ct", (53.2, 54.0, 54.1), critic=None)]
    curves = {"eval/nfe1/normalized_score": {"CT seed0": [(1000, 30.0), (2000, 45.0), (3000, 53.0)]},
              "train/loss": [(1, 2.0), (2, 1.5), (3, 1.2)]}
    out = plot_scores(reps, tmp_path / "scores.png", curves=curves)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_report_command_merges_seed_directories(tmp_path, capsys):
    for seed, ct_means in ((0, (50.0, 52.0, 54.0)), (1, (54.0, 52.0, 56.0))):
        for bb, means in (("ct", ct_means), ("edm", (40.0, 90.0, 91.0))):
            write_report(make_report(bb, means), tmp_path / "runs" / f"seed{seed}" / bb)
    parser = argparse.ArgumentParser(prog="idql-cm")
    add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(tmp_path / "runs" / "seed0"), str(tmp_path / "runs" / "seed1"),
                              "--out", str(tmp_path / "summary")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| HalfCheetah-m | 1 | 40.0±0.0 | 52.0±2.0 |" in out
    assert (tmp_path / "summary" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    combined = json.loads((tmp_path / "summary" / "combined_report.json").read_text())
    assert {r["backbone"]: r["seeds"] for r in combined["reports"]} == {"ct": 2, "edm": 2}
    empty = parser.parse_args(["report", str(tmp_path / "summary")])
    with pytest.raises(DataError):
        empty.func(empty)
