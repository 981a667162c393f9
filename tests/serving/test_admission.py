"""Admission by deadline as a unit: a fake clock, measured batch times, no Flask, no threads."""

from __future__ import annotations

import pytest

from common.errors import DeadlineExceeded, Overloaded
from serving.admission import Admission, AdmissionPolicy, BatchTimes, Load


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def admission(max_queue_images: int = 64, jitter: float = 0.0, streams: int = 1) -> tuple[Admission, Clock]:
    """ResNet50-like figures: 50 ms for one image, 320 ms for a batch of 8 (40 ms per image)."""
    times = BatchTimes(max_batch=8)
    times.observe(1, 0.050)
    times.observe(8, 0.320)
    clock = Clock()
    policy = AdmissionPolicy(max_queue_images=max_queue_images, retry_jitter=jitter)
    gate = Admission(policy, times, "resnet50", streams=streams, clock=clock, uniform=lambda low, high: high)
    return gate, clock


def test_batch_times_use_what_was_measured_and_scale_the_rest_per_image() -> None:
    times = BatchTimes(max_batch=8)
    assert times.seconds(4) == 0.0 and not times.known  # nothing measured: no estimate
    times.observe(1, 0.050)
    times.observe(8, 0.320)
    assert times.seconds(1) == pytest.approx(0.050)
    assert times.seconds(7) == pytest.approx(0.280)  # nearest measured (8) at 40 ms per image
    assert times.seconds(2) == pytest.approx(0.100)  # nearest measured (1) at 50 ms per image
    assert times.seconds(20) == pytest.approx(0.320)  # a call never holds more than max_batch
    # 19 images drain as 8 + 8 + 3
    assert times.drain_seconds(19) == pytest.approx(0.320 * 2 + 0.150)


def test_batch_times_are_moving_averages() -> None:
    times = BatchTimes(max_batch=8, smoothing=0.5)
    times.observe(4, 0.200)
    times.observe(4, 0.100)
    assert times.seconds(4) == pytest.approx(0.150)


def test_a_warm_up_figure_stands_until_its_size_is_served_then_gives_way_at_once() -> None:
    """Warm-ups run while the machine's other services warm up: a slowed seed (5x here) must not
    linger in the average once real calls of that size are measured."""
    clock = iter(range(1_700_000_000, 1_800_000_000))
    times = BatchTimes(max_batch=8, smoothing=0.2, clock=lambda: float(next(clock)))
    times.seed(4, 1.000)
    times.seed(8, 0.400)
    assert times.seconds(4) == pytest.approx(1.000)
    assert times.taken()["4"]["from"] == "warm-up"
    times.observe(4, 0.200)  # the first served call of 4 replaces the seed outright
    assert times.seconds(4) == pytest.approx(0.200)
    times.observe(4, 0.100)  # later ones are averaged as ever
    assert times.seconds(4) == pytest.approx(0.180)
    taken = times.taken()
    assert (taken["4"]["from"], taken["8"]["from"]) == ("served", "warm-up")
    assert taken["4"]["at"] > taken["8"]["at"]  # RFC 3339 strings sort by time


def test_an_idle_model_admits_a_request_whose_deadline_it_can_meet() -> None:
    gate, clock = admission(max_queue_images=4)
    gate.check(32, clock.now + 10)  # more images than the queue bound: idle, so taken
    gate.enqueue(32, clock.now + 10)
    assert gate.load().queued_images == 32


def test_an_idle_model_refuses_a_deadline_it_cannot_meet_with_504() -> None:
    gate, clock = admission()
    with pytest.raises(DeadlineExceeded) as info:
        gate.check(1, clock.now + 0.010)  # 10 ms for a 50 ms model: waiting would not help
    assert info.value.status == 504 and "50 ms" in info.value.message


def test_work_ahead_that_would_miss_the_deadline_is_a_503_with_the_drain_time() -> None:
    gate, clock = admission()
    gate.enqueue(16, clock.now + 60)  # two full batches ahead: 640 ms
    gate.check(1, clock.now + 0.800)  # 640 ms + its own (as part of a third batch) fits 800 ms
    with pytest.raises(Overloaded) as info:
        gate.check(1, clock.now + 0.500)
    assert info.value.status == 503 and info.value.reason == "deadline"
    assert info.value.retry_after == 1  # 640 ms of work, rounded up to whole seconds


