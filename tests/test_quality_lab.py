"""The quality lab's designs and verdicts: toy layouts by data seed, the new toys' data, ``make quality``'s plan
(presets, members, CT from EDM) and its target checks on results whose answer is known."""

from __future__ import annotations

import argparse
import json
import sys

import h5py
import numpy as np
import pytest
import yaml

from benchmarks import quality, quality_report
from idql_cm.data.datamodule import TDDataModule
from idql_cm.data.toys import QUALITY_TOYS, RADIUS, TOYS, toy, write_toy_dataset
from idql_cm.eval.fidelity import mode_stats


def test_seed_zero_keeps_the_fixed_layouts_and_other_seeds_move_them():
    for name in ("counts", "unequal", "far"):
        assert toy(name, 0) == TOYS[name]
    for name in QUALITY_TOYS:
        layouts = [np.concatenate([toy(name, s).centres(c) for c in range(toy(name, s).num_conditions)])
                   for s in (0, 1, 2)]
        assert not np.allclose(layouts[0], layouts[1]) and not np.allclose(layouts[1], layouts[2]), name
        assert toy(name, 1) == toy(name, 1)  # a seed is a layout: drawn again, the same


@pytest.mark.parametrize("name", QUALITY_TOYS)
@pytest.mark.parametrize("seed", (0, 1, 2))
def test_every_layout_is_measurable(name, seed):
    """Inside the box with 3σ to spare, modes at least 0.35 apart (2 × RADIUS + margin), the truth near precision 1."""
    t, rng = toy(name, seed), np.random.default_rng(0)
    for c in range(t.num_conditions):
        centres = t.centres(c)
        gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(len(centres)) * 9
        assert np.abs(centres).max() <= 0.85 + 1e-9 and gaps.min() >= 0.35 - 1e-9
        st = mode_stats(t.sample(c, 2000, rng), centres, t.weights(c), RADIUS)
        assert st.precision > 0.98 and st.min_share_ratio > 0.85


def test_new_designs_are_what_they_say():
    wide, narrow, moving = toy("wide6", 1), toy("narrow", 1), toy("moving", 1)
    assert wide.act_dim == 6 and [len(c) for c in wide.conditions] == [2, 3, 4]
    assert max(m.std for c in narrow.conditions for m in c) <= 0.03
    for c in range(narrow.num_conditions):  # every mode has a neighbour at most 0.5 away
        d = np.linalg.norm(narrow.centres(c)[:, None] - narrow.centres(c)[None], axis=-1) + np.eye(len(narrow.conditions[c]))
        assert d.min(1).max() <= 0.5 + 1e-9
    assert moving.obs_dim == 1 and moving.num_conditions == 5
    # the layout turns with x: half a turn over x in [-1, 1], so x = -0.9 and 0.9 are 0.9π apart
    assert abs(moving.turn) == pytest.approx(np.pi / 2)
    a0, a4 = (np.arctan2(moving.centres(c)[:, 1], moving.centres(c)[:, 0]) for c in (0, 4))
    assert np.allclose(np.angle(np.exp(1j * (a4 - a0))), np.angle(np.exp(1j * 1.8 * moving.turn)))


def test_moving_data_follows_its_observation(tmp_path):
    """Each row's action sits on a mode of *its* x (and not on the modes of x = 0), and the real data module reads it."""
    t = toy("moving", 2)
    path = write_toy_dataset(tmp_path / "moving.hdf5", t, transitions=3000, seed=2)
    with h5py.File(path, "r") as f:
        x, act = f["observations"][()][:, 0], f["actions"][()]
    own = np.array([np.linalg.norm(np.array([m.centre for m in t.at(v)]) - a, axis=-1).min() for v, a in zip(x, act,
                                                                                                           strict=True)])
    still = np.linalg.norm(t.centres(2)[None] - act[:, None], axis=-1).min(-1)  # the x = 0 layout
    assert (own < RADIUS).mean() > 0.98 and (still[np.abs(x) > 0.5] < RADIUS).mean() < 0.5
    dm = TDDataModule(str(path), batch_size=64, reward_scale="none")
    dm.setup("fit")
    assert (dm.obs_dim, dm.act_dim) == (1, 2)


def test_wide_toy_writes_six_dimensional_actions(tmp_path):
    path = write_toy_dataset(tmp_path / "w.hdf5", toy("wide6", 0), transitions=600, seed=0)
    dm = TDDataModule(str(path), batch_size=64, reward_scale="none")
    dm.setup("fit")
    assert (dm.obs_dim, dm.act_dim) == (3, 6)


def _args(**kw):
    base = dict(toys=["counts"], seeds=[0], analogues=["medium-expert", "two-gait"], members=5, me_seed=0, ect=True,
                toy_transitions=300, me_transitions=1000, me_episodes=20)
    return argparse.Namespace(**{**base, **kw})


