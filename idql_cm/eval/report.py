"""Evaluation reports: per-NFE results, JSON / Markdown writers, multi-run tables, plots and ``idql-cm report``.

Statistics. For one run, the spread of a result is the **standard error of the mean over episodes**:
``SE = s / √n`` with ``s`` the *sample* standard deviation (``ddof = 1``) of the ``n`` per-episode values, computed
on the D4RL normalised ×100 scale (and, separately, on raw returns). This is the usual "mean ± standard error over
episode seeds" of the CleanDiffuser tutorial / paper (whose code does not show the formula; docs/design.md);
``ddof = 1`` is the unbiased choice and is slightly larger than a population SE (×√(n/(n−1)), 0.3 % at n = 150).
Episodes whose simulation went unstable (non-finite observations) are excluded from means and SEs and reported in
``unstable_episodes``. With fewer than two counted episodes the SE is ``None``.

Across training seeds (:func:`merge_seeds`) the result is the mean of the per-seed means ± the SE of those means
(``ddof = 1`` over seeds, ``"se_over": "seeds"``), as IDQL's authors report; with a single seed the episode SE of
that seed is kept (``"se_over": "episodes"``).

An ensemble run (``num_seeds: S``) writes one report whose ``results`` are already those across-seed rows and whose
``members`` hold each member's own per-NFE results (``{"member", "train_seed", "results"}``);
:func:`expand_members` turns it back into S solo-like reports, so ensembles and solo seeds merge alike.

Report JSON shape::

    {"task": str | None, "env_id": str, "backbone": "edm"|"cd"|"ct", "step": int, "critic": path | None,
     "idql": bool (False = behaviour policy alone), "selection": "softmax"|"argmax", "temperature": float,
     "num_candidates": int, ..., "results": [nfe_result, ...]}

with each ``nfe_result`` ``{"nfe", "episodes", "counted_episodes", "unstable_episodes", "return_mean", "return_se",
"normalized_score_mean", "normalized_score_se", "seconds", "action_latency_ms", "env_steps_per_second", "returns",
"normalized_scores", "lengths", "unstable", ...}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from idql_cm.backbones import registered
from idql_cm.errors import DataError
from idql_cm.fileio import atomic_write

_DATASET_ABBREV = {"medium-expert": "me", "medium-replay": "mr", "full-replay": "fr", "medium": "m", "expert": "e",
                   "random": "r"}


# ------------------------------------------------------------------------------------------------ statistics
def mean_se(values: Iterable[float]) -> tuple[float | None, float | None]:
    """``(mean, s/√n)`` with the sample std (``ddof = 1``); ``(None, None)`` for no values, SE ``None`` for one."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return None, None
    if x.size == 1:
        return float(x[0]), None
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def _score_task(task: str | None, env_id: str | None) -> str | None:
    """The name to hand to ``normalized_score``: the task if its family is known, else the env id, else None."""
    from idql_cm.data.scores import task_family

    for name in (task, env_id):
        if isinstance(name, str):
            for candidate in (name, os.path.basename(name)):
                if task_family(candidate) is not None:
                    return candidate
    return None


