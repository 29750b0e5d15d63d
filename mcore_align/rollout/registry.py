"""Rollout backends by name. A backend that is selected but cannot run here is refused with
the reason; another backend is never substituted silently."""
from __future__ import annotations

from typing import Callable

from mcore_align.rollout.base import RolloutEngine


def _megatron(**kwargs) -> RolloutEngine:
    from mcore_align.rollout.megatron_static import MegatronStaticEngine

    return MegatronStaticEngine(**kwargs)


def _unavailable(name: str, reason: str) -> Callable[..., RolloutEngine]:
    def build(**kwargs) -> RolloutEngine:
        raise RuntimeError(f"rollout backend {name!r} is not available: {reason}. "
                           f"Available backends: {available_backends()}")

    build.unavailable_reason = reason  # type: ignore[attr-defined]
    return build


BACKENDS: dict[str, Callable[..., RolloutEngine]] = {
    # megatron-core's static-batch generation on the policy's own TP/PP chunks.
    "megatron": _megatron,
    # Named so that selecting them gives a reason, not an "unknown backend" error.
    "vllm": _unavailable("vllm", "mcore_align has no vLLM rollout backend yet (it would need a weight "
                                 "sync from the Megatron policy to a vLLM engine)"),
    "megatron_dynamic": _unavailable("megatron_dynamic", "megatron-core's dynamic engine is GPU-only "
                                                         "(pinned memory, flash-attn >= 2.7.3, CUDA graphs)"),
}


def available_backends() -> list[str]:
    return sorted(n for n, b in BACKENDS.items() if not hasattr(b, "unavailable_reason"))


def build_rollout_engine(name: str, **kwargs) -> RolloutEngine:
    """The backend ``name`` built with ``kwargs`` (see each backend's class for its arguments)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown rollout backend {name!r}; known: {sorted(BACKENDS)} "
                         f"(available here: {available_backends()})")
    return BACKENDS[name](**kwargs)