def test_full_plan_trains_members_and_ct_from_edm(tmp_path, monkeypatch):
    """The full preset: every analogue stage (IQL too) with 5 members in ``members5/``, each backbone's evaluation on
    that IQL, CD on that EDM, and CT from EDM started from that EDM's checkpoint; toys get the same CT from EDM."""
    monkeypatch.setattr(quality, "OUT", tmp_path)
    for folder in ("medium_expert", "two_gait"):  # no collection: a file at the path is the data
        (tmp_path / folder / "seed0").mkdir(parents=True)
        (tmp_path / folder / "seed0" / "data.hdf5").write_bytes(b"")
    jobs, plan = quality.plan_me(_args(), {"shipped": {}}, tmp_path)
    assert [a for _, a, *_ in plan] == ["medium-expert", "two-gait"]
    assert len(jobs) == 2 * 6
    for _, _, _, _, roots in plan:
        cfg = {s: yaml.safe_load((r / "stage.yaml").read_text()) for s, r in roots.items()}
        assert all(r.parent.name == "members5" for r in roots.values())
        assert {s: c["model"]["init_args"].get("num_seeds") for s, c in cfg.items()} == dict.fromkeys(cfg, 5)
        edm_ckpt = str(roots["edm"] / "checkpoints" / "last.ckpt")
        assert cfg["ct_ect"]["model"]["class_path"].endswith("CTModule")
        assert cfg["ct_ect"]["model"]["init_args"]["init_from"] == edm_ckpt
        assert cfg["cd"]["model"]["init_args"]["teacher_ckpt"] == edm_ckpt
        assert "init_from" not in cfg["ct"]["model"]["init_args"]
        critic = str(roots["iql"] / "checkpoints" / "last.ckpt")
        for s in ("edm", "ct", "cd", "meanflow", "ct_ect"):
            ev = next(cb for cb in cfg[s]["trainer"]["callbacks"] if cb["class_path"] == quality.EVAL_CLASS)
            assert ev["init_args"]["critic_ckpt"] == critic and ev["init_args"]["episodes"] == 20
    names = {j.name: j for j in jobs}
    ect = next(j for n, j in names.items() if n.startswith("two_gait/seed0/members5/ct_ect-"))
    assert set(ect.deps) == {names[n].name for n in names if n.startswith("two_gait/seed0/members5/edm-")
                             or n.startswith("two_gait/seed0/members5/iql-")}
    jobs, plan = quality.plan_toys(_args(), {"shipped": {}}, tmp_path)
    roots = plan[0][3]
    assert set(roots) == {"edm", "ct", "cd", "meanflow", "ct_ect"}
    cfg = yaml.safe_load((roots["ct_ect"] / "stage.yaml").read_text())
    assert cfg["model"]["init_args"]["init_from"] == str(roots["edm"] / "checkpoints" / "last.ckpt")


def test_quick_plan_is_one_member_without_ect(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "OUT", tmp_path)
    (tmp_path / "medium_expert" / "seed0").mkdir(parents=True)
    (tmp_path / "medium_expert" / "seed0" / "data.hdf5").write_bytes(b"")
    jobs, plan = quality.plan_me(_args(members=1, ect=False, analogues=["medium-expert"]), {"s": {}}, tmp_path)
    roots = plan[0][4]
    assert set(roots) == {"iql", "edm", "ct", "cd", "meanflow"} and roots["iql"].parent.name == "seed0"
    cfg = yaml.safe_load((roots["ct"] / "stage.yaml").read_text())
    assert cfg["model"]["init_args"].get("num_seeds", 1) == 1


def _toy_result(precisions: dict[str, list[float]], share: float = 0.8) -> dict:
    """A toy result whose one-step backbones score ``precisions[key]`` at NFE 1, one entry per seed."""
    def cell(p):
        return {"precision": p, "worst_precision": p, "min_share_ratio": share, "sliced_w1": 0.01}
    seeds = {}
    for i in range(len(next(iter(precisions.values())))):
        row = {"truth": cell(0.99), "edm_euler": {"2": cell(0.9), "4": cell(0.95)}}
        for key, ps in precisions.items():
            row[key] = {"1": cell(ps[i]), "2": cell(0.9), "4": cell(0.9)}
        seeds[str(i)] = row
    return {"toys": {"t": seeds}, "seeds": list(range(len(seeds)))}


