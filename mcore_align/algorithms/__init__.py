"""Training objectives: one module per objective, registered by name.

    from mcore_align.algorithms import build_objective
    objective = build_objective("dpo", beta=0.1, loss_type=["sigmoid", "sft"])
    loss, metrics = objective(stats, counts)

See base.py for the protocol and the normalisation contract, docs/algorithms.md for the
table of objectives, hyperparameters and papers.
"""
from mcore_align.algorithms.base import (
    GlobalCounts,
    Objective,
    SequenceStats,
    available_objectives,
    build_objective,
    objective_config_cls,
    register_objective,
)

# Importing the modules registers their objectives.
from mcore_align.algorithms.dpo import DPO, DPO_LOSS_TYPES, DPOConfig  # noqa: E402
from mcore_align.algorithms.kto import KTO, KTOConfig, check_weight_ratio, kl_partial_sums, kl_reference_point  # noqa: E402
from mcore_align.algorithms.cpo import CPO, CPOConfig  # noqa: E402
from mcore_align.algorithms.orpo import ORPO, ORPOConfig  # noqa: E402
from mcore_align.algorithms.simpo import SimPO, SimPOConfig  # noqa: E402
from mcore_align.algorithms.rm import RM, RMConfig  # noqa: E402
from mcore_align.algorithms.sft import SFT, SFTConfig  # noqa: E402
from mcore_align.algorithms.grpo import GRPO, RLOO, GRPOConfig  # noqa: E402
from mcore_align.algorithms.ppo.objective import PPO  # noqa: E402

__all__ = [
    "CPO", "CPOConfig", "GRPO", "GRPOConfig", "RLOO", "DPO", "DPOConfig", "DPO_LOSS_TYPES", "GlobalCounts", "KTO", "KTOConfig",
    "ORPO", "ORPOConfig", "Objective", "RM", "RMConfig", "SFT", "SFTConfig", "SequenceStats",
    "SimPO", "SimPOConfig", "available_objectives", "build_objective", "check_weight_ratio",
    "kl_partial_sums", "kl_reference_point", "objective_config_cls", "register_objective",
]
