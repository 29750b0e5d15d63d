"""Generation engines for online RLHF rollouts (one interface, one file per backend)."""
from mcore_align.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from mcore_align.rollout.registry import BACKENDS, available_backends, build_rollout_engine

__all__ = ["BACKENDS", "RolloutBatch", "RolloutEngine", "SamplingParams", "available_backends",
           "build_rollout_engine"]