def test_toy_verdict_takes_the_mean_and_the_worst_seed():
    met = dict((n, ok) for n, ok, _ in quality_report.toy_targets(_toy_result({"ct": [0.93, 0.92, 0.91],
                                                                                 "meanflow": [0.8, 0.8, 0.8]})))
    assert met["t: best one-step backbone at NFE 1: precision ≥ 0.90, every mode ≥ ½ its share, no seed < 0.85"]
    assert not met["t: MeanFlow NFE 1 precision ≥ 0.90"]
    # the same mean (0.92) with one seed at 0.84: missed
    checks = quality_report.toy_targets(_toy_result({"ct": [0.96, 0.96, 0.84]}))
    assert not next(ok for n, ok, _ in checks if "best one-step" in n)
    checks = quality_report.toy_targets(_toy_result({"ct": [0.95, 0.95, 0.95]}, share=0.4))  # a mode under half
    assert not next(ok for n, ok, _ in checks if "best one-step" in n)


def _analogue(scores: dict[str, dict[str, tuple[float, float]]], expert: float = 22.0) -> dict:
    row = {"behaviour": {"expert": {"score": expert, "se": 1.0}, "medium": {"score": 10.0, "se": 0.5},
                         "dataset": {"score": 16.0, "se": 0.8}}, "members": 5}
    for key, by_nfe in scores.items():
        row[key] = {n: {"score": s, "se": se, "episodes": 100} for n, (s, se) in by_nfe.items()}
    return {"analogues": {"a": row}}


def test_analogue_verdict():
    ok = _analogue({"edm": {"1": (23.0, 0.5), "2": (24.0, 0.6), "4": (23.5, 0.5)},
                    "ct": {"1": (23.7, 1.0), "2": (23.0, 1.0), "4": (20.0, 1.0)},
                    "cd": {"1": (24.5, 0.8), "2": (24.0, 0.8), "4": (23.5, 0.8)}})
    met = {n: v for n, v, _ in quality_report.me_targets(ok)}
    assert met["a (5 seeds): CT NFE 1 within one SE of EDM's best (NFE 2)"]  # 23.7 ≥ 24.0 − 0.6
    assert met["a (5 seeds): the best one-step NFE 1 ≥ EDM's best and ≥ the strong behaviour"]  # CD 24.5
    assert not met["a (5 seeds): CT NFE 4 ≥ NFE 2 − 1 SE"]  # 23.0 → 20.0, SE of the difference 1.4
    assert met["a (5 seeds): CD NFE 4 ≥ NFE 2 − 1 SE"]
    low = _analogue({"edm": {"1": (24.0, 0.5)}, "ct": {"1": (23.4, 1.0)}}, expert=25.0)
    met = {n: v for n, v, _ in quality_report.me_targets(low)}
    assert not met["a (5 seeds): CT NFE 1 within one SE of EDM's best (NFE 1)"]  # 23.4 < 24.0 − 0.5
    assert not met["a (5 seeds): the best one-step NFE 1 ≥ EDM's best and ≥ the strong behaviour"]


def test_full_run_of_one_part_keeps_the_other(tmp_path):
    """``--part me`` of the full preset replaces the analogues of the last full run and keeps its toys."""
    path = tmp_path / "quality_full.json"
    toys = _toy_result({"ct": [0.9, 0.9, 0.9]})["toys"]
    analogues = _analogue({"edm": {"1": (23.0, 0.5)}, "ct": {"1": (20.0, 1.0)}})["analogues"]
    old = {"parts": {"toys": "then"}, "variants": {"v": {"toys": toys, "seeds": [0, 1, 2], "analogues": {},
                                                          "members": 5}}}
    path.write_text(json.dumps(old))
    doc = {"started": "now", "seconds": 60.0, "variants": {"v": {"toys": {}, "seeds": [0], "analogues": analogues,
                                                                 "members": 5}}}
    merged = quality.merge_parts(doc, path, "me")
    assert merged["variants"]["v"]["toys"] == toys and merged["variants"]["v"]["seeds"] == [0, 1, 2]
    assert merged["variants"]["v"]["analogues"] == analogues
    assert merged["parts"] == {"toys": "then", "analogues": "now, 1 min"}
    md = tmp_path / "q.md"
    md.write_text("top\n<!-- end of generated part -->\nhand-written\n")
    quality_report.write_full_section({**merged, "machine": {"cpu": "c", "cores": 2, "torch": "t"}, "jobs": 2}, md)
    text = md.read_text()
    assert text.index("end of generated part") < text.index("The verdict over seeds") < text.index("hand-written")
    assert "| t | CT | 1 | 0.900 | 0.900 |" in text and "| 1 | 23.0 ± 0.5 | 20.0 ± 1.0 |" in text
    quality_report.write_full_section({**merged, "machine": {"cpu": "c", "cores": 2, "torch": "t"}, "jobs": 2}, md)
    assert md.read_text() == text  # replaced in place, not appended


