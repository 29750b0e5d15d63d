"""Checks of a RunConfig against the model it trains (the ModelSpec read from the checkpoint).

These need the checkpoint's ``model_spec.json``, so they cannot run in the dataclasses'
``__post_init__``; the trainer calls :func:`check_layout` once the spec is read and before
anything is built, so a wrong layout is a sentence naming the keys, not megatron's bare
assertion from inside ``TransformerConfig`` or ``get_num_layers_to_build``.
"""
from __future__ import annotations

import logging
import typing

if typing.TYPE_CHECKING:  # imports only for annotations: no import cycle with mcore_align.config
    from mcore_align.config import RunConfig
    from mcore_align.models.spec import ModelSpec

log = logging.getLogger(__name__)


def check_layout(cfg: "RunConfig", spec: "ModelSpec", *, rank: int = 0) -> None:
    """ValueError when the parallel layout cannot split this model; a warning for
    ``data.max_length`` beyond the model's ``max_position_embeddings``.

    Megatron's rule (uniform split, no uneven first/last stage; transformer_config.py
    ``__post_init__``): ``num_layers % PP == 0`` and, with virtual pipeline stages,
    ``(num_layers // PP) % VPP == 0``. Example: 8 layers, PP=2, VPP=2 -> 4 layers per
    rank, 2 per model chunk; 8 layers, PP=2, VPP=3 is refused. Warnings are logged on
    ``rank`` 0 only (every rank calls this; errors are raised everywhere).
    """
    par = cfg.parallel
    where = f"model {cfg.model.load}"
    n, pp, vpp, tp = spec.num_layers, par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size, \
        par.tensor_model_parallel_size
    if pp > n:
        raise ValueError(f"parallel.pipeline_model_parallel_size={pp} is larger than the {n} transformer layers "
                         f"of {where}: every pipeline stage needs at least one layer")
    if n % pp:
        raise ValueError(f"the {n} transformer layers of {where} do not split evenly over "
                         f"parallel.pipeline_model_parallel_size={pp} (megatron needs num_layers % PP == 0)")
    if vpp is not None and (n // pp) % vpp:
        raise ValueError(f"{n // pp} layers per pipeline rank ({n} layers / PP={pp}) of {where} do not split into "
                         f"parallel.virtual_pipeline_model_parallel_size={vpp} model chunks "
                         f"(megatron needs (num_layers // PP) % VPP == 0)")
    for what, size in (("num_attention_heads", spec.num_attention_heads),
                       ("num_key_value_heads", spec.num_query_groups),
                       ("vocab_size", spec.vocab_size), ("intermediate_size", spec.ffn_hidden_size)):
        if size % tp:
            raise ValueError(f"{what}={size} of {where} is not divisible by "
                             f"parallel.tensor_model_parallel_size={tp}: megatron shards it evenly over TP ranks")
    if cfg.data.max_length > spec.max_position_embeddings and rank == 0:
        log.warning("data.max_length=%d is above the model's max_position_embeddings=%d (%s): sequences longer "
                    "than the model was trained for get rotary positions it never saw",
                    cfg.data.max_length, spec.max_position_embeddings, where)
