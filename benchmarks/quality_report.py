"""Tables and target checks of a ``make quality`` result (``benchmarks/quality.json``)."""

from __future__ import annotations

from typing import Any

import numpy as np

BACKBONES = (("edm_euler", "EDM Euler"), ("edm_heun", "EDM Heun"), ("ct", "CT"), ("cd", "CD"), ("meanflow", "MeanFlow"),
             ("edm_euler_ref", "EDM Euler, reference sampler (80, ρ 7)"),
             ("ct_ref", "CT, reference re-noising"), ("cd_ref", "CD, reference re-noising"))
TARGET_PRECISION, TARGET_SHARE = 0.90, 0.5
ONE_STEP = (("ct", "CT"), ("cd", "CD"), ("meanflow", "MeanFlow"))  # the backbones meant to work at NFE 1


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def toy_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (toy, backbone, NFE): precision, worst condition's precision, min share ratio, sliced W1,
    averaged over the seeds."""
    rows = []
    for toy, by_seed in result.get("toys", {}).items():
        seeds = list(by_seed.values())
        rows.append({"toy": toy, "backbone": "truth", "nfe": "",
                     **{k: _mean([s["truth"][k] for s in seeds]) for k in
                        ("precision", "worst_precision", "min_share_ratio", "sliced_w1")}})
        for key, label in BACKBONES:
            nfes = sorted({int(n) for s in seeds for n in s.get(key, {})})
            for nfe in nfes:
                vals = [s[key][str(nfe)] for s in seeds if str(nfe) in s.get(key, {})]
                rows.append({"toy": toy, "backbone": label, "key": key, "nfe": nfe,
                             **{k: _mean([v[k] for v in vals]) for k in
                                ("precision", "worst_precision", "min_share_ratio", "sliced_w1")},
                             "precision_seeds": [v["precision"] for v in vals]})
    return rows


def toy_table(result: dict[str, Any]) -> str:
    lines = ["| toy | backbone | NFE | precision | worst condition | min share / true | sliced W1 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in toy_rows(result):
        lines.append(f"| {r['toy']} | {r['backbone']} | {r['nfe']} | {r['precision']:.3f} | {r['worst_precision']:.3f} "
                     f"| {r['min_share_ratio']:.2f} | {r['sliced_w1']:.4f} |")
    return "\n".join(lines)


def toy_targets(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for the project's toy goals (docs/quality.md)."""
    rows = toy_rows(result)
    out = []
    for toy in result.get("toys", {}):
        def get(key, nfe, rows=rows, toy=toy):
            return next((r for r in rows if r["toy"] == toy and r.get("key") == key and r["nfe"] == nfe), None)

        for key, label in ONE_STEP:
            r = get(key, 1)
            if r:
                ok = r["precision"] >= TARGET_PRECISION and r["min_share_ratio"] >= TARGET_SHARE
                out.append((f"{toy}: {label} NFE 1 precision ≥ 0.90, every mode ≥ ½ its share", ok,
                            f"{r['precision']:.3f}, {r['min_share_ratio']:.2f}"))
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


def me_table(result: dict[str, Any]) -> str:
    me = result.get("medium_expert")
    if not me:
        return ""
    stages = [s for s in ("edm", "ct", "cd", "meanflow") if any(s in r for r in me.values())]
    lines = ["| seed | NFE | " + " | ".join(s.upper() if s != "meanflow" else "MeanFlow" for s in stages) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in stages) + " |"]
    for seed, r in me.items():
        for nfe in ("1", "2", "4"):
            cells = [f"{r[s][nfe]['score']:.1f}±{r[s][nfe]['se']:.1f}" if nfe in r.get(s, {}) else "—"
                     for s in stages]
            lines.append(f"| {seed} | {nfe} | " + " | ".join(cells) + " |")
        b = r["behaviour"]
        lines.append(f"| {seed} | behaviour | expert {b['expert']['score']:.1f}±{b['expert']['se']:.1f} | medium "
                     f"{b['medium']['score']:.1f}±{b['medium']['se']:.1f} | dataset {b['dataset']['score']:.1f} |"
                     + " |" * (len(stages) - 3))
    return "\n".join(lines)


def me_targets(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    out = []
    for seed, r in result.get("medium_expert", {}).items():
        edm_best = max(r["edm"][n]["score"] for n in r["edm"])
        one_step = max(r[s]["1"]["score"] for s in ("ct", "cd") if s in r)
        expert = r["behaviour"]["expert"]["score"]
        out.append((f"medium-expert seed {seed}: CT or CD NFE 1 ≥ EDM's best NFE ≤ 4", one_step >= edm_best,
                    f"{one_step:.1f} vs {edm_best:.1f}"))
        out.append((f"medium-expert seed {seed}: CT or CD NFE 1 ≥ the strong behaviour", one_step >= expert,
                    f"{one_step:.1f} vs {expert:.1f}"))
    return out


def summary(result: dict[str, Any]) -> str:
    parts = [f"quality: {result.get('label', '')} (seeds {result.get('seeds')})"]
    if result.get("toys"):
        parts.append(toy_table(result))
    if result.get("medium_expert"):
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

    from idql_cm.data.toys import TOYS

    toys = list(samples)
    panels = ["truth"] + list(next(iter(samples.values())))
    fig, axes = plt.subplots(len(toys), len(panels), figsize=(2.1 * len(panels), 2.2 * len(toys)), squeeze=False)
    rng = np.random.default_rng(seed)
    for r, name in enumerate(toys):
        toy = TOYS[name]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            sets = [toy.sample(k, n, rng) for k in range(toy.obs_dim)] if panel == "truth" else samples[name][panel]
            for k, s in enumerate(sets):
                ax.scatter(s[:600, 0], s[:600, 1], s=1.5, alpha=0.35, color=f"C{k}", rasterized=True)
            for k in range(toy.obs_dim):
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
    fig.suptitle("Samples per condition (colour); circles: radius 0.15 around each true mode", fontsize=9)
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
        if result.get("toys"):
            lines += ["## Toy distributions", "", f"Seeds {result['seeds']} (means over seeds). Precision: share of "
                      "samples within 0.15 of a mode of their condition; min share / true: the worst mode's share "
                      "of the samples over its true weight; sliced W1: distance to fresh samples of the truth "
                      "(the truth row is the sampling floor).", "", toy_table(result), ""]
            if figure:
                lines += [f"![toy samples]({figure})", ""]
        if result.get("medium_expert"):
            lines += ["## Medium-expert analogue (HalfCheetah-v5)", "",
                      "IDQL normalised score ×100 (mean ± SE over episodes) at NFE 1/2/4, beside the two behaviours' "
                      "own scores and the dataset's.", "", me_table(result), ""]
        checks = toy_targets(result) + me_targets(result)
        if checks:
            lines += ["## Targets", "", "| target | met | measured |", "| --- | --- | --- |"]
            lines += [f"| {name} | {'yes' if ok else '**no**'} | {got} |" for name, ok, got in checks]
            lines.append("")
        break  # the shipped configuration only; ablations are in their own JSON files
    path.write_text("\n".join(lines) + "\n" + marker + kept)


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
    text = path.read_text() if path.exists() else ""
    block = "\n".join(lines)
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