def test_planning_deletes_nothing_and_a_stale_stage_is_retrained(tmp_path, monkeypatch):
    """A stage trained by other code keeps its files through planning (a dry plan, an aborted run); it is not
    reused, and its old result goes only when its new training starts."""
    monkeypatch.setattr(quality, "OUT", tmp_path)
    cfg = quality.stage_config("edm", tmp_path / "d.hdf5", 0, {}, evaluate=False)
    job, root = quality.fit_job(cfg, tmp_path, "edm")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "last.ckpt").write_text("old")
    (root / "code.sha256").write_text("other code")
    job, _ = quality.fit_job(cfg, tmp_path, "edm")
    assert (root / "checkpoints" / "last.ckpt").exists() and not job.reuse
    (root / "code.sha256").write_text(quality.code_digest())
    job, _ = quality.fit_job(cfg, tmp_path, "edm")
    assert job.reuse
    job.cmd = [sys.executable, "-c", "pass"]
    job.reuse = False
    quality.run_jobs([job], 1)
    assert not (root / "checkpoints" / "last.ckpt").exists()  # the stand-in training wrote nothing new


def test_advantage_plan_on_two_gait_trains_beside_the_verdict_stages(tmp_path, monkeypatch):
    """``quality_guidance --knob advantage_beta --analogue two-gait``: the IQL and EDM are ``make quality-full``'s
    (same folder, same configs), each weighted CT is a new stage there, guided by and evaluated with that IQL, alone
    and re-ranked; β = 0 has no stage of its own."""
    from benchmarks import quality_guidance

    monkeypatch.setattr(quality, "OUT", tmp_path)
    (tmp_path / "two_gait" / "seed0").mkdir(parents=True)
    (tmp_path / "two_gait" / "seed0" / "data.hdf5").write_bytes(b"")
    args = argparse.Namespace(analogue="two-gait", members=5, me_transitions=100, me_episodes=20, backbones=["ct"],
                              weights=[0.0, 3.0, 10.0], knob="advantage_beta")
    jobs: dict = {}
    plan = quality_guidance.plan_me(args, tmp_path, jobs)
    _, verdict = quality.plan_me(_args(analogues=["two-gait"], me_transitions=100), {"shipped": {}}, tmp_path)
    roots = verdict[0][-1]
    assert plan["critic"] == roots["iql"] and plan["edm"] == roots["edm"]
    assert [w for _, w, _ in plan["guided"]] == [3.0, 10.0]
    critic = str(roots["iql"] / "checkpoints" / "last.ckpt")
    for _, w, root in plan["guided"]:
        assert root.parent == roots["iql"].parent and root != roots["ct"]
        cfg = yaml.safe_load((root / "stage.yaml").read_text())
        assert cfg["model"]["init_args"]["advantage_beta"] == w and cfg["model"]["init_args"]["critic_ckpt"] == critic
        ev = next(cb for cb in cfg["trainer"]["callbacks"] if cb["class_path"] == quality.EVAL_CLASS)
        assert ev["init_args"]["critic_ckpt"] == critic and ev["init_args"]["one_candidate"] is True
    assert len(jobs) == 2 + 2  # IQL and EDM of the verdict, two weighted CTs


def test_advantage_section_names_its_knob_and_each_analogue(tmp_path):
    from benchmarks import quality_guidance

    scores = {"1": {"score": 20.0, "se": 1.0, "episodes": 100}}
    row = {"backbone": "ct", "weight": 3.0, "ranked": {"1": {"score": 24.0, "se": 0.5, "episodes": 100}},
           "alone": {"1": {"score": 21.0, "se": 0.5, "episodes": 100}},
           "actions": {"q_policy": 1.0, "q_data": 0.9, "distance": 0.1, "at_bound": 0.0, "data_at_bound": 0.01}}
    analogue = {"behaviour": {"expert": {"score": 22.0}, "medium": {"score": 9.0}}, "edm": scores, "guided": [row]}
    doc = {"knob": "advantage_beta", "machine": {"cpu": "x", "cores": 2}, "started": "now", "seconds": 60,
           "stages": 3, "stages_trained": 1, "members": 5, "me_episodes": 20, "two_gait": analogue}
    page = tmp_path / "quality.md"
    page.write_text("# Quality\n")
    quality_guidance.write_section(doc, page)
    text = page.read_text()
    assert "## Advantage-weighted training (`advantage_beta`)" in text and "| backbone | β |" in text
    assert "### Two-gait analogue" in text and "### Medium-expert analogue" not in text
    # alone 21 > EDM's best 20: yes; re-ranked 24 ≥ both: yes
    assert "| CT | 3 | 21.0 ± 0.5 | 24.0 ± 0.5 | yes | yes |" in text
    quality_guidance.write_section({**doc, "knob": "q_weight"}, page)  # the guidance section is another block
    assert page.read_text().count("## Advantage-weighted") == 1 and "## Critic guidance (`q_weight`)" in page.read_text()
