"""Batch sampling: ``TDDataModule``'s on-device stream against the reference's per-item ``Dataset`` + ``DataLoader``."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from benchmarks.harness import OBS_DIM, synthetic_tensors


class PerItemDataset(torch.utils.data.Dataset):
    """The reference's path: one transition per ``__getitem__`` as a dict of tensors, collated by the DataLoader."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.n = int(next(iter(tensors.values())).shape[0])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: t[i] for k, t in self.tensors.items()}


def bench_sampler(cfg: dict[str, Any], log=print) -> dict[str, Any]:
    from idql_cm.data.datamodule import TDBatchIterable

    tensors = synthetic_tensors(cfg["sampler_rows"])
    bs = cfg["batch_size"]
    # the data module's stream (what TDDataModule.train_dataloader returns)
    it = iter(TDBatchIterable(tensors, bs, seed=0))
    for _ in range(20):
        next(it)
    n = cfg["datamodule_batches"]
    rates = []
    for _ in range(5):  # the median of 5 rounds: a burst of another tenant on these cores drops out
        t0 = time.perf_counter()
        for _ in range(n // 5):
            b = next(it)
        rates.append((n // 5) / (time.perf_counter() - t0))
    dm_rate = statistics.median(rates)
    assert b["obs"].shape == (bs, OBS_DIM)
    # the reference's DataLoader, looped endlessly
    loader = torch.utils.data.DataLoader(PerItemDataset(tensors), batch_size=bs, shuffle=True,
                                         num_workers=cfg["dataloader_workers"], drop_last=True,
                                         persistent_workers=cfg["dataloader_workers"] > 0)
    dl = iter(loader)
    for _ in range(max(2, cfg["dataloader_workers"] * 2)):  # worker start-up and the prefetch queue
        next(dl)
    n = cfg["dataloader_batches"]
    t0 = time.perf_counter()
    for _ in range(n):
        b = next(dl)
    dl_rate = n / (time.perf_counter() - t0)
    assert b["obs"].shape == (bs, OBS_DIM)
    del dl, loader
    out = {"datamodule_batches_per_s": dm_rate, "dataloader_batches_per_s": dl_rate, "ratio": dm_rate / dl_rate,
           "rows": cfg["sampler_rows"], "batch_size": bs, "dataloader_workers": cfg["dataloader_workers"]}
    log(f"  datamodule {dm_rate:10.1f} batches/s   DataLoader({cfg['dataloader_workers']} workers) "
        f"{dl_rate:8.1f} batches/s   ratio {out['ratio']:.0f}x")
    return out
