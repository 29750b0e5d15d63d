"""4-rank MoE case: TP=2 x EP=2 (ETP=1, SP) from the same EP=1 checkpoint as moe_worker."""
from tests.distributed.workers.moe_worker import check


def case_qwen3_moe_tp2_ep2():
    check("qwen3_moe", tensor_model_parallel_size=2, sequence_parallel=True,
          expert_model_parallel_size=2, expert_tensor_parallel_size=1)


def case_qwen2_moe_tp2_ep2():
    check("qwen2_moe", tensor_model_parallel_size=2, sequence_parallel=True,
          expert_model_parallel_size=2, expert_tensor_parallel_size=1)
