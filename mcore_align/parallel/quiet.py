"""Keep the console to our progress bar: silence library chatter users cannot act on."""
import os
import warnings


def quiet_library_warnings() -> None:
    """megatron-core warns at import that Apex / Transformer Engine are missing (expected on
    CPU and on clusters without TE) and torch's checkpoint code warns about deprecated
    internals megatron uses. Set MCORE_ALIGN_VERBOSE=1 to see them."""
    if os.environ.get("MCORE_ALIGN_VERBOSE"):
        return
    for pattern in (".*Transformer Engine.*", ".*Apex is not installed.*", ".*apex.*", ".*TorchDistLoadShardedStrategy.*",
                    ".*torch.distributed._shard.*", ".*deprecated.*", ".*Falling back.*",
                    ".*CUDA_DEVICE_MAX_CONNECTIONS.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
