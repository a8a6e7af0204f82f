"""The pipeline's final report: the EDM / CD / CT table, the dataset's own level, a plot and timings.

Reads ``<out>/{edm,cd,ct}/eval_report.json`` and the stages' TensorBoard files; writes
``<out>/report.md``, ``<out>/report.json`` and ``<out>/scores.png``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from idql_cm.backbones import registered
from idql_cm.eval.report import combined_table, load_report_file, plot_scores, read_event_curves

CRITIC_CURVE = r"^train/(q_loss|v_loss)$"


def _curves() -> dict[str, str]:
    """The TensorBoard tags each stage plots as its training curve: the critic's, then each backbone's."""
    return {"iql": CRITIC_CURVE, **{s.kind: s.loss_curve for s in registered()}}


def dataset_level(source: str | None) -> dict[str, Any] | None:
    """Mean episode return of the dataset (episodes end at a terminal or timeout flag) and its normalised score."""
    if not source:
        return None
    import h5py

    from idql_cm.data.d4rl import read_env_id
    from idql_cm.data.scores import normalized_score, task_family
    from idql_cm.data.sources import resolve_source

    try:
        path = resolve_source(source)
        with h5py.File(path, "r") as f:
            rew = np.asarray(f["rewards"], dtype=np.float64).reshape(-1)
            ends = np.asarray(f["terminals"], dtype=bool).reshape(-1)
            if "timeouts" in f:
                ends |= np.asarray(f["timeouts"], dtype=bool).reshape(-1)
    except Exception:  # noqa: BLE001 - a Minari id or an unreadable file: the report goes on without it
        return None
    idx = np.flatnonzero(ends)
    if idx.size == 0:
        return None
    sums = np.add.reduceat(rew, np.r_[0, idx[:-1] + 1])
    env_id = read_env_id(source)
    family = task_family(env_id or str(source))
    out = {"dataset": str(source), "episodes": int(idx.size), "return_mean": float(sums.mean()),
           "return_min": float(sums.min()), "return_max": float(sums.max())}
    if family:
        scores = np.asarray(normalized_score(family, sums), dtype=np.float64)
        out["normalized_score_mean"] = float(scores.mean())
        out["normalized_score_se"] = float(scores.std(ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else 0.0
    return out


def assemble(out: str | Path, dataset: str | None = None, timings: list[dict] | None = None,
             total_seconds: float | None = None) -> str:
    out = Path(out)
    reports = []
    for stage in (s.kind for s in registered()):
        path = out / stage / "eval_report.json"
        if path.exists():
            reports += load_report_file(path)
    curves: dict[str, dict[str, list]] = {}
    for stage, pattern in _curves().items():
        for tag, pts in read_event_curves(out / stage, pattern).items():
            curves.setdefault(f"{stage.upper()} training", {})[tag.split("/")[-1]] = pts
    level = dataset_level(dataset)
    table = combined_table(reports) if reports else "(no evaluation reports found)\n"
    lines = [f"# IDQL results: {out}", "", table]
    if level:
        ns = level.get("normalized_score_mean")
        lines.append(f"Dataset ({level['dataset']}, {level['episodes']} episodes): mean episode return "
                     f"{level['return_mean']:.1f} (min {level['return_min']:.1f}, max {level['return_max']:.1f})"
                     + (f", normalised score {ns:.1f} ± {level['normalized_score_se']:.1f}." if ns is not None else "."))
        if ns is not None:
            verdict = []
            for r in reports:
                nfe1 = next((x for x in r["results"] if x["nfe"] == 1), None)
                if nfe1 and nfe1.get("normalized_score_mean") is not None:
                    above = nfe1["normalized_score_mean"] > ns
                    verdict.append(f"{r['backbone'].upper()} at NFE 1: {nfe1['normalized_score_mean']:.1f} "
                                   f"({'above' if above else 'NOT above'} the dataset's {ns:.1f})")
            if verdict:
                lines += ["", "; ".join(verdict) + "."]
    if timings:
        lines += ["", "| stage | seconds |", "| --- | --- |"]
        for t in timings:
            secs = "skipped (done earlier)" if t.get("skipped") else f"{t['seconds']:.0f}"
            lines.append(f"| {t['stage']} | {secs} |")
        if total_seconds is not None:
            lines.append(f"| total | {total_seconds:.0f} |")
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {platform.system()}; "
                  f"written {time.strftime('%Y-%m-%d %H:%M')}.", "",
              "![scores](scores.png)", "",
              f"TensorBoard: `tensorboard --logdir {out}`", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    payload = {"reports": reports, "dataset": level, "timings": timings, "total_seconds": total_seconds}
    (out / "report.json").write_text(json.dumps(payload, indent=2))
    ref = ({"dataset mean": level["normalized_score_mean"]}
           if level and level.get("normalized_score_mean") is not None else None)
    plot_scores(reports, out / "scores.png", curves=curves or None, reference=ref)
    return text
