"""The built-in optimizer entries. Each default says where it comes from.

diffusers' train_unconditional.py defaults (lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, eps 1e-8)
are the reference point: Adam-like entries use them unless the optimizer's authors advise otherwise.

`first_moment_state` names the momentum buffer the gradient probes compare with the gradient. It is left unset
where no buffer lives in the weights' own basis at full precision: SOAP (its exp_avg is in the preconditioner's
eigenbasis), Muon (two update rules, two buffers), the 8-bit bitsandbytes entries (quantized state), schedule-free
AdamW (no first moment) and Adagrad.
"""

from __future__ import annotations

from typing import Any

import torch

from diffusers_optim.optim.groups import muon_routing
from diffusers_optim.optim.spec import OptimizerSpec

ADAM_NAMES = {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay"}
NO_EPS_NAMES = {"lr": "lr", "betas": "betas", "weight_decay": "weight_decay"}
DIFFUSERS_ADAMW = {"lr": 1e-4, "betas": (0.95, 0.999), "eps": 1e-8, "weight_decay": 1e-6}
DIFFUSERS_SOURCE = (
    "lr 1e-4, betas (0.95, 0.999), eps 1e-8, weight_decay 1e-6: diffusers train_unconditional.py defaults"
)
OPTIONAL = {"extra": "optimizers"}
# Lion paper (Chen et al. 2023): lr 3-10x smaller and weight decay 3-10x larger than AdamW's.
LION_DEFAULTS = {"lr": 3e-5, "betas": (0.9, 0.99), "weight_decay": 1e-5}


def d_times_lr(optimizer: torch.optim.Optimizer) -> float | None:
    """Prodigy / D-Adaptation step size: the estimated distance d times the lr multiplier."""
    group = optimizer.param_groups[0]
    return float(group["d"]) * float(group["lr"]) if "d" in group else None


def heavyball_psgd_kron(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """heavyball's PSGDKron; eager on CPU, where inductor fails on its compiled kernels (torch 2.13)."""
    import heavyball
    import heavyball.utils

    if not torch.cuda.is_available():
        heavyball.utils.compile_mode = None
    return heavyball.PSGDKron(params, **kwargs)


DIFFUSERS_DECOUPLED = {**DIFFUSERS_ADAMW, "decoupled_weight_decay": True}
SCHEDULE_FREE_SOURCE = "schedulefree README: no decay schedule (our default is constant for it); warmup_steps 0: our LR " \
    "schedule warms up"

BUILTIN_SPECS = [
    OptimizerSpec(
        name="sgd",
        first_moment_state="momentum_buffer",
        factory=torch.optim.SGD,
        description="SGD with (optionally Nesterov) momentum",
        defaults={"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False},
        defaults_source="lr 1e-2: SGD needs ~100x Adam's lr (no per-parameter normalization); momentum 0.9: "
        "the classic value (Sutskever et al. 2013); nesterov False, weight_decay 0: torch defaults",
        hparam_names={"lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay"},
        fast_step="fused",
    ),
    OptimizerSpec(
        name="adam",
        first_moment_state="exp_avg",
        factory=torch.optim.Adam,
        description="Adam (L2 weight decay coupled to the gradient)",
        defaults={**DIFFUSERS_ADAMW, "weight_decay": 0.0},
        defaults_source=DIFFUSERS_SOURCE.replace(
            "weight_decay 1e-6", "weight_decay 0 (torch: Adam's decay is L2)"
        ),
        hparam_names=ADAM_NAMES,
        fast_step="fused",
    ),
    OptimizerSpec(
        name="adamw",
        first_moment_state="exp_avg",
        factory=torch.optim.AdamW,
        description="AdamW, decoupled weight decay: the diffusers baseline",
        defaults=DIFFUSERS_ADAMW,
        defaults_source=DIFFUSERS_SOURCE,
        hparam_names=ADAM_NAMES,
        aliases=("adamw_torch",),
        fast_step="fused",
    ),
    OptimizerSpec(
        name="rmsprop",
        first_moment_state="momentum_buffer",
        factory=torch.optim.RMSprop,
        description="RMSprop (Adam without the first moment, plus optional momentum)",
        defaults={"lr": 1e-4, "momentum": 0.0, "eps": 1e-8, "weight_decay": 0.0, "alpha": 0.99},
        defaults_source="lr 1e-4: the Adam scale (same per-parameter normalization); alpha 0.99, momentum 0, "
        "eps 1e-8, weight_decay 0: torch defaults",
        hparam_names={"lr": "lr", "momentum": "momentum", "eps": "eps", "weight_decay": "weight_decay"},
        fast_step="foreach",
    ),
    OptimizerSpec(
        name="adagrad",
        factory=torch.optim.Adagrad,
        description="Adagrad (accumulated squared gradients, a decaying step size)",
        defaults={"lr": 1e-2, "eps": 1e-10, "weight_decay": 0.0},
        defaults_source="lr 1e-2, eps 1e-10, weight_decay 0: torch defaults",
        hparam_names={"lr": "lr", "eps": "eps", "weight_decay": "weight_decay"},
        fast_step="fused",
    ),
    OptimizerSpec(
        name="adafactor",
        first_moment_state="exp_avg",
        factory="transformers.optimization.Adafactor",
        description="Adafactor with factored second moments and an external lr (our LR schedule applies)",
        defaults={
            "lr": 1e-3,
            "weight_decay": 0.0,
            "relative_step": False,
            "scale_parameter": False,
            "warmup_init": False,
        },
        defaults_source="lr 1e-3 with relative_step/scale_parameter/warmup_init False: transformers' "
        "Adafactor docstring for use with an external schedule; weight_decay 0: its default",
        hparam_names={"lr": "lr", "weight_decay": "weight_decay"},
    ),
    OptimizerSpec(
        name="lion",
        first_moment_state="exp_avg",
        factory="lion_pytorch.Lion",
        package="lion-pytorch",
        **OPTIONAL,
        description="Lion (sign of an interpolated momentum; one state buffer), lion-pytorch",
        defaults=LION_DEFAULTS,
        defaults_source="Lion paper (Chen et al. 2023): lr 3-10x smaller and weight decay 3-10x larger than "
        "AdamW's, so lr 3e-5 (AdamW 1e-4 / 3) and weight_decay 1e-5 (AdamW 1e-6 x 10); betas (0.9, 0.99): paper",
        hparam_names=NO_EPS_NAMES,
    ),
    OptimizerSpec(
        name="lion_8bit",
        factory="bitsandbytes.optim.Lion8bit",
        package="bitsandbytes",
        **OPTIONAL,
        description="Lion with 8-bit blockwise-quantized momentum, bitsandbytes",
        defaults=LION_DEFAULTS,
        defaults_source="as 'lion' (Lion paper advice relative to AdamW)",
        hparam_names=NO_EPS_NAMES,
    ),
    OptimizerSpec(
        name="lion_32bit",
        first_moment_state="state1",
        factory="bitsandbytes.optim.Lion32bit",
        package="bitsandbytes",
        **OPTIONAL,
        description="Lion, bitsandbytes' 32-bit implementation (transformers' lion_32bit)",
        defaults=LION_DEFAULTS,
        defaults_source="as 'lion' (Lion paper advice relative to AdamW)",
        hparam_names=NO_EPS_NAMES,
    ),
    OptimizerSpec(
        name="prodigy",
        first_moment_state="exp_avg",
        factory="prodigyopt.Prodigy",
        package="prodigyopt",
        **OPTIONAL,
        description="Prodigy: Adam that estimates its own step size d; lr is a multiplier of d",
        defaults={
            "lr": 1.0,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.01,
            "safeguard_warmup": True,
            "use_bias_correction": True,
        },
        defaults_source="lr 1.0: Prodigy README ('lr=1. for all networks'); safeguard_warmup, "
        "use_bias_correction and weight_decay 0.01: its README's advice for diffusion models; betas, eps: defaults",
        hparam_names=ADAM_NAMES,
        lr_is_multiplier=True,
        effective_lr_fn=d_times_lr,
    ),
    OptimizerSpec(
        name="dadapt_adam",
        first_moment_state="exp_avg",
        factory="pytorch_optimizer.DAdaptAdam",
        package="pytorch-optimizer",
        **OPTIONAL,
        description="D-Adaptation Adam: estimates its own step size d; lr is a multiplier of d",
        defaults={"lr": 1.0, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
        defaults_source="lr 1.0, betas, eps, weight_decay 0: D-Adaptation paper/package defaults",
        hparam_names=ADAM_NAMES,
        lr_is_multiplier=True,
        effective_lr_fn=d_times_lr,
    ),
    OptimizerSpec(
        name="adamw_schedulefree",
        factory="schedulefree.AdamWScheduleFree",
        package="schedulefree",
        **OPTIONAL,
        description="Schedule-free AdamW: iterate averaging instead of an lr decay; train()/eval() modes",
        defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-6, "warmup_steps": 0},
        defaults_source="lr 1e-3: schedulefree README (1-10x the scheduled AdamW lr, here 10x diffusers' 1e-4); "
        "betas, eps: package defaults; weight_decay 1e-6: diffusers; " + SCHEDULE_FREE_SOURCE,
        hparam_names=ADAM_NAMES,
        aliases=("schedule_free_adamw",),
        needs_train_eval=True,
        schedule_free=True,
    ),
    OptimizerSpec(
        name="nadam",
        factory=torch.optim.NAdam,
        description="NAdam (Adam with Nesterov momentum), decoupled weight decay as in AdamW",
        defaults=DIFFUSERS_DECOUPLED,
        defaults_source=DIFFUSERS_SOURCE + "; decoupled_weight_decay: AdamW-style decay, as the baseline; "
        "momentum_decay 4e-3: torch's (Dozat 2016)",
        hparam_names=ADAM_NAMES,
        fast_step="foreach",
    ),
    OptimizerSpec(
        name="radam",
        factory=torch.optim.RAdam,
        description="RAdam (Adam with a rectified variance warmup), decoupled weight decay as in AdamW",
        defaults=DIFFUSERS_DECOUPLED,
        defaults_source=DIFFUSERS_SOURCE + "; decoupled_weight_decay: AdamW-style decay, as the baseline",
        hparam_names=ADAM_NAMES,
        fast_step="foreach",
    ),
    OptimizerSpec(
        name="stable_adamw",
        factory="optimi.StableAdamW",
        package="torch-optimi",
        **OPTIONAL,
        description="StableAdamW (AdamW with AdaFactor-style update clipping), torch-optimi",
        defaults={"lr": 1e-4, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 1e-6},
        defaults_source="lr 1e-4, weight_decay 1e-6: diffusers' AdamW; betas (0.9, 0.99), eps 1e-6: torch-optimi's "
        "defaults (Wortsman et al. 2023)",
        hparam_names=ADAM_NAMES,
    ),
    OptimizerSpec(
        name="prodigy_plus_schedulefree",
        factory="prodigyplus.ProdigyPlusScheduleFree",
        package="prodigy-plus-schedule-free",
        **OPTIONAL,
        description="Prodigy + schedule-free (factored second moments, StableAdamW clipping); lr is a multiplier",
        defaults={"lr": 1.0, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0},
        defaults_source="lr 1.0, betas (0.9, 0.99), eps 1e-8, weight_decay 0: the package's defaults; its README: "
        "a constant lr (our default for schedule-free entries)",
        hparam_names=ADAM_NAMES,
        aliases=("prodigy_schedulefree",),
        lr_is_multiplier=True,
        effective_lr_fn=d_times_lr,
        needs_train_eval=True,
        schedule_free=True,
    ),
    OptimizerSpec(
        name="sgd_schedulefree",
        factory="schedulefree.SGDScheduleFree",
        package="schedulefree",
        **OPTIONAL,
        description="Schedule-free SGD with momentum: iterate averaging instead of an lr decay",
        defaults={"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "warmup_steps": 0},
        defaults_source="lr 0.1: schedulefree README (10-50x classical SGD's, here 10x our sgd's 1e-2); momentum 0.9: "
        "its default; " + SCHEDULE_FREE_SOURCE,
        hparam_names={"lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay"},
        needs_train_eval=True,
        schedule_free=True,
    ),
    OptimizerSpec(
        name="radam_schedulefree",
        factory="schedulefree.RAdamScheduleFree",
        package="schedulefree",
        **OPTIONAL,
        description="Schedule-free RAdam: needs no warmup, iterate averaging instead of an lr decay",
        defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-6},
        defaults_source="lr 1e-3: as adamw_schedulefree (schedulefree README: 1-10x the scheduled AdamW lr); betas, "
        "eps: package defaults; weight_decay 1e-6: diffusers",
        hparam_names=ADAM_NAMES,
        needs_train_eval=True,
        schedule_free=True,
    ),
    OptimizerSpec(
        name="psgd_kron",
        factory=heavyball_psgd_kron,
        package="heavyball",
        import_name="heavyball",
        **OPTIONAL,
        description="PSGD Kron (Kronecker-factored preconditioner fitted to the gradient noise), heavyball",
        defaults={"lr": 3e-5, "betas": (0.9, 0.999), "weight_decay": 1e-6},
        defaults_source="lr 3e-5: kron-torch README (about 1/3 of Adam's lr; diffusers' 1e-4 / 3); betas: heavyball's "
        "defaults; weight_decay 1e-6: diffusers",
        hparam_names=NO_EPS_NAMES,
        exact_resume=False,  # heavyball leaves its preconditioner-update generator (precond_rng) out of state_dict
    ),
    OptimizerSpec(
        name="adamw_ao_8bit",
        factory="torchao.optim.AdamW8bit",
        package="torchao",
        extra="gpu",
        description="AdamW with 8-bit block-quantized states, torchao (CUDA kernels)",
        defaults=DIFFUSERS_ADAMW,
        defaults_source=DIFFUSERS_SOURCE,
        hparam_names=ADAM_NAMES,
        needs_cuda=True,
    ),
    OptimizerSpec(
        name="adamw_ao_4bit",
        factory="torchao.optim.AdamW4bit",
        package="torchao",
        extra="gpu",
        description="AdamW with 4-bit block-quantized states, torchao (CUDA kernels)",
        defaults=DIFFUSERS_ADAMW,
        defaults_source=DIFFUSERS_SOURCE,
        hparam_names=ADAM_NAMES,
        needs_cuda=True,
    ),
    OptimizerSpec(
        name="adamw_8bit",
        factory="bitsandbytes.optim.AdamW8bit",
        package="bitsandbytes",
        **OPTIONAL,
        description="AdamW with 8-bit blockwise-quantized states, bitsandbytes (tensors < 4096 stay 32-bit)",
        defaults=DIFFUSERS_ADAMW,
        defaults_source=DIFFUSERS_SOURCE,
        hparam_names=ADAM_NAMES,
        aliases=("adamw_bnb_8bit",),
    ),
    OptimizerSpec(
        name="muon",
        factory="pytorch_optimizer.Muon",
        package="pytorch-optimizer",
        **OPTIONAL,
        description="Muon (orthogonalized momentum) for hidden matrices and conv kernels; AdamW for the rest",
        defaults={
            "lr": 0.02,
            "momentum": 0.95,
            "weight_decay": 0.0,
            "betas": (0.9, 0.95),
            "eps": 1e-10,
            "adamw_lr": 3e-4,
            "nesterov": True,
        },
        defaults_source="lr 0.02, momentum 0.95, nesterov: Keller Jordan's Muon; AdamW part (biases, norms, "
        "conv_in/conv_out, embeddings): adamw_lr 3e-4, betas (0.9, 0.95), eps 1e-10: pytorch_optimizer defaults",
        hparam_names={
            "lr": "lr",
            "momentum": "momentum",
            "weight_decay": "weight_decay",
            "betas": "adamw_betas",
            "eps": "adamw_eps",
        },
        param_routing=muon_routing,
    ),
    OptimizerSpec(
        name="soap",
        factory="pytorch_optimizer.SOAP",
        package="pytorch-optimizer",
        **OPTIONAL,
        description="SOAP: Adam in the eigenbasis of Shampoo's preconditioner",
        defaults={
            "lr": 3e-4,
            "betas": (0.95, 0.95),
            "eps": 1e-8,
            "weight_decay": 1e-6,
            "precondition_frequency": 10,
        },
        defaults_source="lr 3e-4: Adam scale (SOAP runs Adam in a rotated basis); betas (0.95, 0.95), "
        "precondition_frequency 10: SOAP paper (Vyas et al. 2024); eps 1e-8, weight_decay 1e-6: diffusers",
        hparam_names=ADAM_NAMES,
    ),
    OptimizerSpec(
        name="came",
        first_moment_state="exp_avg",
        factory="pytorch_optimizer.CAME",
        package="pytorch-optimizer",
        **OPTIONAL,
        description="CAME: confidence-guided, factored (Adafactor-like memory) adaptive optimizer",
        defaults={"lr": 2e-4, "betas": (0.9, 0.999, 0.9999), "weight_decay": 0.0},
        defaults_source="lr 2e-4, betas (0.9, 0.999, 0.9999), weight_decay 0: CAME paper (Luo et al. 2023)",
        hparam_names=NO_EPS_NAMES,
    ),
    OptimizerSpec(
        name="adopt",
        first_moment_state="exp_avg",
        factory="pytorch_optimizer.ADOPT",
        package="pytorch-optimizer",
        **OPTIONAL,
        description="ADOPT: Adam with the second moment decorrelated from the current gradient",
        defaults={"lr": 1e-4, "betas": (0.9, 0.9999), "eps": 1e-6, "weight_decay": 0.0},
        defaults_source="lr 1e-4: diffusers' Adam lr; betas (0.9, 0.9999), eps 1e-6: ADOPT paper (Taniguchi et al. 2024)",
        hparam_names=ADAM_NAMES,
    ),
    OptimizerSpec(
        name="ademamix",
        first_moment_state="exp_avg",
        factory="pytorch_optimizer.AdEMAMix",
        package="pytorch-optimizer",
        **OPTIONAL,
        description="AdEMAMix: Adam plus a slow EMA of gradients (beta3) mixed in with weight alpha",
        defaults={"lr": 1e-4, "betas": (0.9, 0.999, 0.9999), "eps": 1e-8, "weight_decay": 0.0, "alpha": 5.0},
        defaults_source="lr 1e-4: diffusers' Adam lr; betas (0.9, 0.999, 0.9999), alpha 5: AdEMAMix paper "
        "(Pagliardini et al. 2024)",
        hparam_names=ADAM_NAMES,
    ),
]
