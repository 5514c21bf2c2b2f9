"""The harvest benchmark's leaf-phase rate: arithmetic on sampled counts (no run needed)."""

from __future__ import annotations

import pytest

from benchmarks.harvest import WorkerConfig, leaf_phase_rate, thread_ceiling


def test_the_leaf_phase_rate_interpolates_each_mark_between_samples() -> None:
    # 1,000 leaves: 20% (200) is crossed at 0.2 + 100/200 * 0.1 = 0.25 s, 80% (800) at
    # 0.4 + 200/300 * 0.1 = 0.4667 s: 600 leaves in 0.2167 s.
    samples = [(0.1, 0), (0.2, 100), (0.3, 300), (0.4, 600), (0.5, 900), (0.6, 1000)]
    assert leaf_phase_rate(samples, 1000) == pytest.approx(2769.2, abs=0.1)


def test_few_samples_interpolate_and_none_never_reach_a_mark() -> None:
    # Two samples around both marks: 200 at 0.12 s, 800 at 0.18 s.
    assert leaf_phase_rate([(0.1, 0), (0.2, 1000)], 1000) == pytest.approx(10_000)
    assert leaf_phase_rate([(0.1, 0), (0.2, 150)], 1000) is None  # never reached 80%
    assert leaf_phase_rate([], 1000) is None
    # Counting starts at 0 at the trigger: one sample is enough to interpolate from.
    assert leaf_phase_rate([(0.1, 1000)], 1000) == pytest.approx(10_000)


def test_the_thread_ceiling_is_threads_over_latency() -> None:
    assert thread_ceiling(WorkerConfig(2, "threads", 32)) == 3200.0
    assert thread_ceiling(WorkerConfig(2, "threads", 32), latency_ms=2) == 32_000.0
    # Without latency the threads never wait: no ceiling but the CPU.
    assert thread_ceiling(WorkerConfig(2, "threads", 32), latency_ms=0) is None
