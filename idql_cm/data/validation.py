"""Checks on raw per-row arrays shared by the dataset readers: shapes, row counts, finiteness and done flags.

Every failure is a one-line :class:`~idql_cm.errors.DataError` naming the file (``where``), the key, what was
expected and what was found.
"""

from __future__ import annotations

import numpy as np

from idql_cm.errors import DataError

__all__ = ["as_flags", "as_rows", "check_arrays", "check_finite"]


def as_rows(where: str, key: str, arr: np.ndarray, ndim: int) -> np.ndarray:
    """Observations/actions → (N, D) (a 1-D array is read as D = 1); per-row scalars → (N,) ((N, 1) is squeezed)."""
    if ndim == 2:
        if arr.ndim == 1:
            return arr.reshape(-1, 1)
        if arr.ndim != 2:
            raise DataError(f"{where}: key '{key}': expected a 2-D array (rows, dims), found shape {arr.shape}")
        return arr
    if arr.ndim == 2 and arr.shape[1] == 1:
        return arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{where}: key '{key}': expected a 1-D array (one value per row), found shape {arr.shape}")
    return arr


def check_finite(where: str, key: str, arr: np.ndarray) -> None:
    finite = np.isfinite(arr)
    if finite.all():
        return
    bad_rows = ~finite.reshape(len(arr), -1).all(axis=1)
    n_bad = int(bad_rows.sum())
    first = int(np.flatnonzero(bad_rows)[0])
    raise DataError(
        f"{where}: key '{key}': expected finite values, found NaN/Inf in {n_bad} of {len(arr)} rows (first at row {first})"
    )


def as_flags(where: str, key: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "b":
        return arr
    if arr.dtype.kind == "f":
        check_finite(where, key, arr)
    return arr != 0  # bool(x) of each row, as qlearning_dataset's bool(dataset['terminals'][i])


def check_arrays(where: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate raw per-row arrays (keys observations, actions, rewards, terminals[, timeouts]) and return them
    with canonical shapes ((N, D) / (N,)) and bool flags. ``where`` names the file in error messages."""
    out = {
        "observations": as_rows(where, "observations", arrays["observations"], 2),
        "actions": as_rows(where, "actions", arrays["actions"], 2),
        "rewards": as_rows(where, "rewards", arrays["rewards"], 1),
        "terminals": as_rows(where, "terminals", arrays["terminals"], 1),
    }
    if arrays.get("timeouts") is not None:
        out["timeouts"] = as_rows(where, "timeouts", arrays["timeouts"], 1)
    n = len(out["observations"])
    for key, arr in out.items():
        if len(arr) != n:
            raise DataError(
                f"{where}: key '{key}': expected {n} rows (the row count of 'observations'), found {len(arr)} rows"
            )
    if n < 2:
        what = "no rows (empty dataset)" if n == 0 else "1 row"
        raise DataError(
            f"{where}: key 'observations': expected at least 2 rows (each transition pairs a row with the next), found {what}"
        )
    for key in ("observations", "actions"):
        if out[key].shape[1] == 0:
            raise DataError(f"{where}: key '{key}': expected at least one column, found shape {out[key].shape}")
    for key in ("observations", "actions", "rewards"):
        check_finite(where, key, out[key])
    out["terminals"] = as_flags(where, "terminals", out["terminals"])
    if "timeouts" in out:
        out["timeouts"] = as_flags(where, "timeouts", out["timeouts"])
    return out
