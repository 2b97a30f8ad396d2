"""``[worker] prefetch`` and ``claim_lanes``: what a node accepts, and its defaults."""

from __future__ import annotations

import pytest

from forge_kernel.config import KERNEL_SECTIONS, load_config
from forge_kernel.errors import ConfigError
from forge_worker import WorkerConfig

SECTIONS = {**KERNEL_SECTIONS, "worker": WorkerConfig}


@pytest.mark.parametrize("value, expect", [
    (-1, "[worker] prefetch = -1"),
    (100_001, "[worker] prefetch = 100001"),
    ("lots", "[worker] prefetch = 'lots'"),
    (2.5, "[worker] prefetch = 2.5"),
    (True, "[worker] prefetch = True"),
])
def test_bad_prefetch_is_refused_naming_the_key(value, expect):
    with pytest.raises(ConfigError) as ei:
        load_config(SECTIONS, data={"worker": {"prefetch": value}}, env={})
    assert expect in str(ei.value), str(ei.value)


def test_prefetch_defaults_to_twice_concurrency_and_zero_turns_it_off():
    assert load_config(SECTIONS, data={}, env={})["worker"].prefetch is None  # the worker reads: 2 x concurrency
    cfg = load_config(SECTIONS, data={"worker": {"concurrency": 7, "prefetch": 0}}, env={"FORGE_WORKER__PREFETCH": "3"})
    assert (cfg["worker"].concurrency, cfg["worker"].prefetch) == (7, 3)  # the environment wins


@pytest.mark.parametrize("value", [0, 3, "two", 1.5])
def test_bad_claim_lanes_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError) as ei:
        load_config(SECTIONS, data={"worker": {"claim_lanes": value}}, env={})
    assert "[worker] claim_lanes" in str(ei.value), str(ei.value)


def test_claim_lanes_defaults_to_one():
    assert load_config(SECTIONS, data={}, env={})["worker"].claim_lanes == 1
    assert load_config(SECTIONS, data={"worker": {"claim_lanes": 2}}, env={})["worker"].claim_lanes == 2


def test_prefetch_max_is_checked_like_prefetch_and_unset_by_default():
    assert load_config(SECTIONS, data={}, env={})["worker"].prefetch_max is None  # the worker reads: 32 x concurrency
    assert load_config(SECTIONS, data={"worker": {"prefetch_max": 400}}, env={})["worker"].prefetch_max == 400
    with pytest.raises(ConfigError) as ei:
        load_config(SECTIONS, data={"worker": {"prefetch_max": -1}}, env={})
    assert "[worker] prefetch_max = -1" in str(ei.value), str(ei.value)


def test_the_reserve_outlasts_a_round_trip_only_when_the_jobs_are_long():
    from forge_worker.runtime import jobs_outlast

    # 400 claimed ahead at the send, 300 still waiting after a 30 ms round trip, 50 slots
    # short jobs (20 us each) on a node short of CPU: they wait in numbers, but are no reason to shrink
    assert not jobs_outlast(400, 300, runs=100, run_seconds=100 * 20e-6, round_trip=0.03, concurrency=50)
    # long jobs (0.2 s): the reserve lasts 400 x 0.2 / 50 = 1.6 s, far beyond the round trip
    assert jobs_outlast(400, 300, runs=10, run_seconds=10 * 0.2, round_trip=0.03, concurrency=50)
    # none finished during the round trip: every slot stayed busy throughout
    assert jobs_outlast(400, 300, runs=0, run_seconds=0.0, round_trip=0.03, concurrency=50)
    # most of the reserve started: the jobs did not outlast it, however long they were
    assert not jobs_outlast(400, 100, runs=10, run_seconds=10 * 0.2, round_trip=0.03, concurrency=50)
    assert not jobs_outlast(0, 0, runs=0, run_seconds=0.0, round_trip=0.03, concurrency=50)
