"""Tables and target checks of a ``make quality`` result (``benchmarks/quality.json``)."""

from __future__ import annotations

from typing import Any

import numpy as np

BACKBONES = (("edm_euler", "EDM Euler"), ("edm_heun", "EDM Heun"), ("ct", "CT"), ("cd", "CD"), ("meanflow", "MeanFlow"),
             ("ct_ect", "CT from EDM (ECT)"),
             ("edm_euler_ref", "EDM Euler, reference sampler (80, ρ 7)"),
             ("ct_ref", "CT, reference re-noising"), ("cd_ref", "CD, reference re-noising"))
TARGET_PRECISION, TARGET_SHARE, TARGET_WORST_SEED = 0.90, 0.5, 0.85
# the backbones meant to work at NFE 1
ONE_STEP = (("ct", "CT"), ("cd", "CD"), ("meanflow", "MeanFlow"), ("ct_ect", "CT from EDM"))
STAGE_LABELS = {"edm": "EDM", "ct": "CT", "cd": "CD", "meanflow": "MeanFlow", "ct_ect": "CT from EDM"}
METRICS = ("precision", "worst_precision", "min_share_ratio", "sliced_w1")


def replace_block(path, start: str, end: str, block: str) -> None:
    """Write ``block`` (which begins with ``start`` and ends with ``end``) over the block between those markers in the
    file at ``path``, or append it; the rest of the file is kept."""
    from pathlib import Path

    path = Path(path)
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def toy_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (toy, backbone, NFE): precision, worst condition's precision, min share ratio, sliced W1,
    averaged over the seeds, and the worst seed's precision."""
    rows = []
    for toy, by_seed in result.get("toys", {}).items():
        seeds = list(by_seed.values())
        truth = [s["truth"] for s in seeds]
        rows.append({"toy": toy, "backbone": "truth", "nfe": "", **{k: _mean([t[k] for t in truth]) for k in METRICS},
                     "worst_seed": min(t["precision"] for t in truth), "seeds": len(seeds)})
        for key, label in BACKBONES:
            nfes = sorted({int(n) for s in seeds for n in s.get(key, {})})
            for nfe in nfes:
                vals = [s[key][str(nfe)] for s in seeds if str(nfe) in s.get(key, {})]
                rows.append({"toy": toy, "backbone": label, "key": key, "nfe": nfe,
                             **{k: _mean([v[k] for v in vals]) for k in METRICS},
                             "worst_seed": min(v["precision"] for v in vals), "seeds": len(vals),
                             "precision_seeds": [v["precision"] for v in vals]})
    return rows