def nfe_result(rollout, task: str | None = None) -> dict[str, Any]:
    """The per-NFE result of one :func:`~idql_cm.eval.rollout.evaluate` call (a ``Rollout``, or its ``to_dict()``).

    Normalised scores (D4RL, ×100) are computed when ``task`` or the rollout's ``env_id`` names a known family
    (halfcheetah / hopper / walker2d); otherwise they are ``None``. Means and SEs skip unstable episodes.
    """
    from idql_cm.data.scores import normalized_score

    if not isinstance(rollout, dict):
        rollout = rollout.to_dict()
    returns = [float(r) for r in rollout["returns"]]
    unstable = [bool(u) for u in rollout.get("unstable", [False] * len(returns))]
    counted = [r for r, u in zip(returns, unstable, strict=True) if not u]
    score_task = _score_task(task, rollout.get("env_id"))
    scores = [float(normalized_score(score_task, r)) for r in returns] if score_task else None
    r_mean, r_se = mean_se(counted)
    s_mean, s_se = (mean_se([s for s, u in zip(scores, unstable, strict=True) if not u]) if scores is not None
                    else (None, None))
    lengths = [int(n) for n in rollout.get("lengths", [])]
    return {
        "nfe": int(rollout["nfe"]),
        "episodes": len(returns),
        "counted_episodes": len(counted),
        "unstable_episodes": int(sum(unstable)),
        "return_mean": r_mean,
        "return_se": r_se,
        "return_std": float(np.std(counted, ddof=1)) if len(counted) > 1 else None,
        "normalized_score_mean": s_mean,
        "normalized_score_se": s_se,
        "length_mean": float(np.mean(lengths)) if lengths else None,
        "seconds": float(rollout.get("seconds", float("nan"))),
        "action_latency_ms": float(rollout.get("action_latency_ms", float("nan"))),
        "env_steps": int(rollout.get("env_steps", 0)),
        "env_steps_per_second": float(rollout.get("env_steps_per_second", float("nan"))),
        "num_envs": rollout.get("num_envs"),
        "seed": rollout.get("seed"),
        "returns": returns,
        "normalized_scores": scores,
        "lengths": lengths,
        "unstable": unstable,
        "videos": list(rollout.get("videos", [])),
    }


def build_report(results: Sequence[dict[str, Any]], *, task: str | None, env_id: str, backbone: str | None,
                 step: int, critic: str | None, selection: str = "softmax", temperature: float | None = None,
                 num_candidates: int | None = None, **extra: Any) -> dict[str, Any]:
    """The report dict (see the module docstring); ``idql`` is False when there is no critic (behaviour cloning
    alone, in which case ``selection``, ``temperature`` and ``num_candidates`` do not apply and are ``None``)."""
    from idql_cm._version import __version__

    idql = critic is not None
    report: dict[str, Any] = {
        "task": task,
        "env_id": env_id,
        "backbone": backbone,
        "step": int(step),
        "critic": critic,
        "idql": idql,
        "selection": selection if idql else None,
        "temperature": temperature if idql else None,
        "num_candidates": num_candidates if idql else None,
    }
    report.update(extra)
    report.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    report.setdefault("idql_cm_version", __version__)
    report["results"] = sorted((dict(r) for r in results), key=lambda r: r["nfe"])
    return report


