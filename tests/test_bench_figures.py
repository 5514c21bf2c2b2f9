"""The harvest benchmark's arithmetic and settings (no run needed), and the vendor load
client against the real demo vendor."""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks import regimes, vendorload
from benchmarks.celery_baseline import publish_mode
from benchmarks.harvest import WorkerConfig, leaf_phase_rate, rotated, thread_ceiling


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


def test_the_ceiling_is_calls_in_flight_over_latency() -> None:
    assert thread_ceiling(WorkerConfig(2, "threads", 32)) == 3200.0
    assert thread_ceiling(WorkerConfig(2, "threads", 32), latency_ms=2) == 32_000.0
    assert thread_ceiling(WorkerConfig(1, "gevent", 1000), latency_ms=200) == 5000.0
    assert thread_ceiling(WorkerConfig(2, "async", 500), latency_ms=200) == 5000.0
    # Without latency the calls never wait: no ceiling but the CPU.
    assert thread_ceiling(WorkerConfig(2, "threads", 32), latency_ms=0) is None


def test_each_round_starts_further_down_the_list() -> None:
    names = [f"c{i}" for i in range(10)]
    rounds = [rotated(names, r, 3) for r in (1, 2, 3)]
    assert rounds[0] == names
    # Round 2 starts 3 places down and runs backwards; round 3 starts 6 places down.
    assert rounds[1] == ["c2", "c1", "c0", "c9", "c8", "c7", "c6", "c5", "c4", "c3"]
    assert rounds[2][:3] == ["c6", "c7", "c8"]
    assert all(sorted(r) == sorted(names) for r in rounds)  # every contender, once
    # No contender holds one place, or runs after the same one, in every round.
    assert all(len({r.index(n) for r in rounds}) > 1 for n in names)
    for n in names:
        first, second = (r.index(n) for r in rounds[:2])
        if first and second:
            assert rounds[0][first - 1] != rounds[1][second - 1], n
    assert rotated([], 1, 3) == []


def test_a_worker_config_says_what_it_runs() -> None:
    config = WorkerConfig(2, "gevent", 500, prefetch=64, publish="chunks:10", events=False)
    assert config.in_flight == 1000
    assert config.label == "2 proc x gevent 500, prefetch 64, chunks:10, no -E"
    assert config.short_label == "2x gevent 500 pf64 chunks:10 no-E"
    assert WorkerConfig(2, "threads", 32).label == "2 proc x threads 32"


def test_every_baseline_of_the_in_flight_regime_has_the_same_bound() -> None:
    assert regimes.regime_of(200) == regimes.IN_FLIGHT_REGIME
    assert regimes.regime_of(20) == regimes.regime_of(0) == regimes.THREADS
    families = {f.name: f for f in regimes.families(regimes.IN_FLIGHT_REGIME, 200, 2, 1000)}
    for name in ("celery", "dramatiq", "dramatiq-async"):
        assert {c.in_flight for c in families[name].shapes} == {1000}, name
        assert {c.processes for c in families[name].shapes} == {1, 2}, name
    assert {c.pool for c in families["celery"].shapes} == {"gevent"}
    assert {c.pool for c in families["dramatiq"].shapes} == {"gevent"}
    assert {c.pool for c in families["dramatiq-async"].shapes} == {"async"}
    assert all(c.events for c in families["celery"].shapes)  # -E, as fanout's events


def test_a_variation_that_changes_nothing_is_not_run_again() -> None:
    family = regimes.families(regimes.THREADS, 20, 2)[1]
    assert family.name == "celery"
    best = family.shapes[0]  # prefetch 64, group
    varied = family.varied(best)
    assert [c.prefetch for c in varied] == [None, 64, 64, 64]
    assert [c.publish for c in varied] == ["group", "each", "chunks:10", "chunks:30"]
    assert best not in varied


@pytest.mark.parametrize(("value", "expected"), [
    ("", ("each", 0)), ("group", ("group", 0)), ("chunks:10", ("chunks", 10)),
])
def test_the_celery_baseline_reads_how_to_publish(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[str, int]
) -> None:
    monkeypatch.setenv("BENCH_CELERY_PUBLISH", value)
    assert publish_mode() == expected


@pytest.mark.parametrize("value", ["chunks", "group:3", "batch", "chunks:x"])
def test_a_bad_publish_mode_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("BENCH_CELERY_PUBLISH", value)
    with pytest.raises(ValueError, match="BENCH_CELERY_PUBLISH"):
        publish_mode()


def _metric_paths(vendor: Any) -> list[str]:
    account = vendor.http.get("/accounts").json()["accounts"][0]["id"]
    services = vendor.http.get(f"/accounts/{account}/services").json()["services"]
    return [f"/accounts/{account}/services/{s['id']}/metrics?day=2026-01-0{d}"
            for s in services for d in (1, 2)]


def _load(
    vendor: Any, capsys: pytest.CaptureFixture[str], paths: list[str], *args: str
) -> dict[str, Any]:
    paths = [arg for p in paths for arg in ("--path", p)]
    assert vendorload.main([vendor.url, *args, "--seconds", "60", *paths]) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_the_vendor_load_sends_exactly_its_budget(
    vendor: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    vendor.configure(latency_ms=5)
    found = _load(vendor, capsys, _metric_paths(vendor), "--connections", "20",
                  "--requests", "150")
    assert (found["answered"], found["failed"]) == (150, 0)
    assert vendor.stats()["by_endpoint"]["metrics"] == 150
    assert found["latency_ms"]["p50"] >= 5


def test_the_vendor_load_counts_error_answers_as_failed(
    vendor: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _metric_paths(vendor)
    vendor.configure(error_rate=1.0, error_times=0)
    found = _load(vendor, capsys, paths, "--connections", "4", "--requests", "40")
    assert (found["answered"], found["failed"]) == (0, 40)
    assert found["failures"] == ["HTTP 500"]
    assert vendor.stats()["by_endpoint"]["metrics"] == 40


def test_fanout_in_flight_settings_get_a_sweep_and_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.harvest import harvest_contenders

    families = regimes.families(regimes.IN_FLIGHT_REGIME, 200, 2)
    assert "fanout-inflight" not in {f.name for f in families}  # until the engine lands
    shape = WorkerConfig(2, "threads", 32, worker_args=("--max-in-flight", "500"))
    monkeypatch.setattr(regimes, "fanout_in_flight_shapes", lambda in_flight: (shape,))
    families = regimes.families(regimes.IN_FLIGHT_REGIME, 200, 2)
    found = {f.name: f for f in families}
    assert found["fanout-inflight"].shapes == (shape,)
    chosen = {f.name: f.shapes[0] for f in families}
    rows = {c.name: c for c in harvest_contenders(regimes.IN_FLIGHT_REGIME, chosen)}
    assert rows["fanout-inflight"].config == shape
    assert rows["fanout-inflight"].make is not None
    assert rows["fanout-inflight"].make().name == "fanout-inflight"
    assert rows["celery-no-events"].config.events is False  # type: ignore[union-attr]
