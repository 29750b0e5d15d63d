"""Load model weights from a converted or training checkpoint into built model chunks."""
from __future__ import annotations

from pathlib import Path

from mcore_align.checkpoint.layout import check_complete, resolve_checkpoint_dir


def load_model_weights(chunks, ckpt_dir: str | Path, prefix: str = "") -> Path:
    """Fill this rank's model chunks (any TP/PP/VPP layout) from ``ckpt_dir``.

    ``ckpt_dir`` is a converted checkpoint, a training checkpoint (model tensors keyed
    like ``model.sharded_state_dict()``; optimizer and other entries are ignored) or a
    training save directory (its latest iteration). Collective over all ranks.
    Every model tensor must be in the checkpoint (megatron raises naming the missing
    keys). ``prefix``: the model's tensors are stored under ``<prefix><key>`` (a model trained
    beside the policy, e.g. PPO's critic, ``critic.``). Returns the resolved checkpoint directory.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = check_complete(resolve_checkpoint_dir(ckpt_dir))  # incomplete: CheckpointError naming the file
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

    request = {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    if prefix:
        for sd in request.values():
            replace_prefix_for_sharding(sd, "", prefix)
    loaded = dist_checkpointing.load(request, str(path), strict=StrictHandling.RAISE_UNEXPECTED)
    for i, c in enumerate(chunks):
        # Tensors were read into the parameters in place; load_state_dict also restores
        # the _extra_state entries and checks that nothing is left out.
        c.load_state_dict(loaded[f"chunk{i}"], strict=True)
    return path