def test_retry_after_grows_with_the_queue_and_is_jittered_upwards() -> None:
    gate, clock = admission(max_queue_images=1000, jitter=0.5)
    gate.enqueue(80, clock.now + 60)  # ten full batches: 3.2 s
    with pytest.raises(Overloaded) as info:
        gate.check(1, clock.now + 1)
    assert info.value.retry_after == 5  # ceil(3.2 s x 1.5): the fake jitter draws its top


def test_the_queue_bound_is_counted_in_images_and_refuses_whatever_the_deadline() -> None:
    gate, clock = admission(max_queue_images=10)
    gate.enqueue(8, float("inf"))
    gate.check(2, float("inf"))
    with pytest.raises(Overloaded) as info:
        gate.check(3, float("inf"))
    assert info.value.reason == "queue_full"


def test_the_batch_running_counts_only_for_the_time_it_has_left() -> None:
    gate, clock = admission()
    gate.enqueue(8, clock.now + 60)
    batch = gate.started(8)  # expected to run 320 ms
    assert gate.load().queued_images == 0
    clock.now += 0.300
    assert gate.estimate_finish_s(1) == pytest.approx(0.020 + 0.050)
    gate.check(1, clock.now + 0.100)
    clock.now += 1.0  # running longer than expected: nothing negative is ever counted
    assert gate.estimate_finish_s(1) == pytest.approx(0.050)
    gate.finished(batch, 1.3)
    assert gate.times.seconds(8) > 0.320  # the slow batch moved the estimate
    assert gate.load().running_images == 0


def test_streams_share_the_work_ahead_but_not_a_requests_own_images() -> None:
    gate, clock = admission(streams=2)
    assert gate.estimate_finish_s(8) == pytest.approx(0.320)  # idle: one stream computes it all
    gate.enqueue(32, clock.now + 60)
    first, second = gate.started(8), gate.started(8)  # two batches at once, 320 ms each
    assert gate.load() == Load(queued_images=16, running_images=16, running_left_s=0.640)
    clock.now += 0.120
    # (200 + 200 ms left running, 2 x 320 queued, 320 its own) over two streams
    assert gate.estimate_finish_s(8) == pytest.approx((0.400 + 0.960) / 2)
    with pytest.raises(Overloaded, match="before its deadline"):
        gate.check(8, clock.now + 0.600)
    gate.check(8, clock.now + 0.700)  # one stream would need 1.36 s: refused at 0.7 s
    gate.finished(first, 0.320)
    assert gate.load().running_images == 8  # the other batch still runs
    gate.finished(second, None)  # failed: no figure, but no longer running
    assert gate.load().running_images == 0 and gate.times.seconds(8) == pytest.approx(0.320)


def test_images_still_being_decoded_are_not_model_work() -> None:
    gate, clock = admission(max_queue_images=8)
    gate.enqueue(1, clock.now + 60)  # the model is busy, so the bound applies
    for _ in range(20):  # twenty requests checked, decoding: none of them counts yet
        gate.check(1, clock.now + 1)
    assert gate.load().queued_images == 1


def test_nothing_measured_means_nothing_promised() -> None:
    gate = Admission(AdmissionPolicy(), BatchTimes(max_batch=8))
    gate.enqueue(8, float("inf"))
    assert not gate.times.known
    # A deadline in the past, but no figures to judge it by: admitted, and counted as queued.
    gate.enqueue(1, 0.0)
    assert gate.load().queued_images == 9
    gate.times.observe(1, 0.5)  # once a batch is measured, the work ahead says it cannot be in time
    with pytest.raises(Overloaded, match="before its deadline"):
        gate.check(1, 0.0)


def test_dropped_work_leaves_the_queue() -> None:
    gate, clock = admission()
    gate.enqueue(5, clock.now + 60)
    gate.dropped(2)
    assert gate.load().queued_images == 3
