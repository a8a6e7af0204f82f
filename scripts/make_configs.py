#!/usr/bin/env python
"""Writes configs/<task>/{iql,edm,cd,ct,meanflow,guided}.yaml for the nine D4RL locomotion tasks.

The configs are committed; this script is how they were made, so the nine tasks cannot drift apart.
Run it after changing a default here: `python scripts/make_configs.py`.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "configs"

# Candidate-selection temperature T of softmax(T·advantage), per task: the reference pipeline's
# configs (docs/design.md; the tutorial's comment swaps medium / medium-replay for halfcheetah).
TEMPERATURE = {
    ("halfcheetah", "medium-expert"): 10, ("halfcheetah", "medium"): 400, ("halfcheetah", "medium-replay"): 100,
    ("hopper", "medium-expert"): 5, ("hopper", "medium"): 50, ("hopper", "medium-replay"): 50,
    ("walker2d", "medium-expert"): 300, ("walker2d", "medium"): 200, ("walker2d", "medium-replay"): 200,
}

HEADER = """\
# {title}
# Stage {stage} of the pipeline for {task} ({steps} steps, batch 256: the reference tutorial's full-length settings).
# Run:   idql-cm fit --config configs/{task}/{stage}.yaml [--seed_everything S --trainer.default_root_dir DIR]
# "{{root}}" in a path means trainer.default_root_dir, so stages of one run find each other.
# Precision is left unset: bf16 autocast on CUDA, fp32 on CPU (resolved at start-up).
"""

TRAINER = """\
seed_everything: 0
trainer:
  max_steps: {steps}
  default_root_dir: results/{task}/seed0/{stage}
  log_every_n_steps: 1000            # scalars to TensorBoard every 1000 steps (no per-step host sync); this and
                                    # the checkpoint period are multiples of model.fused_steps
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        every_n_train_steps: {ckpt_every}   # a checkpoint every {ckpt_every} steps plus checkpoints/last.ckpt
        save_last: true
        save_top_k: -1
        filename: "step={{step}}"
        auto_insert_metric_name: false   # the name as written: step=5000.ckpt (true: Lightning adds "step=" itself)
    - class_path: idql_cm.modules.callbacks.StepProgressBar   # counts gradient steps (fused_steps per iteration)
      init_args:
        refresh_rate: 200
"""

EVAL = """\
    - class_path: idql_cm.eval.callback.RolloutEvaluation
      init_args:
        critic_ckpt: "{{root}}/../iql/checkpoints/last.ckpt"   # IQL critic that re-ranks candidates
        nfe: [1, 2, 4]              # network evaluations per action
        episodes: 150               # 50 envs x 3 rounds, as in the tutorial
        num_envs: 50
        num_candidates: 256         # IDQL candidates per state
        temperature: {temperature}  # softmax(T * advantage) selection temperature for this task
        selection: softmax          # the reference's; 'argmax' is the original IDQL's
        every_n_steps: 0            # 0 = evaluate once, at the end of training
"""

DATA = """\
data:
  dataset: {task}                   # read from $D4RL_DATASET_DIR (default ~/.d4rl/datasets)
  batch_size: 256
  reward_scale: {reward_scale}
"""

MODELS = {
    "iql": """\
model:
  class_path: idql_cm.modules.IQLModule
  init_args:
    hidden_dim: 256
    expectile: 0.7
    discount: 0.99
    tau: 0.005                      # target <- (1-tau) target + tau online ('target_update: reference' for parity)
    lr: 3.0e-4
    lr_schedule: cosine
    fused_steps: 8                  # updates per Trainer iteration: its per-iteration cost paid once per 8 (same training)
""",
    "edm": """\
model:
  class_path: idql_cm.modules.EDMModule
  init_args:
    net: {fourier_scale: 16.0, dropout: 0.1, hidden_dim: 256, n_blocks: 3}
    lr: 3.0e-4
    optimizer: adam
    weight_decay: 0.0               # Adam, no decay: AdamW 0.01 (the reference) measured no better (docs/quality.md)
    lr_schedule: cosine
    ema_decay: 0.9999               # max EMA rate; grows from 0 with the step count (warm-up)
    eval_solver: euler              # the tutorial's EDM column is Euler; nfe = steps
    fused_steps: 8                  # updates per Trainer iteration: its per-iteration cost paid once per 8 (same training)
""",
    "cd": """\
model:
  class_path: idql_cm.modules.CDModule
  init_args:
    teacher_ckpt: "{root}/../edm/checkpoints/last.ckpt"   # the frozen EDM teacher (its EMA weights)
    solver: heun                    # teacher ODE step (the reference used euler)
    distill_intervals: 18
    lr: 3.0e-4
    optimizer: adam
    weight_decay: 0.0               # Adam, no decay: AdamW 0.01 (the reference) measured no better (docs/quality.md)
    lr_schedule: constant           # the reference never stepped its CD scheduler
    target_ema: 0.0                 # target network = online weights (stop-grad); not the policy EMA (docs/quality.md)
    ema_warmup: true                # the policy EMA restarts from the consistency model (not the teacher's EMA)
    ema_decay: 0.9999
    renoise: train_grid             # multistep sampling re-noises on the 18-interval training grid
    fused_steps: 8                  # updates per Trainer iteration: its per-iteration cost paid once per 8 (same training)
""",
    "ct": """\
