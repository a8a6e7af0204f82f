"""``idql-cm export``: the parser (no torch import) and its handler (see :mod:`idql_cm.export`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from idql_cm.errors import ConfigError
from idql_cm.export import FORMATS


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``idql-cm export`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "export", help="export an IDQL agent (actor + critic checkpoints) to ONNX or TorchScript",
        description="Write the whole decision, raw observation to action, as one file: the observation "
                    "normaliser, N candidates from the EMA behaviour policy at exactly K network evaluations, "
                    "the IQL critic's advantage and the selection. --inspect FILE prints an exported file's "
                    "metadata.")
    p.add_argument("--actor", metavar="CKPT", help="a behaviour checkpoint: EDM, CT, CD, MeanFlow or your own backbone (its EMA policy)")
    p.add_argument("--critic", metavar="CKPT", default=None,
                   help="IQL checkpoint of the same data; without it the behaviour policy alone is exported "
                        "(one candidate: how a critic-guided policy, q_weight > 0, acts)")
    p.add_argument("--nfe", type=int, default=1, help="network evaluations per candidate (default 1)")
    p.add_argument("--candidates", type=int, default=256, help="candidates per state (default 256)")
    p.add_argument("--temperature", type=float, default=100.0, help="T of softmax(T * advantage) (default 100)")
    p.add_argument("--selection", choices=("softmax", "argmax"), default="softmax", help="default softmax")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from the --out suffix (.onnx; .pt/.ts)")
    p.add_argument("--member", type=int, default=None, metavar="K",
                   help="member K of ensemble checkpoints (num_seeds): actor K with critic K (or a solo critic)")
    p.add_argument("--out", metavar="FILE", help="the file to write")
    p.add_argument("--inspect", metavar="FILE", default=None, help="print an exported file's metadata and exit")
    p.set_defaults(func=run_export)
    return p


def describe(metadata: dict[str, Any]) -> str:
    """An exported file's metadata as aligned ``key: value`` lines."""
    width = max(map(len, metadata))
    lines = []
    for key, value in metadata.items():
        if isinstance(value, (list, dict)):
            value = json.dumps(value)
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)


def run_export(args: argparse.Namespace) -> int:
    from idql_cm.export.exporter import export_agent  # torch: only once the command runs
    from idql_cm.export.runtime import read_metadata

    if args.inspect is not None:
        print(describe(read_metadata(args.inspect)))
        return 0
    if not args.actor or not args.out:
        raise ConfigError("idql-cm export: expected --actor CKPT and --out FILE (or --inspect FILE), found "
                          + ("neither" if not (args.actor or args.out) else "no --out" if args.actor else "no --actor"))
    res = export_agent(args.actor, args.critic, args.out, nfe=args.nfe, candidates=args.candidates,
                       temperature=args.temperature, selection=args.selection, fmt=args.format, member=args.member)
    m = res.metadata
    what = (f"{m['candidates']} candidates, {m['selection']}" + (f" T={m['temperature']}"
            if m["selection"] == "softmax" else "")) if m["critic_sha256"] else "behaviour policy alone"
    print(f"idql-cm export: wrote {res.path} ({m['format']}, {m['kind']}, NFE {m['nfe']}, {what}; "
          f"{os.path.getsize(res.path) / 1e6:.1f} MB; max |exported - eager| {res.max_abs_diff:.1e})",
          file=sys.stdout)
    return 0
