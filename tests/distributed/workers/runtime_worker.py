"""The CPU execution mode runs megatron-core's own training stack on 2 gloo ranks.

Each case: GPTModel (local spec) -> megatron DDP -> get_megatron_optimizer with a
small clip_grad (so clipping really scales the gradients) -> 3 steps of the
no-pipelining (TP=2) or 1F1B (PP=2) schedule on a fixed batch. The loss must fall
and every rank must report the same grad norm.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mcore_align.models.families import spec_from_hf_config
from mcore_align.parallel import ParallelConfig, initialize

HF_CONFIG = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=128, hidden_size=64,
                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=256)


def _train_three_steps(parallel: ParallelConfig, clip: float):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from mcore_align.models.provider import build_model

    rt = initialize(parallel, device="cpu", seed=3)
    spec = spec_from_hf_config(HF_CONFIG)
    chunks = build_model(spec, rt)
    model = DistributedDataParallel(config=chunks[0].config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                    module=chunks[0], pg_collection=rt.pgs)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=clip), [model],
                                 use_gloo_process_groups=False, pg_collection=rt.pgs)
    config = chunks[0].config
    config.finalize_model_grads_func = lambda m, num_tokens=None, **k: finalize_model_grads(m, None, **k)
    torch.manual_seed(0)  # same batch on every rank
    tokens = torch.randint(0, 128, (2, 32))
    labels = torch.roll(tokens, -1, dims=1)
    n_tok = labels.numel()

    def step(data_iterator, m):
        out = m(tokens, torch.arange(32).expand(2, 32), attention_mask=None)

        def loss_fn(logits):
            loss = vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(), labels.t().contiguous())
            return loss.sum() / n_tok, torch.tensor(1, dtype=torch.int), {"loss": loss.sum().detach() / n_tok}

        return out, loss_fn

    losses, norms = [], []
    fb = get_forward_backward_func()
    for _ in range(3):
        model.zero_grad_buffer()
        opt.zero_grad()
        out = fb(forward_step_func=step, data_iterator=iter([None]), model=model, num_microbatches=1,
                 seq_length=32, micro_batch_size=2, forward_only=False)
        ok, grad_norm, _ = opt.step()
        assert ok
        norms.append(float(grad_norm))
        losses.append(float(out[0]["loss"]) if out else float("nan"))
    return rt, losses, norms


def _check(parallel: ParallelConfig) -> None:
    rt, losses, norms = _train_three_steps(parallel, clip=0.05)
    # Grad norms agree on every rank (they are reduced over TP and PP by megatron).
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, norms)
    for other in gathered:
        torch.testing.assert_close(torch.tensor(other), torch.tensor(norms), rtol=1e-6, atol=0)
    assert all(n > 0.05 for n in norms), f"clip_grad=0.05 should be active, norms {norms}"
    # Losses live on the last pipeline stage.
    last = [None] * dist.get_world_size()
    dist.all_gather_object(last, losses)
    losses = [v for v in last if v[0] == v[0]][0]
    assert losses[2] < losses[1] < losses[0], losses


def case_tp2_trains_with_clipping():
    _check(ParallelConfig(tensor_model_parallel_size=2))


def case_pp2_trains_with_clipping():
    _check(ParallelConfig(pipeline_model_parallel_size=2))


def case_clipping_changes_the_update():
    """The clipped run must differ from an unclipped one (the clip really scaled the grads)."""
    from mcore_align.models import provider  # noqa: F401

    _, clipped, _ = _train_three_steps(ParallelConfig(tensor_model_parallel_size=2), clip=0.05)
    _, free, _ = _train_three_steps(ParallelConfig(tensor_model_parallel_size=2), clip=0.0)
    assert clipped[0] == free[0] and clipped[1] != free[1], (clipped, free)


def case_sgd_step_is_clipped_by_the_global_norm():
    """Megatron's clipped update, checked with plain SGD at TP=2: the reported grad norm equals
    the global norm computed here (TP-split gradients summed over ranks, replicated ones once),
    and every parameter moves by exactly -lr * min(1, clip / norm) * grad."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from mcore_align.models.provider import build_model

    lr, clip = 0.1, 0.05
    rt = initialize(ParallelConfig(tensor_model_parallel_size=2), device="cpu", seed=3)
    (chunk,) = build_model(spec_from_hf_config(HF_CONFIG), rt)
    model = DistributedDataParallel(config=chunk.config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                    module=chunk, pg_collection=rt.pgs)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="sgd", lr=lr, sgd_momentum=0.0, weight_decay=0.0,
                                                 clip_grad=clip), [model], use_gloo_process_groups=False,
                                 pg_collection=rt.pgs)
    chunk.config.finalize_model_grads_func = lambda m, num_tokens=None, **k: finalize_model_grads(m, None, **k)
    torch.manual_seed(0)
    tokens = torch.randint(0, 128, (2, 32))
    labels = torch.roll(tokens, -1, dims=1)

    def step(data_iterator, m):
        out = m(tokens, torch.arange(32).expand(2, 32), attention_mask=None)

        def loss_fn(logits):
            loss = vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(), labels.t().contiguous())
            return loss.sum() / labels.numel(), torch.tensor(1, dtype=torch.int), {}

        return out, loss_fn

    model.zero_grad_buffer()
    opt.zero_grad()
    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=model, num_microbatches=1,
                                seq_length=32, micro_batch_size=2, forward_only=False)
    params = dict(chunk.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    grads = {n: p.main_grad.detach().clone() for n, p in params.items()}
    split = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for n, p in params.items():
        sq = grads[n].double().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False):
            split += sq
        else:
            replicated += sq  # identical on both TP ranks: counted once
    dist.all_reduce(split, group=rt.pgs.tp)
    norm = float((split + replicated).sqrt())
    ok, grad_norm, _ = opt.step()
    assert ok and abs(grad_norm - norm) <= 1e-5 * norm, (grad_norm, norm)
    factor = min(1.0, clip / (norm + 1e-6))
    assert factor < 0.5, f"the clip should be active (norm {norm})"
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), before[n] - lr * factor * grads[n], rtol=1e-5, atol=1e-8,
                                   msg=lambda m, n=n: f"{n}: {m}")
