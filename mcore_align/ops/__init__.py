"""Kernels over model outputs: vocab-parallel log-probs and packed segment reductions."""
from mcore_align.ops.logprobs import VocabParallelLogprobs, fused_linear_logprobs, vocab_parallel_logprobs
from mcore_align.ops.segments import allreduce_segment_sums, segment_of_token, segment_sums

__all__ = [
    "VocabParallelLogprobs",
    "allreduce_segment_sums",
    "fused_linear_logprobs",
    "segment_of_token",
    "segment_sums",
    "vocab_parallel_logprobs",
]
