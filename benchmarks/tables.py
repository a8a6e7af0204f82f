"""The results of ``python -m benchmarks``: the JSON file and the markdown tables printed after a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.harness import ACTOR_KINDS, KINDS, NFES


def write_results(res: dict[str, Any], out: str | Path) -> Path:
    """``res`` as indented JSON (``benchmarks/results.json`` for ``make bench``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    return out


def table(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"idql-cm benchmarks, {res['date']} — {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}, "
             f"torch {m['torch']}, lightning {m['lightning']}"
             + (" (QUICK sizes: not representative)" if res["settings"]["quick"] else ""), ""]
    tr = res.get("train_steps_per_s")
    if tr:
        st = res["settings"]
        where = f"{st.get('precision', '32-true')}, {st.get('device', 'cpu').upper()}"
        comp = any("lightning_compiled" in tr[k] for k in tr)
        unf = any("ratio_unfused" in tr[k] for k in tr)
        k_ship = st.get("fused_steps", 1)
        lines += [f"| training (batch {st['batch_size']}, {where}) | Lightning steps/s (fused_steps {k_ship}) | "
                  "bare PyTorch steps/s | ratio (L/bare time) |"
                  + (" Lightning steps/s, fused_steps 1 | ratio |" if unf else "")
                  + (" Lightning, compile: true |" if comp else ""),
                  "| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if unf else "") + (" ---: |" if comp else "")]
        for k in KINDS:
            if k in tr:
                o = tr[k]
                flag = " (speed varied: machine busy)" if o.get("noisy") or o.get("noisy_unfused") else ""
                lines.append(f"| {k.upper()}{flag} | {o['lightning']:.1f} | {o['bare']:.1f} | {o['ratio']:.3f} |"
                             + (f" {o['lightning_unfused']:.1f} | {o['ratio_unfused']:.3f} |" if unf else "")
                             + (f" {o.get('lightning_compiled', float('nan')):.1f} |" if comp else ""))
        lines.append("")
    sp = res.get("sampler")
    if sp:
        lines += [f"| batch sampling (batch {sp['batch_size']}, {sp['rows']:,} rows) | batches/s |",
                  "| --- | ---: |",
                  f"| TDDataModule (on-device index) | {sp['datamodule_batches_per_s']:,.0f} |",
                  f"| per-item Dataset + DataLoader ({sp['dataloader_workers']} workers, shuffle) | "
                  f"{sp['dataloader_batches_per_s']:,.1f} |",
                  f"| ratio | {sp['ratio']:,.0f}× |", ""]
    ac = res.get("action_ms")
    if ac:
        s = res["settings"]
        lines += [f"| IDQL action selection, {s['action_envs']} states × {s['action_candidates']} candidates "
                  "(ms/call) | NFE 1 | NFE 2 | NFE 4 | one candidate, no critic, NFE 1 |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for k in ACTOR_KINDS:
            alone = ac[k].get("alone_nfe1")
            lines.append(f"| {k.upper()} | " + " | ".join(f"{ac[k][f'nfe{n}']:.1f}" for n in NFES)
                         + (f" | {alone:.2f} |" if alone is not None else " | — |"))
        lines.append("")
    if "eval_env_steps_per_s" in res:
        s = res["settings"]
        lines += [f"Evaluation: {res['eval_env_steps_per_s']:,.0f} env steps/s ({s['eval_envs']} × HalfCheetah-v5, "
                  f"IDQL {s['eval_kind'].upper()} NFE {s['eval_nfe']}, {s['eval_candidates']} candidates, "
                  f"{s['eval_max_steps']}-step episodes; the env alone: {res['eval']['env_only_steps_per_s']:,.0f})"]
    return "\n".join(lines)


def export_lines(res: dict[str, Any]) -> list[str]:
    """Markdown rows of the ``export`` record."""
    s = res["settings"]
    lines = [f"| exported agent, {s['candidates']} candidates (ms/decision) | NFE | onnxruntime | TorchScript | "
             "eager load_agent | onnxruntime speed-up |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, rows in res["ms_per_decision"].items():
        states, _, one = label[1:].partition("_")
        for nfe in NFES:
            o = rows[f"nfe{nfe}"]
            lines.append(f"| {states} state(s){', 1 thread' if one else ''} | {nfe} | {o['onnxruntime']:.2f} | "
                         f"{o['torchscript']:.2f} | {o['eager']:.2f} | {o['onnxruntime_speedup_vs_eager']:.2f}× |")
    return lines


def ensemble_lines(res: dict[str, Any]) -> list[str]:
    """Markdown rows of the ``ensemble`` record: one ``num_seeds: S`` fit against S consecutive solo fits."""
    s = res["settings"]
    S = s["members"]
    lines = [f"| num_seeds {S} vs {S} solo runs (batch {s['batch_size']}, {s['precision']}, {s['device'].upper()}, "
             f"fused_steps {s['fused_steps']}) | ensemble member-updates/s | solo member-updates/s | speed-up | "
             "target | met |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for k in KINDS:
        if k in res:
            o = res[k]
            flag = " (speed varied: machine busy)" if o.get("noisy") else ""
            lines.append(f"| {k.upper()}{flag} | {o['ensemble_member_updates_per_s']:.1f} | "
                         f"{o['solo_member_updates_per_s']:.1f} | {o['speedup']:.2f}× | ≥ {o['target']:g}× | "
                         f"{'n/a' if o['target_met'] is None else 'yes' if o['target_met'] else 'no'} |")
    if s.get("quick"):
        lines.append("(QUICK sizes: not representative)")
    if S != 5:
        lines.append("(the targets are stated for S = 5: n/a here)")
    return lines
