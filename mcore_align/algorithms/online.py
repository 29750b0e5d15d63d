"""What every online objective (``data_kind="prompt"``: GRPO, RLOO, PPO) configures the same
way: sampling, rewards and the rollout engine. The rollout phase (trainer/rollout.py) reads
these fields from ``objective.cfg``; each objective's Config extends this one."""
from __future__ import annotations

from dataclasses import dataclass

from mcore_align.algorithms.base import check_choice, check_positive

ROLLOUT_BACKENDS = ("megatron", "vllm", "megatron_dynamic")


@dataclass(kw_only=True)
class OnlineConfig:
    reward_funcs: str | list[str] | None = None
    """``module:function`` or ``path/to/file.py:function`` (several: a list or comma-separated),
    called as ``fn(prompts=..., completions=..., completion_ids=...) -> list of B numbers``."""
    reward_weights: list[float] | None = None
    """One weight per reward function (default 1 each); the score is the weighted sum."""
    reward_model: str | None = None
    """A reward-model checkpoint of this project (rlhf_type=rm; Megatron or a save dir); its
    value at the last response token is added to the reward functions' score."""
    num_generations: int = 1
    """Responses sampled per prompt."""
    response_length: int = 256
    """Maximum new tokens per response (TRL's max_completion_length / response_length)."""
    temperature: float = 1.0
    """Sampling temperature; the training log-probs are taken at the same temperature."""
    top_k: int = 0
    """0: off."""
    top_p: float = 1.0
    """1.0: off."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response without a stop token (counted either way)."""
    local_rollout_forward_batch_size: int = 64
    """Prompts generated (and scored) together; the KV cache holds this many sequences."""
    rollout_backend: str = "megatron"
    """Generation engine (mcore_align.rollout); "megatron": the policy's own TP/PP chunks."""
    offload_ref_rm: bool = False
    """Keep the reference and the reward model in host memory between rollouts (moved to the
    GPU for their passes only); see trainer/reference.py for the cost."""
    num_sample_generations: int = 10
    """Write sample completions (prompt, completion, score) to ``save/samples.jsonl`` and the
    console this many times over the run (0: never)."""

    def __post_init__(self) -> None:
        if not self.reward_funcs and not self.reward_model:
            raise ValueError("reward_funcs or reward_model is required (e.g. reward_funcs=my_module:my_reward, "
                             "reward_model=/ckpt/rm)")
        for name in ("response_length", "local_rollout_forward_batch_size", "num_generations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_positive(self.temperature, "temperature")
        check_choice(self.rollout_backend, "rollout_backend", list(ROLLOUT_BACKENDS))
        if self.num_sample_generations < 0:
            raise ValueError(f"num_sample_generations must be >= 0, got {self.num_sample_generations}")
        if not (0.0 < self.top_p <= 1.0) or self.top_k < 0:
            raise ValueError(f"top_p must be in (0, 1] and top_k >= 0, got top_p={self.top_p}, top_k={self.top_k}")
