"""Rollout backend: megatron-core's own static-batch generation on the policy's chunks.

The policy's TP/PP model chunks generate in place (no weight copy, no second engine):
``GPTInferenceWrapper`` runs the chunk with a ``StaticInferenceContext`` KV cache
(``[max_seq, batch, kv_groups/TP, head_dim]`` per layer, allocated on first use and freed
when the call returns), and ``TextGenerationController`` runs megatron's loop: prompts are
right-padded, prefilled up to the shortest prompt, then one token per step for the whole
batch (a longer prompt feeds its own next prompt token until it starts generating).

Where this departs from megatron's controller (one small subclass, ``_Controller``):

* several stop ids (megatron checks one ``tokenizer.eod``),
* the stop token is *counted* in the response (megatron drops it), so its log-prob is
  returned and PPO can learn to stop, as TRL does, and
* the temperature divides the logits in the wrapper (``_TemperedWrapper``) and megatron
  samples at temperature 1: the same distribution (megatron divides first, then filters
  top-k / top-p), but the returned log-probs are ``log_softmax(logits / temperature)``, the
  log-probs PPO's training forward computes (TRL's convention), not megatron's untempered
  ones. They are of the unfiltered distribution (top-k / top-p only restrict sampling).

Seeds: batch ``i`` of a call on data-parallel rank ``d`` samples from a generator seeded with
``hash((seed, d, i))``, so DP ranks never draw the same stream; every rank of a TP/PP group
uses the same seed and the same (gathered / broadcast) logits, so they sample the same tokens.

Not supported (refused with an error): virtual pipeline stages (megatron's wrapper takes one
chunk), context parallelism, sequence parallelism (megatron's static batching refuses it for
dense models), the value head, ``top_k > 1`` together with ``top_p < 1``.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager

import torch

from mcore_align.rollout.base import RolloutBatch, RolloutEngine, SamplingParams, validate_prompts


def _mix_seed(seed: int, dp_rank: int, batch_index: int) -> int:
    """A 63-bit seed from (seed, DP rank, batch index) (splitmix64 steps; deterministic)."""
    x = (seed * 0x9E3779B97F4A7C15 + dp_rank * 0xBF58476D1CE4E5B9 + batch_index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    return x & (2**63 - 1)


class _NoTextTokenizer:
    """What the controller needs of a tokenizer when we work in token ids: a pad id (``eod``,
    used only to right-pad prompts) and a ``detokenize`` (text is not used)."""

    def __init__(self, pad_id: int):
        self.eod = pad_id

    def detokenize(self, tokens, skip_special_tokens: bool = True) -> str:
        return ""


def _tempered_wrapper_class():
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper

    class _TemperedWrapper(GPTInferenceWrapper):
        temperature: float = 1.0

        def run_one_forward_step(self, inference_input, recv_buffer_seq_len=None):
            # logits [B, S, V] on the last stage (None elsewhere); the controller broadcasts them.
            logits = super().run_one_forward_step(inference_input, recv_buffer_seq_len)
            if logits is None or self.temperature == 1.0:
                return logits
            return logits / self.temperature

    return _TemperedWrapper


def _controller_class():
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    class _Controller(TextGenerationController):
        stop_ids: torch.Tensor  # [n_stop] int64

        def update_generation_status(self, updated_prompts_tokens, generation_started,
                                     current_context_end_position, is_generation_done_tensor,
                                     generated_sequence_lengths, termination_id=None):
            # updated_prompts_tokens [B, S]; the token just placed is at current_context_end_position.
            latest_B = updated_prompts_tokens[:, current_context_end_position]
            # Count this token for every response still open (the stop token included) ...
            generated_sequence_lengths += ~is_generation_done_tensor & generation_started
            # ... then close the ones that just produced a stop id.
            stopped_B = torch.isin(latest_B, self.stop_ids) & generation_started
            return is_generation_done_tensor | stopped_B, generated_sequence_lengths.int()

    return _Controller


@contextmanager
def _generation_mode(model):
    """Eval mode and logits out for the duration of generation; the caller's state after.

    A model built with the fused log-prob head returns hidden states (models/heads.py
    ``emit_hidden_states`` replaces the output layer's instance ``forward``); generation needs
    logits, so the class ``forward`` is used meanwhile.
    """
    was_training = model.training
    layer = getattr(model, "output_layer", None) if getattr(model, "post_process", False) else None
    patched = layer is not None and "forward" in vars(layer)
    saved = vars(layer)["forward"] if patched else None
    if patched:
        del layer.forward
    try:
        yield
    finally:
        if patched:
            layer.forward = saved
        model.train(was_training)


class MegatronStaticEngine(RolloutEngine):
    """Generation with megatron-core's static inference path on the policy's own chunks.

    Args:
        chunks: this rank's model chunks from ``models.provider.build_model`` (DDP-wrapped or
            not); exactly one (no virtual pipeline stages).
        runtime: the ``parallel.Runtime`` the chunks were built with.
        vocab_size: the model's vocabulary size (``ModelSpec.vocab_size``).
        pad_token_id: fills responses after their end.
        local_rollout_forward_batch_size: prompts generated together (one KV cache of this
            many rows); more prompts are generated in consecutive batches.
    """

    name = "megatron"

    def __init__(self, chunks, runtime, *, vocab_size: int, pad_token_id: int = 0,
                 local_rollout_forward_batch_size: int = 64):
        from megatron.core.utils import get_model_config, unwrap_model

        if len(chunks) != 1:
            raise ValueError(f"rollout backend 'megatron' needs one model chunk per rank, got {len(chunks)} "
                             "(virtual pipeline stages are not supported by megatron's inference wrapper)")
        if local_rollout_forward_batch_size < 1:
            raise ValueError(f"local_rollout_forward_batch_size must be >= 1, got {local_rollout_forward_batch_size}")
        self.model = unwrap_model(chunks[0])
        cfg = get_model_config(self.model)
        if runtime.parallel.context_parallel_size > 1:
            raise ValueError("rollout backend 'megatron' does not support context_parallel_size > 1")
        if cfg.sequence_parallel:
            raise ValueError("rollout backend 'megatron' does not support sequence_parallel=True "
                             "(megatron's static batching refuses it for dense models)")
        from mcore_align.models.heads import has_value_head

        if has_value_head([self.model]):
            raise ValueError("rollout backend 'megatron' needs an LM head, the model has a value head")
        self.cfg = cfg
        self.runtime = runtime
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id
        self.batch_size = local_rollout_forward_batch_size

    def _controller(self, max_batch: int, max_seq: int, stop_ids: tuple[int, ...], temperature: float):
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
            InferenceWrapperConfig,
        )

        wcfg = InferenceWrapperConfig(
            hidden_size=self.cfg.hidden_size,
            params_dtype=self.cfg.params_dtype,
            # -1: the whole batch goes through the pipeline at once (no micro-batching).
            inference_batch_times_seqlen_threshold=-1,
            padded_vocab_size=self.vocab_size,
            inference_max_requests=max_batch,
            inference_max_seq_length=max_seq,
            fp32_residual_connection=self.cfg.fp32_residual_connection,
        )
        context = StaticInferenceContext(max_batch, max_seq)  # the KV cache, freed with it
        wrapped = _tempered_wrapper_class()(self.model, wcfg, context, pg_collection=self.runtime.pgs)
        wrapped.temperature = temperature
        ctrl = _controller_class()(wrapped, _NoTextTokenizer(self.pad_token_id), pp_group=self.runtime.pgs.pp)
        ctrl.stop_ids = torch.tensor(stop_ids, dtype=torch.long, device=ctrl.sampling_rng.device)
        return ctrl

    def _megatron_params(self, params: SamplingParams):
        from megatron.core.inference.sampling_params import SamplingParams as MSamplingParams

        if params.greedy:
            top_k, top_p = 1, 0.0  # megatron: greedy iff top_k == 1
        else:
            if params.top_k > 1 and params.top_p < 1.0:
                raise ValueError("rollout backend 'megatron' applies either top_k or top_p, not both "
                                 f"(got top_k={params.top_k}, top_p={params.top_p})")
            top_k, top_p = params.top_k, (params.top_p if params.top_p < 1.0 else 0.0)  # megatron: 0.0 = off
        # Temperature 1 here: the wrapper has already divided the logits (see module docstring).
        return MSamplingParams(temperature=1.0, top_k=int(top_k), top_p=float(top_p),
                               return_log_probs=True, num_tokens_to_generate=params.response_length)

    @staticmethod
    def logprob_temperature(params: SamplingParams) -> float:
        """The temperature the returned log-probs are taken at (1 for greedy decoding)."""
        return 1.0 if params.greedy else params.temperature

    def generate(self, prompts, params: SamplingParams) -> RolloutBatch:
        from megatron.core.inference.inference_request import InferenceRequest

        prompts = validate_prompts(prompts, self.vocab_size)
        mparams = self._megatron_params(params)
        n, T = len(prompts), params.response_length
        ids_BT = torch.full((n, T), self.pad_token_id, dtype=torch.long)
        logp_BT = torch.zeros(n, T, dtype=torch.float32)
        lengths_B = torch.zeros(n, dtype=torch.long)
        eos_B = torch.zeros(n, dtype=torch.bool)
        t0 = time.perf_counter()
        with _generation_mode(self.model):
            for bi, start in enumerate(range(0, n, self.batch_size)):
                batch = prompts[start:start + self.batch_size]
                max_seq = max(len(p) for p in batch) + T
                ctrl = self._controller(len(batch), max_seq, params.stop_token_ids, self.logprob_temperature(params))
                ctrl.sampling_rng.manual_seed(_mix_seed(params.seed, self.runtime.dp_rank, bi))
                requests = OrderedDict(
                    (i, InferenceRequest(request_id=i, prompt="", prompt_tokens=list(p), sampling_params=mparams))
                    for i, p in enumerate(batch))
                done = ctrl.generate_all_output_tokens_static_batch(requests)
                for i, req in done.items():
                    row, k = start + i, int(req.generated_length)
                    # Copies made outside inference mode: usable as training inputs later.
                    toks = torch.tensor(req.generated_tokens.tolist(), dtype=torch.long)
                    ids_BT[row, :k] = toks
                    logp_BT[row, :k] = torch.tensor(req.generated_log_probs, dtype=torch.float32)[:k]
                    lengths_B[row] = k
                    eos_B[row] = k > 0 and bool(torch.isin(toks[k - 1], ctrl.stop_ids.cpu()))
                del ctrl  # drops the KV cache
        seconds = time.perf_counter() - t0
        return RolloutBatch(
            response_ids_BT=ids_BT, response_lengths_B=lengths_B, eos_B=eos_B, logprobs_BT=logp_BT,
            prompt_lengths_B=torch.tensor([len(p) for p in prompts], dtype=torch.long),
            pad_token_id=self.pad_token_id, logprob_temperature=self.logprob_temperature(params),
            stats={"tokens": int(lengths_B.sum()), "seconds": seconds},
        )
