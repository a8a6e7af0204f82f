"""EDM and consistency models over actions (torch and ``idql_cm.nets`` only): σ-grids, preconditioning, losses
and samplers whose network-evaluation count is explicit."""

from idql_cm.diffusion.consistency import (
    ConsistencyModel,
    cd_loss,
    check_teacher_compatible,
    cm_sample,
    ct_loss,
    ict_kprime,
    ict_num_intervals,
    lognormal_index_probs,
    pseudo_huber,
    sample_consistency,
    sampling_sigmas,
)
from idql_cm.diffusion.edm import EDMDenoiser, Preconditioned, edm_sample, ode_step, sample_euler, sample_heun
from idql_cm.diffusion.schedules import karras_sigmas, snap_to_grid

__all__ = [
    "ConsistencyModel",
    "EDMDenoiser",
    "Preconditioned",
    "cd_loss",
    "check_teacher_compatible",
    "cm_sample",
    "ct_loss",
    "edm_sample",
    "ict_kprime",
    "ict_num_intervals",
    "karras_sigmas",
    "lognormal_index_probs",
    "ode_step",
    "pseudo_huber",
    "sample_consistency",
    "sample_euler",
    "sample_heun",
    "sampling_sigmas",
    "snap_to_grid",
]
