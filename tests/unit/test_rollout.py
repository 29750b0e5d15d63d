"""Rollout interface pieces that need no process group: sampling params, the backend registry,
the CPU timing event."""
import pytest
import torch

from mcore_align.rollout import RolloutBatch, SamplingParams, available_backends, build_rollout_engine


def test_unavailable_backend_is_refused_not_swapped():
    with pytest.raises(RuntimeError,
                       match=r"rollout backend 'vllm' is not available: .*Available backends: \['megatron'\]"):
        build_rollout_engine("vllm", chunks=[], runtime=None, vocab_size=8)
    with pytest.raises(RuntimeError, match="megatron_dynamic.*GPU-only"):
        build_rollout_engine("megatron_dynamic")
    with pytest.raises(ValueError, match="unknown rollout backend 'sglang'"):
        build_rollout_engine("sglang")
    assert available_backends() == ["megatron"]


@pytest.mark.parametrize("kw, msg", [
    ({"temperature": -1.0}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"response_length": 0}, "response_length"), ({"stop_token_ids": (-2,)}, "stop_token_ids"),
])
def test_sampling_params_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_megatron_backend_refuses_several_chunks():
    with pytest.raises(ValueError, match="one model chunk per rank, got 2"):
        build_rollout_engine("megatron", chunks=[torch.nn.Linear(1, 1)] * 2, runtime=None, vocab_size=8)


def test_greedy_and_mask():
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy and not SamplingParams().greedy
    b = RolloutBatch(response_ids_BT=torch.tensor([[7, 9, 2, 0], [5, 5, 8, 6]]), response_lengths_B=torch.tensor([3, 4]),
                     eos_B=torch.tensor([True, False]), logprobs_BT=torch.zeros(2, 4), prompt_lengths_B=torch.tensor([2, 2]))
    assert b.response_mask_BT.tolist() == [[True, True, True, False], [True] * 4]


def test_cpu_timing_event_measures_milliseconds():
    import time

    from mcore_align.parallel.cpu_mode import _CpuTimingEvent

    a, b = _CpuTimingEvent(enable_timing=True), _CpuTimingEvent(enable_timing=True)
    a.record()
    time.sleep(0.02)
    b.record()
    b.synchronize()
    assert 15 < a.elapsed_time(b) < 1000