def expand_members(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The S solo-like reports of an ensemble report (member k's results, ``train_seed`` s + k, ``member`` k); a solo
    report as it is."""
    members = report.get("members")
    if not members:
        return [report]
    top = {k: v for k, v in report.items() if k not in ("results", "members", "seeds", "train_seeds", "seed_everything")}
    return [{**top, "member": m.get("member"), "train_seed": m.get("train_seed"), "results": m.get("results", [])}
            for m in members]


# ------------------------------------------------------------------------------------------------- rendering
def short_task(task: str | None, env_id: str | None = None) -> str:
    """``halfcheetah-medium-expert-v2`` → ``HalfCheetah-me`` (the tutorial's row labels); unknown names as they are."""
    name = task or env_id or "?"
    low = os.path.basename(str(name)).lower()
    from idql_cm.data.scores import FAMILY_LABELS

    for fam, label in FAMILY_LABELS.items():
        if low.startswith(fam):
            rest = re.sub(r"\.(hdf5|h5)$", "", low[len(fam):]).replace("_", "-").strip("-")
            rest = re.sub(r"(^|-)v\d+$", "", rest)
            abbrev = _DATASET_ABBREV.get(rest)
            if abbrev:
                return f"{label}-{abbrev}"
            return f"{label}-{rest}" if rest else label
    return str(name)


def _fmt(mean: float | None, se: float | None, digits: int = 1) -> str:
    if mean is None or not math.isfinite(mean):
        return "—"
    if se is None or not math.isfinite(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f}±{se:.{digits}f}"


def _fmt_steps(step: int | None) -> str:
    if step is None:
        return "?"
    step = int(step)
    for div, suf in ((1_000_000, "M"), (1_000, "K")):
        if step >= div:
            v = step / div
            return f"{v:.0f}{suf}" if v == int(v) else f"{v:.1f}{suf}"
    return str(step)


def _num(x, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def render_markdown(report: dict[str, Any]) -> str:
    """A Markdown page for one report: a table laid out like the tutorial's (rows NFE, score ± SE), then details."""
    bb = (report.get("backbone") or "?").upper()
    env_label = short_task(report.get("task"), report.get("env_id"))
    lines = [f"# Evaluation: {report.get('task') or report.get('env_id')} ({report.get('env_id')})", ""]
    if report.get("idql"):
        lines.append(f"IDQL: {report.get('num_candidates')} candidates from the {bb} behaviour policy, re-ranked by "
                     f"the IQL critic `{report.get('critic')}` ({report.get('selection')} selection, "
                     f"temperature {report.get('temperature')}).")
    elif report.get("q_weight"):
        lines.append(f"The critic-guided {bb} policy alone (trained with q_weight {report['q_weight']:g}): one sample "
                     f"per state, no critic at decision time.")
    elif report.get("advantage_beta"):
        lines.append(f"The advantage-weighted {bb} policy alone (trained with advantage_beta "
                     f"{report['advantage_beta']:g}): one sample per state, no critic at decision time.")
    else:
        lines.append(f"Behaviour policy alone (no critic: behaviour cloning with the {bb} model, one sample per "
                     f"state).")
    if report.get("idql") and report.get("q_weight"):
        lines.append(f"The policy was trained with critic guidance (q_weight {report['q_weight']:g}).")
    if report.get("idql") and report.get("advantage_beta"):
        lines.append(f"The policy was trained on advantage-weighted data (advantage_beta {report['advantage_beta']:g}).")
    if report.get("env_choice"):
        lines.append(f"Environment: {report['env_choice']}.")
    members = report.get("members") or []
    if members:
        seeds = ", ".join(str(m.get("train_seed")) for m in members)
        lines += [f"Training step {report.get('step')}; D4RL normalised score ×100 over {len(members)} training seeds "
                  f"({seeds}, trained side by side: num_seeds {len(members)}): the mean of the members' means ± the "
                  f"standard error across members (sample std / √seeds); each member on the same episodes; unstable "
                  f"episodes excluded. Episodes and unstable are summed over members, the timings averaged.", ""]
    else:
        lines += [f"Training step {report.get('step')}; D4RL normalised score ×100, mean ± standard error over "
                  f"episodes (sample std / √n); unstable episodes excluded.", ""]
    lines.append(f"| Environment | NFE | {bb} ({_fmt_steps(report.get('step'))}) | return | episodes | unstable | "
                 f"action latency (ms) | env steps/s | seconds |")
    lines.append("| --- | :-- | --- | --- | --- | --- | --- | --- | --- |")
    for i, r in enumerate(report.get("results", [])):
        lines.append(
            f"| {env_label if i == 0 else ''} | {r['nfe']} | "
            f"{_fmt(r.get('normalized_score_mean'), r.get('normalized_score_se'))} | "
            f"{_fmt(r.get('return_mean'), r.get('return_se'))} | {r.get('episodes')} | "
            f"{r.get('unstable_episodes', 0)} | {_num(r.get('action_latency_ms'), '.3f')} | "
            f"{_num(r.get('env_steps_per_second'), '.0f')} | {_num(r.get('seconds'), '.1f')} |")
    if members:
        nfes = [r["nfe"] for r in report.get("results", [])]
        lines += ["", "Per member: mean ± standard error over its episodes.", "",
                  "| NFE | " + " | ".join(f"member {m.get('member')} (seed {m.get('train_seed')})" for m in members)
                  + " |", "| :-- | " + " | ".join("---" for _ in members) + " |"]
        for k in nfes:
            cells = []
            for m in members:
                res = next((x for x in m.get("results", []) if x["nfe"] == k), None)
                cells.append(_fmt(res.get("normalized_score_mean"), res.get("normalized_score_se")) if res else "—")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    videos = [v for r in [*report.get("results", []), *(x for m in members for x in m.get("results", []))]
              for v in r.get("videos", [])]
    if videos:
        lines += ["", "Videos: " + ", ".join(f"`{v}`" for v in videos)]
    return "\n".join(lines) + "\n"


def _json_clean(x):
    """NaN/Inf → None (strict JSON), NumPy scalars → Python."""
    if isinstance(x, dict):
        return {str(k): _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_report(report: dict[str, Any], out_dir: str | os.PathLike, name: str = "eval_report") -> tuple[Path, Path]:
    """Write ``{out_dir}/{name}.json`` and ``{name}.md`` atomically (:func:`idql_cm.fileio.atomic_write`); returns both
    paths."""
    out = Path(out_dir)
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    atomic_write(jpath, json.dumps(_json_clean(report), indent=2, allow_nan=False) + "\n")
    atomic_write(mpath, render_markdown(report))
    return jpath, mpath


# ----------------------------------------------------------------------------------------------- multi-run
def _column(report: dict[str, Any]) -> str:
    """``CT``, ``CT (BC)`` (no critic), ``CT η=0.5`` (critic-guided, re-ranked), ``CT η=0.5 (N=1)`` (guided, alone);
    ``CT β=3`` / ``CT β=3 (N=1)`` the same for advantage weighting."""
    bb = (report.get("backbone") or "?").upper()
    idql = report.get("idql", report.get("critic") is not None)
    q, beta = float(report.get("q_weight") or 0.0), float(report.get("advantage_beta") or 0.0)
    tags = ([f"η={q:g}"] if q > 0 else []) + ([f"β={beta:g}"] if beta > 0 else [])
    if tags:
        return f"{bb} {' '.join(tags)}" + ("" if idql else " (N=1)")
    return bb if idql else f"{bb} (BC)"


def _group_key(report: dict[str, Any]) -> tuple:
    return (report.get("task"), report.get("env_id"), report.get("backbone"),
            bool(report.get("idql", report.get("critic") is not None)), float(report.get("q_weight") or 0.0),
            float(report.get("advantage_beta") or 0.0))


def combined_table(reports: Sequence[dict[str, Any]]) -> str:
    """Markdown table like the tutorial's: rows (task, NFE), columns EDM / CD / CT (plus any other backbone and
    behaviour-cloning-alone runs), cells "mean±SE" of the normalised score. Several reports for the same task and
    backbone (e.g. seeds, and the members of an ensemble report, :func:`expand_members`) are merged first with
    :func:`merge_seeds`."""
    groups: OrderedDict[tuple, list[dict]] = OrderedDict()
    for r in reports:
        for m in expand_members(r):
            groups.setdefault(_group_key(m), []).append(m)
    merged = []
    for rs in groups.values():
        merged += merge_seeds([[r] for r in rs]) if len(rs) > 1 else rs
    present = {_column(r) for r in merged}
    columns = [c for c in (s.kind.upper() for s in registered()) if c in present]  # registry order first
    for r in merged:
        if _column(r) not in columns:
            columns.append(_column(r))
    steps: dict[str, set] = {c: set() for c in columns}
    seeds: set = set()
    tasks: OrderedDict[str, dict[str, dict]] = OrderedDict()
    for r in merged:
        label = short_task(r.get("task"), r.get("env_id"))
        tasks.setdefault(label, {})[_column(r)] = r
        steps[_column(r)].add(r.get("step"))
        seeds.add(r.get("seeds", 1))
    header = [f"{c} ({_fmt_steps(next(iter(steps[c])))})" if len(steps[c]) == 1 else c for c in columns]
    lines = ["| Environment | NFE | " + " | ".join(header) + " |",
             "| --- | :-- | " + " | ".join("---" for _ in columns) + " |"]
    for label, cols in tasks.items():
        nfes = sorted({res["nfe"] for r in cols.values() for res in r.get("results", [])})
        for i, k in enumerate(nfes):
            cells = []
            for c in columns:
                res = next((x for x in cols[c]["results"] if x["nfe"] == k), None) if c in cols else None
                cells.append(_fmt(res.get("normalized_score_mean"), res.get("normalized_score_se")) if res else "—")
            lines.append(f"| {label if i == 0 else ''} | {k} | " + " | ".join(cells) + " |")
    n_seeds = sorted(s for s in seeds if s is not None)
    if n_seeds and max(n_seeds) > 1:
        note = f"mean ± standard error over {'/'.join(map(str, n_seeds))} training seeds (of per-seed means)"
    else:
        note = "mean ± standard error over episodes (one training seed)"
    return "\n".join(lines) + f"\n\nD4RL normalised score ×100, {note}.\n"


def merge_seeds(reports_by_seed: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Merge the reports of several training seeds: ``reports_by_seed[i]`` holds seed ``i``'s reports (one per task
    and backbone; for duplicates the latest step is kept). An ensemble report among them counts as its S members,
    each a seed of its own (:func:`expand_members`).

    Per (task, backbone, IDQL-or-not) and NFE: ``normalized_score_mean`` / ``return_mean`` = mean of the per-seed
    means; ``*_se`` = sample std (ddof 1) of the per-seed means / √(seeds) (``"se_over": "seeds"``); with one seed
    the episode SE is kept (``"se_over": "episodes"``). Also ``seeds`` (count), ``normalized_score_seeds`` (the
    per-seed means), summed ``episodes`` / ``unstable_episodes``, and mean ``seconds`` / ``action_latency_ms``.
    """
    buckets: list[list[dict]] = []
    for seed_reports in reports_by_seed:
        buckets.append([r for r in seed_reports if not r.get("members")])
        for r in seed_reports:
            if r.get("members"):
                buckets += [[m] for m in expand_members(r)]
    per_key: OrderedDict[tuple, list[dict]] = OrderedDict()
    for seed_reports in buckets:
        latest: OrderedDict[tuple, dict] = OrderedDict()
        for r in seed_reports:
            k = _group_key(r)
            if k not in latest or (r.get("step") or 0) >= (latest[k].get("step") or 0):
                latest[k] = r
        for k, r in latest.items():
            per_key.setdefault(k, []).append(r)

    merged = []
    for rs in per_key.values():
        n = len(rs)
        out = {k: v for k, v in rs[0].items() if k != "results"}
        out["seeds"] = n
        out["steps"] = [r.get("step") for r in rs]
        out["step"] = max((r.get("step") or 0) for r in rs)
        if n > 1:
            out["train_seeds"] = [r.get("train_seed") for r in rs]
        nfes = sorted({res["nfe"] for r in rs for res in r.get("results", [])})
        results = []
        for k in nfes:
            per = [res for r in rs for res in r.get("results", []) if res["nfe"] == k]
            row: dict[str, Any] = {"nfe": k, "seeds": len(per), "se_over": "seeds" if len(per) > 1 else "episodes"}
            for key in ("normalized_score", "return"):
                vals = [p.get(f"{key}_mean") for p in per]
                if len(per) > 1:
                    m, s = mean_se(vals)
                else:
                    m, s = per[0].get(f"{key}_mean"), per[0].get(f"{key}_se")
                row[f"{key}_mean"], row[f"{key}_se"] = m, s
                row[f"{key}_seeds"] = vals
            for key in ("episodes", "counted_episodes", "unstable_episodes", "env_steps"):
                row[key] = int(sum(p.get(key) or 0 for p in per))
            for key in ("seconds", "action_latency_ms", "env_steps_per_second"):
                vals = [p.get(key) for p in per if p.get(key) is not None and math.isfinite(p.get(key))]
                row[key] = float(np.mean(vals)) if vals else None
            results.append(row)
        out["results"] = results
        merged.append(out)
    return merged


def plot_scores(reports: Sequence[dict[str, Any]], path: str | os.PathLike,
                curves: dict[str, Any] | None = None, reference: dict[str, float] | None = None) -> Path:
    """Save a PNG: normalised score vs NFE per backbone with SE error bars (one panel per task), and beside it one
    panel per entry of ``curves`` (``title -> [(step, value), ...]`` or ``title -> {label: [(step, value)]}``).
    ``reference`` draws horizontal lines (``label -> score``) on the score panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg only: never touches pyplot's backend
    from matplotlib.figure import Figure

    tasks: OrderedDict[str, list[dict]] = OrderedDict()
    for r in reports:
        tasks.setdefault(short_task(r.get("task"), r.get("env_id")), []).append(r)
    curves = dict(curves or {})
    n_panels = max(1, len(tasks)) + len(curves)
    ncols = min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.8 * nrows), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    colors = {"EDM": "tab:blue", "CD": "tab:orange", "CT": "tab:green"}
    for ax, (label, rs) in zip(axes, tasks.items(), strict=False):
        all_nfe: set = set()
        for r in rs:
            res = [x for x in r.get("results", []) if x.get("normalized_score_mean") is not None]
            if not res:
                continue
            x = [x["nfe"] for x in res]
            all_nfe.update(x)
            y = [x["normalized_score_mean"] for x in res]
            e = [x.get("normalized_score_se") or 0.0 for x in res]
            col = _column(r)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=4, label=col, color=colors.get(col.split()[0]),
                        linestyle="-" if r.get("idql", True) else "--")
        for ref_label, ref_value in (reference or {}).items():  # e.g. the dataset's own level
            ax.axhline(ref_value, color="grey", linestyle=":", label=ref_label)
        ax.set_xscale("log", base=2)
        if all_nfe:
            ax.set_xticks(sorted(all_nfe))
            ax.set_xticklabels([str(k) for k in sorted(all_nfe)])
        ax.set_xlabel("NFE per action")
        ax.set_ylabel("D4RL normalised score")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if not tasks:
        axes[0].set_title("no results")
    for ax, (title, data) in zip(axes[max(1, len(tasks)):], curves.items(), strict=True):
        series = data if isinstance(data, dict) else {None: data}
        for lab, pts in series.items():
            pts = sorted(pts)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None, label=lab)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if any(lab is not None for lab in series):
            ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


# --------------------------------------------------------------------------------------------- idql-cm report
_SEED_RE = re.compile(r"seed[_-]?(\d+)", re.IGNORECASE)


def find_report_files(dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """``report.json`` and ``eval_report*.json`` files under each directory (or the paths themselves if files)."""
    found: list[Path] = []
    for d in dirs:
        p = Path(d)
        if p.is_file():
            found.append(p)
            continue
        if not p.is_dir():
            raise DataError(f"idql-cm report: {d} is neither a directory nor a report file")
        hits = set(p.rglob("report.json")) | set(p.rglob("eval_report*.json"))
        found += sorted(hits)
    return list(OrderedDict.fromkeys(found))


def load_report_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The reports in a JSON file: a report dict, a list of them, or ``{"reports": [...]}``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable JSON report ({type(e).__name__}: {e})") from e
    if isinstance(data, dict) and "results" in data:
        items = [data]
    elif isinstance(data, dict) and isinstance(data.get("reports"), list):
        items = data["reports"]
    elif isinstance(data, list):
        items = data
    else:
        items = []
    return [r for r in items if isinstance(r, dict) and isinstance(r.get("results"), list)]


def read_event_curves(log_dir: str | os.PathLike, tag_pattern: str = r"^eval/nfe\d+/normalized_score$"
                      ) -> dict[str, list[tuple[int, float]]]:
    """Scalars whose tag matches ``tag_pattern`` from the TensorBoard event files directly in ``log_dir``."""
    log_dir = Path(log_dir)
    if not any(log_dir.glob("events.out.tfevents.*")):
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    rx = re.compile(tag_pattern)
    return {t: [(int(e.step), float(e.value)) for e in acc.Scalars(t)]
            for t in acc.Tags().get("scalars", []) if rx.search(t)}


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``idql-cm report DIR [DIR ...] [--out DIR]`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "report", help="merge evaluation reports across seeds and print the NFE × backbone table",
        description="Find report.json / eval_report*.json under the given directories, merge training seeds "
                    "(a path component 'seedN' names the seed; else the report's train_seed; else each DIR is "
                    "one seed; member k of an ensemble report, num_seeds S, is seed s + k and merges with a solo "
                    "run of that seed), print the Markdown table and, with --out, write combined_report.{json,md} "
                    "and scores.png.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories (or report files) to gather")
    p.add_argument("--out", default=None, metavar="DIR", help="write combined_report.json/.md and scores.png here")
    p.set_defaults(func=run_report)
    return p


def _seed_label(path: Path, report: dict[str, Any], dir_index: int) -> str:
    m = None
    for part in path.parts:
        mm = _SEED_RE.fullmatch(part) or _SEED_RE.search(part)
        if mm:
            m = mm
    if m:
        return f"seed{int(m.group(1))}"
    if report.get("train_seed") is not None:
        return f"seed{report['train_seed']}"
    return f"dir{dir_index}"


def run_report(args) -> int:
    """``idql-cm report``: gather, merge seeds, print the table; with ``--out`` also write JSON, Markdown, PNG."""
    by_seed: OrderedDict[str, list[dict]] = OrderedDict()
    sources: list[tuple[Path, dict, str]] = []
    for i, d in enumerate(args.dirs):
        for f in find_report_files([d]):
            for r in load_report_file(f):
                if r.get("members"):  # member k is seed s + k: it merges with (and as) a solo run of that seed
                    label = f"{len(r['members'])} seeds"
                    for m in expand_members(r):
                        by_seed.setdefault(f"seed{m['train_seed']}", []).append(m)
                else:
                    label = _seed_label(f, r, i)
                    by_seed.setdefault(label, []).append(r)
                sources.append((f, r, label))
    if not sources:
        raise DataError(f"idql-cm report: no report.json or eval_report*.json with results under "
                        f"{' '.join(map(str, args.dirs))}")
    merged = merge_seeds(list(by_seed.values()))
    table = combined_table(merged)
    sys.stdout.write(table)
    out = getattr(args, "out", None)
    if out:
        out = Path(out)
        curves: dict[str, dict[str, list]] = OrderedDict()
        for f, r, label in sources:
            for tag, pts in read_event_curves(f.parent).items():
                m = re.search(r"nfe(\d+)", tag)
                title = f"score during training, NFE {m.group(1)}" if m else tag
                curves.setdefault(title, {})[f"{_column(r)} {short_task(r.get('task'), r.get('env_id'))} "
                                             f"{label}"] = pts
        atomic_write(out / "combined_report.json",
                     json.dumps(_json_clean({"reports": merged, "sources": [str(f) for f, _, _ in sources]}),
                                indent=2, allow_nan=False) + "\n")
        atomic_write(out / "combined_report.md", "# idql-cm results\n\n" + table)
        png = plot_scores(merged, out / "scores.png", curves=curves or None)
        sys.stdout.write(f"\nwrote {out / 'combined_report.json'}, {out / 'combined_report.md'}, {png}\n")
    return 0
