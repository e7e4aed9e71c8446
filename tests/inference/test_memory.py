"""Batch and static-cache sizing from the budget and the GPU's free memory, on the Qwen3 shapes' configs."""

import pytest
import torch

from inference.decoding.memory import BatchPlan, check_context, kv_bytes_per_position, plan_batch, row_bytes
from inference.decoding.shapes import qwen3_config
from inference.errors import ConfigError

GB = 10**9
H200 = 143 * GB  # a card's capacity; the plans below get 90% of it minus the 2-bit 8B's ~3 GB of weights
AVAILABLE = int(0.9 * H200 - 3 * GB)
LAYERS = 3


def test_row_bytes_is_dominated_by_the_static_cache_at_reasoning_budgets():
    config = qwen3_config("qwen3-8b")
    per_position = kv_bytes_per_position(config, torch.bfloat16)
    for budget in (8192, 32768):
        total = row_bytes(config, 200, budget, torch.bfloat16, LAYERS)
        cache = per_position * (200 + budget)
        recorder = budget * LAYERS * 4096 * 2
        assert cache + recorder < total < 1.3 * (cache + recorder)
    assert row_bytes(config, 200, 32768, torch.bfloat16, LAYERS) > 3.5 * row_bytes(config, 200, 8192, torch.bfloat16,
                                                                                     LAYERS)


@pytest.mark.parametrize("shape", ["qwen3-0.6b", "qwen3-8b"])
def test_batch_shrinks_as_the_budget_grows_and_says_so(shape):
    config = qwen3_config(shape)
    batches = []
    for budget in (1024, 8192, 16384, 32768):
        plan = plan_batch(config, rows=64, requested=64, prompt_length=256, budget=budget, dtype=torch.bfloat16,
                          available=AVAILABLE, captured_layers=LAYERS)
        assert plan.batch * plan.row_bytes <= AVAILABLE
        assert plan.limit == ("memory" if plan.batch < 64 else "config")
        batches.append(plan.batch)
    assert batches == sorted(batches, reverse=True) and batches[-1] >= 1
    assert batches[-1] < 64  # at 32k the cache does not fit 64 rows on one card of either shape
    assert "memory" in plan.describe() and str(plan.batch) in plan.describe()


def test_eight_b_fits_64_rows_at_budget_8192_on_one_h200_but_not_at_32768():
    config = qwen3_config("qwen3-8b")
    plans = {budget: plan_batch(config, 64, 64, 256, budget, torch.bfloat16, AVAILABLE, LAYERS) for budget in (8192, 32768)}
    assert plans[8192].batch == 64 and plans[8192].limit == "config"
    assert plans[32768].batch < 32 and plans[32768].limit == "memory"


def test_fewer_rows_than_the_batch_and_the_cpu_keep_their_own_limits():
    config = qwen3_config("qwen3-0.6b")
    assert plan_batch(config, 5, 16, 100, 2048, torch.bfloat16, AVAILABLE).limit == "rows"
    cpu = plan_batch(config, 64, 16, 100, 32768, torch.float32, None)
    assert (cpu.batch, cpu.limit) == (16, "cpu")


def test_a_batch_that_cannot_fit_one_row_is_refused_in_one_line():
    config = qwen3_config("qwen3-8b")
    with pytest.raises(ConfigError, match=r"sampling.budget 32768: one row needs \d+\.\d\d GB .* only 1.00 GB are free"):
        plan_batch(config, 8, 8, 200, 32768, torch.bfloat16, 1 * GB, LAYERS)


def test_a_budget_past_the_context_is_refused():
    config = qwen3_config("qwen3-0.6b")
    check_context(config, 300, 32768)
    with pytest.raises(ConfigError, match=r"sampling.budget 40960 .* 41260 positions, past the 40960-position context"
                                          r" .* at most 40660"):
        check_context(config, 300, 40960, "qwen3-0.6b")


def test_plan_describe_names_the_limit():
    plan = BatchPlan(batch=12, requested=64, limit="memory", row_bytes=5_100_000_000, available_bytes=70 * GB)
    assert plan.describe() == "12 (memory: 5.10 GB/row)"
    assert BatchPlan(16, 16, "config", 1, None).describe() == "16 (config)"