model:
  class_path: idql_cm.modules.CTModule
  init_args:
    net: {dropout: 0.1, hidden_dim: 256, n_blocks: 3}
    fourier_scale: 0.2              # measured best on the toys (0.02: +0 to +9 points worse at NFE 1; 16 breaks NFE 1)
    s0: 10
    s1: 1280
    lr: 3.0e-4
    optimizer: adam
    weight_decay: 0.0               # Adam, no decay: AdamW 0.01 (the reference) measured no better (docs/quality.md)
    lr_schedule: cosine
    ema_decay: 0.9999
    fused_steps: 8                  # updates per Trainer iteration: its per-iteration cost paid once per 8 (same training)
""",
    "meanflow": """\
model:
  class_path: idql_cm.modules.MeanFlowModule
  init_args:
    net: {dropout: 0.1, hidden_dim: 256, n_blocks: 3}
    fourier_scale: 4.0              # the time input is t in [0, 1] (EDM's 16 acts on 1/4 ln sigma)
    flow_share: 0.25                # share of each batch with r = t (plain flow matching, the anchor); not yet
                                    # measured on D4RL (OFQL uses 0.5)
    P_mean_t: -0.6                  # t ~ logit-normal(-0.6, 1.6), r ~ logit-normal(-4, 1.6), r <= t: the authors'
    P_std_t: 1.6                    # code's sampler (docs/quality.md)
    P_mean_r: -4.0
    P_std_r: 1.6
    adaptive_p: 1.0                 # loss weight 1 / (|err|^2 + c)^p, the paper's p = 1
    lr: 3.0e-4
    optimizer: adam
    weight_decay: 0.0
    lr_schedule: cosine
    ema_decay: 0.9999
    fused_steps: 8                  # updates per Trainer iteration: its per-iteration cost paid once per 8 (same training)
""",
}

TITLES = {"iql": "IQL critic (twin Q, target Q, V)", "edm": "EDM behaviour policy (Karras et al. 2022)",
          "cd": "Consistency distillation from the EDM stage", "ct": "Improved consistency training (iCT)",
          "meanflow": "MeanFlow: a one-step average-velocity flow map (Geng et al. 2025)"}
STEPS = {"iql": 1_000_000, "edm": 1_000_000, "cd": 200_000, "ct": 1_000_000, "meanflow": 1_000_000}


# Critic guidance (guided.yaml): η (q_weight) per dataset, from the literature's ranges in the scale-free form
# −η·Q/mean|Q| (CPQL: η 1 on halfcheetah-medium-expert, 2 on -medium; DTQL's trust-region weight 50 / 1 / 5 on
# medium-expert / medium / medium-replay, i.e. η ≈ 0.02 / 1 / 0.2): the strongest behaviour anchor on medium-expert.
# Not yet measured on D4RL.
Q_WEIGHT = {"medium-expert": 0.1, "medium": 1.0, "medium-replay": 0.3}
GUIDED = "ct"  # the backbone guided.yaml guides (docs/quality.md: the guided CT on the medium-expert analogue)

GUIDED_HEADER = """\
# Critic-guided one-step policy: {title}, trained with q_weight {q_weight} against the IQL stage's critic.
# Stage guided of the pipeline for {task} ({steps} steps, batch 256), run after iql{after}:
#        idql-cm fit --config configs/{task}/guided.yaml
# q_weight is the literature's range for {ds} data (scripts/make_configs.py), NOT YET MEASURED ON D4RL.
# Evaluated alone (one candidate, no critic: eval_report_n1) and with IDQL re-ranking (eval_report).
"""


def guided_config(task: str, ds: str, temp: float) -> str:
    stage, steps = GUIDED, STEPS[GUIDED]
    text = GUIDED_HEADER.format(title=TITLES[stage], q_weight=Q_WEIGHT[ds], task=task, steps=steps, ds=ds,
                                after=" and edm" if stage == "cd" else "")
    text += TRAINER.format(steps=steps, task=task, stage="guided", ckpt_every=steps // 5)
    text += EVAL.format(temperature=temp).replace(
        "        every_n_steps: 0", "        one_candidate: true         # also evaluated alone: one sample per state, no critic\n"
                                    "        every_n_steps: 0")
    text += MODELS[stage].replace("  init_args:\n", f"  init_args:\n    q_weight: {Q_WEIGHT[ds]:<20}"
                                  "# critic guidance η; the critic: the evaluation's critic_ckpt\n", 1)
    text += DATA.format(task=task, reward_scale="iql_locomotion")
    return text


def main() -> None:
    for (env, ds), temp in TEMPERATURE.items():
        task = f"{env}-{ds}-v2"
        out = ROOT / task
        out.mkdir(parents=True, exist_ok=True)
        for stage, steps in STEPS.items():
            text = HEADER.format(title=TITLES[stage], stage=stage, task=task, steps=steps)
            text += TRAINER.format(steps=steps, task=task, stage=stage, ckpt_every=steps // 5)
            if stage != "iql":
                text += EVAL.format(temperature=temp)
            text += MODELS[stage]
            text += DATA.format(task=task, reward_scale="iql_locomotion")
            (out / f"{stage}.yaml").write_text(text)
        (out / "guided.yaml").write_text(guided_config(task, ds, temp))
    print(f"wrote {len(TEMPERATURE) * (len(STEPS) + 1)} configs under {ROOT}")


if __name__ == "__main__":
    main()