def toy_table(result: dict[str, Any]) -> str:
    lines = ["| toy | backbone | NFE | precision | worst seed | worst condition | min share / true | sliced W1 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in toy_rows(result):
        lines.append(f"| {r['toy']} | {r['backbone']} | {r['nfe']} | {r['precision']:.3f} | {r['worst_seed']:.3f} | "
                     f"{r['worst_precision']:.3f} | {r['min_share_ratio']:.2f} | {r['sliced_w1']:.4f} |")
    return "\n".join(lines)


def toy_targets(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for the toy goals: precision averaged over a toy's data seeds, the worst seed beside."""
    rows = toy_rows(result)
    out = []
    for toy in result.get("toys", {}):
        def get(key, nfe, rows=rows, toy=toy):
            return next((r for r in rows if r["toy"] == toy and r.get("key") == key and r["nfe"] == nfe), None)

        ones = [(label, get(key, 1)) for key, label in ONE_STEP if get(key, 1)]
        if ones:
            label, r = max(ones, key=lambda lr: lr[1]["precision"])
            ok = (r["precision"] >= TARGET_PRECISION and r["min_share_ratio"] >= TARGET_SHARE
                  and r["worst_seed"] >= TARGET_WORST_SEED)
            out.append((f"{toy}: best one-step backbone at NFE 1: precision ≥ 0.90, every mode ≥ ½ its share, no "
                        "seed < 0.85", ok, f"{label}: {r['precision']:.3f}, {r['min_share_ratio']:.2f}, worst seed "
                        f"{r['worst_seed']:.3f} ({r['seeds']} seeds)"))
        r = get("meanflow", 1)
        if r:
            out.append((f"{toy}: MeanFlow NFE 1 precision ≥ 0.90", r["precision"] >= TARGET_PRECISION,
                        f"{r['precision']:.3f}"))
        edm = [r for r in rows if r["toy"] == toy and r.get("key") in ("edm_euler", "edm_heun") and r["nfe"] <= 4]
        if edm:
            best = max(edm, key=lambda r: r["precision"])
            out.append((f"{toy}: EDM best NFE ≤ 4 precision ≥ 0.90", best["precision"] >= TARGET_PRECISION,
                        f"{best['precision']:.3f} ({best['backbone']} NFE {best['nfe']})"))
        for key, label in (("edm_euler", "EDM Euler"), *ONE_STEP):
            r2, r4 = get(key, 2), get(key, 4)
            if r2 and r4:
                # 0.005 is about one standard error of a precision over 6,000 samples (sqrt(0.9 * 0.1 / 6000) = 0.004).
                out.append((f"{toy}: {label} NFE 4 ≥ NFE 2 − 0.005 (1 SE)", r4["precision"] >= r2["precision"] - 0.005,
                            f"{r2['precision']:.3f} → {r4['precision']:.3f}"))
    return out


def _cell(x: dict[str, float] | None) -> str:
    return f"{x['score']:.1f} ± {x['se']:.1f}" if x else "—"


def me_table(result: dict[str, Any]) -> str:
    """Per analogue: IDQL scores per backbone and NFE, then the behaviours' own."""
    analogues = result.get("analogues") or {}
    blocks = []
    for name, r in analogues.items():
        stages = [s for s in STAGE_LABELS if s in r]
        lines = [f"**{name}** ({r.get('members', 1)} member(s) per stage" +
                 ("; across-seed mean ± SE" if r.get("members", 1) > 1 else "; mean ± SE over episodes") + ")", "",
                 "| NFE | " + " | ".join(STAGE_LABELS[s] for s in stages) + " |",
                 "| ---: | " + " | ".join("---:" for _ in stages) + " |"]
        for nfe in ("1", "2", "4"):
            lines.append(f"| {nfe} | " + " | ".join(_cell(r[s].get(nfe)) for s in stages) + " |")
        b = r["behaviour"]
        lines += ["", f"Behaviours (over their episodes in the data): strong {_cell(b['expert'])}, weak "
                      f"{_cell(b['medium'])}, dataset {_cell(b['dataset'])}.", ""]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def me_targets(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The analogue goals of a run: one-step NFE 1 within one SE of EDM's best (its across-seed SE), the best one at
    or above EDM's best and the strong behaviour, and no backbone losing more than one SE (of the difference) from
    NFE 2 to NFE 4."""
    out = []
    for name, r in (result.get("analogues") or {}).items():
        members = r.get("members", 1)
        tag = f"{name} ({members} seed{'s' if members > 1 else ''})"
        edm_nfe = max(r["edm"], key=lambda n: r["edm"][n]["score"])
        edm = r["edm"][edm_nfe]
        expert = r["behaviour"]["expert"]["score"]
        ones = [(label, r[key]["1"]) for key, label in ONE_STEP if key in r and "1" in r[key]]
        for label, x in ones:
            out.append((f"{tag}: {label} NFE 1 within one SE of EDM's best (NFE {edm_nfe})",
                        x["score"] >= edm["score"] - edm["se"], f"{_cell(x)} vs {_cell(edm)}"))
        if ones:
            label, x = max(ones, key=lambda lx: lx[1]["score"])
            out.append((f"{tag}: the best one-step NFE 1 ≥ EDM's best and ≥ the strong behaviour",
                        x["score"] >= edm["score"] and x["score"] >= expert,
                        f"{label} {x['score']:.1f} vs EDM {edm['score']:.1f}, strong behaviour {expert:.1f}"))
        for key, label in (("edm", "EDM"), *ONE_STEP):
            x2, x4 = r.get(key, {}).get("2"), r.get(key, {}).get("4")
            if x2 and x4:
                se = float(np.hypot(x2["se"], x4["se"]))
                out.append((f"{tag}: {label} NFE 4 ≥ NFE 2 − 1 SE", x4["score"] >= x2["score"] - se,
                            f"{x2['score']:.1f} → {x4['score']:.1f} (SE {se:.1f})"))
    return out


def summary(result: dict[str, Any]) -> str:
    parts = [f"quality: {result.get('label', '')} (seeds {result.get('seeds')})"]
    if result.get("toys"):
        parts.append(toy_table(result))
    if result.get("analogues"):
        parts.append(me_table(result))
    checks = toy_targets(result) + me_targets(result)
    if checks:
        parts.append("\n".join(f"[{'met' if ok else 'MISSED'}] {name}: {got}" for name, ok, got in checks))
    return "\n\n".join(parts)


PANEL_TITLES = {"edm_euler": "EDM Euler", "edm_heun": "EDM Heun", "ct": "CT", "cd": "CD", "meanflow": "MeanFlow"}


def plot_toys(samples: dict[str, dict[str, list[np.ndarray]]], path, n: int, seed: int) -> None:
    """One row per toy: the truth, then each plotted backbone / NFE (colour = condition)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from idql_cm.data.toys import toy as toy_of

    toys = list(samples)
    panels = ["truth"] + list(next(iter(samples.values())))
    fig, axes = plt.subplots(len(toys), len(panels), figsize=(2.1 * len(panels), 2.2 * len(toys)), squeeze=False)
    rng = np.random.default_rng(seed)
    for r, name in enumerate(toys):
        toy = toy_of(name, seed)
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            sets = [toy.sample(k, n, rng) for k in range(toy.num_conditions)] if panel == "truth" else samples[name][panel]
            for k, s in enumerate(sets):
                ax.scatter(s[:600, 0], s[:600, 1], s=1.5, alpha=0.35, color=f"C{k}", rasterized=True)
            for k in range(toy.num_conditions):
                for centre in toy.centres(k):
                    ax.add_patch(plt.Circle(centre, 0.15, fill=False, lw=0.4, color="0.4"))
            ax.set_xlim(-1, 1)
            ax.set_ylim(-1, 1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
            if r == 0:
                key, _, nfe = panel.partition("@")
                ax.set_title("truth" if panel == "truth" else f"{PANEL_TITLES[key]} NFE {nfe}", fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle("Samples per condition (colour); circles: radius 0.15 around each true mode (6-D: the first two "
                 "coordinates)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(doc: dict[str, Any], path, figure: str | None) -> None:
    """The figures of a run as docs/quality.md (the tables; the method and ablations are written by hand below the
    marker line and kept)."""
    from pathlib import Path

    path = Path(path)
    marker = "<!-- end of generated part -->"
    kept = path.read_text().split(marker, 1)[1] if path.exists() and marker in path.read_text() else "\n"
    m = doc["machine"]
    lines = ["# Quality: generative policies on data whose answer is known", "",
             f"Generated by `make quality` ({doc['started']}, {doc['seconds'] / 60:.1f} min; {m['cpu']}, "
             f"{m['cores']} cores, torch {m['torch']}; {doc['jobs']} stages at a time, one thread each). "
             "The same seeds give the same figures on the same machine and build.", ""]
    for result in doc["variants"].values():
        lines += result_sections(result, figure, "##")
        break  # the shipped configuration only; ablations are in their own JSON files
    path.write_text("\n".join(lines) + "\n" + marker + kept)


def result_sections(result: dict[str, Any], figure: str | None, h: str) -> list[str]:
    lines = []
    if result.get("toys"):
        lines += [f"{h} Toy distributions", "", f"Data seeds {result['seeds']} (each its own mode layout; precision "
                  "is the mean over seeds, the worst seed beside it). Precision: share of samples within 0.15 of a "
                  "mode of their condition; min share / true: the worst mode's share of the samples over its true "
                  "weight; sliced W1: distance to fresh samples of the truth (the truth row is the sampling floor).",
                  "", toy_table(result), ""]
        if figure:
            lines += [f"![toy samples]({figure})", ""]
    if result.get("analogues"):
        lines += [f"{h} Medium-expert analogues (HalfCheetah-v5)", "",
                  "IDQL normalised score ×100 at NFE 1/2/4 (32 candidates, softmax at temperature 100, 20 episodes "
                  "per member and NFE), beside the two behaviours' own scores.", "", me_table(result), ""]
    checks = toy_targets(result) + me_targets(result)
    if checks:
        lines += [f"{h} Targets", "", "| target | met | measured |", "| --- | --- | --- |"]
        lines += [f"| {name} | {'yes' if ok else '**no**'} | {got} |" for name, ok, got in checks]
        lines.append("")
    return lines


FULL_START, FULL_END = "<!-- full: generated by make quality-full -->", "<!-- end of full -->"


def write_full_section(doc: dict[str, Any], path) -> None:
    """The verdict over seeds (``make quality-full``) between its markers in docs/quality.md."""
    from pathlib import Path

    path = Path(path)
    m = doc["machine"]
    result = next(iter(doc["variants"].values()))
    parts = ", ".join(f"{k} {v}" for k, v in doc.get("parts", {}).items())
    lines = [FULL_START, "", "## The verdict over seeds (`make quality-full`)", "",
             f"{parts or doc['started']}; {m['cpu']}, {m['cores']} cores, torch {m['torch']}; {doc['jobs']} stages "
             "at a time, one thread each.", ""]
    lines += result_sections(result, None, "###")
    lines.append(FULL_END)
    text = path.read_text() if path.exists() else ""
    block = "\n".join(lines)
    if FULL_START in text and FULL_END in text:
        text = text[:text.index(FULL_START)] + block + text[text.index(FULL_END) + len(FULL_END):]
    else:
        marker = "<!-- end of generated part -->"
        text = text.replace(marker, marker + "\n\n" + block + "\n", 1) if marker in text else text + "\n" + block
    path.write_text(text)


def ablation_rows(doc: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """Per variant: NFE-1 / NFE-4 precision of CT and CD and EDM's best NFE ≤ 4, each the mean over toys and seeds,
    plus the worst toy's NFE-1 precision."""
    out = []
    for label, result in doc["variants"].items():
        rows = [r for r in toy_rows(result) if r["backbone"] != "truth"]
        cell: dict[str, float] = {}
        for key in ("ct", "cd"):
            for nfe in (1, 4):
                vals = [r["precision"] for r in rows if r.get("key") == key and r["nfe"] == nfe]
                cell[f"{key}{nfe}"] = _mean(vals)
            ones = [r["precision"] for r in rows if r.get("key") == key and r["nfe"] == 1]
            cell[f"{key}_worst"] = min(ones) if ones else float("nan")
        toys = sorted({r["toy"] for r in rows})
        cell["edm"] = _mean([max(r["precision"] for r in rows if r["toy"] == t and r.get("key") in
                                 ("edm_euler", "edm_heun")) for t in toys])
        out.append((label, cell))
    return out


def write_ablations(doc: dict[str, Any], path) -> None:
    """The ablation table between its markers in docs/quality.md (the rest of the page is kept)."""
    from pathlib import Path

    path = Path(path)
    start, end = "<!-- ablations: generated by make quality-ablate -->", "<!-- end of ablations -->"
    lines = [start, "", f"`make quality-ablate` ({doc['started']}, seeds {next(iter(doc['variants'].values()))['seeds']},"
             f" {doc['seconds'] / 60:.0f} min). Precision averaged over the three toys (worst toy in brackets).", "",
             "| configuration | CT NFE 1 | CT NFE 4 | CD NFE 1 | CD NFE 4 | EDM best NFE ≤ 4 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, c in ablation_rows(doc):
        lines.append(f"| {label} | {c['ct1']:.3f} ({c['ct_worst']:.3f}) | {c['ct4']:.3f} | {c['cd1']:.3f} "
                     f"({c['cd_worst']:.3f}) | {c['cd4']:.3f} | {c['edm']:.3f} |")
    lines += ["", end]
    replace_block(path, start, end, "\n".join(lines))
