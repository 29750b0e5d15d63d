"""Keep the console to our progress bar: silence library chatter users cannot act on.

Each filter names the module that emits the message AND the message itself, so a new
warning (a FutureWarning from torch about our own call, a deprecation in transformers)
still reaches the user. Set MCORE_ALIGN_VERBOSE=1 (``make demo`` / the demo's
``--verbose``) to see everything.
"""
from __future__ import annotations

import logging
import os
import warnings

# (category, module regex, message regex). The module is the one warnings.warn attributes
# the warning to (the caller frame's __name__ at the warning's stacklevel).
KNOWN_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    # megatron-core at import/model build: Apex and Transformer Engine are optional (absent on
    # CPU and on clusters without them); megatron uses its torch fallbacks, which we test.
    (UserWarning, r"megatron\.core\.", r"Apex is not installed\. Falling back to Torch Norm"),
    (UserWarning, r"megatron\.core\.", r"Transformer Engine and Apex are not installed\. Falling back"),
    # TransformerConfig's own default for cuda_graph_scope trips its deprecation notice.
    (UserWarning, r"megatron\.core\.transformer\.transformer_config", r"full scope is deprecated"),
    # torch deprecations of internals megatron's dist_checkpointing uses (not our calls). In
    # the CPU execution mode the ShardedTensor call passes through cpu_mode's __torch_function__.
    (FutureWarning, r"megatron\.core\.dist_checkpointing\.", r"`load_state_dict` is deprecated"),
    (FutureWarning, r"(megatron\.core\.dist_checkpointing\.|mcore_align\.parallel\.cpu_mode)",
     r"Please use DTensor instead and we are deprecating ShardedTensor"),
)

# Only without CUDA (the CPU execution mode): a CUDA environment variable cannot matter there;
# on GPUs the advice is real and stays visible.
CPU_ONLY_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r"megatron\.core\.tensor_parallel\.layers", r".*set the environment variable CUDA_DEVICE_MAX_CONNECTIONS"),
)

# Loggers that report at INFO what megatron detected about itself (Megatron-FSDP, unused here).
QUIET_LOGGERS = ("megatron.core.distributed.fsdp",)


def quiet_library_warnings() -> None:
    """Install the KNOWN_NOISE filters and raise QUIET_LOGGERS to WARNING (unless MCORE_ALIGN_VERBOSE)."""
    if os.environ.get("MCORE_ALIGN_VERBOSE"):
        return
    import torch

    for category, module, message in KNOWN_NOISE + (() if torch.cuda.is_available() else CPU_ONLY_NOISE):
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
