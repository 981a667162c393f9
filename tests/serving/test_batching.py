"""The batcher as a unit: fills, waits only under load, fails every waiter, sheds, keeps results apart,
serves interactive requests before background ones."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from common.errors import DeadlineExceeded, ModelNotReady, Overloaded
from common.wire import Priority
from serving.admission import AdmissionPolicy
from serving.batching import Batcher


class GatedModel:
    """Records batch sizes and pixel values; calls block until released, so requests pile up."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.values: list[list[float]] = []  # per batch, each image's value (see ``images``)
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        self.values.append(batch[:, 0, 0, 0].tolist())
        self.started.set()
        self.release.wait(10)
        return batch.sum(axis=(1, 2, 3), keepdims=False)[:, None] * 2


def images(n: int, value: float = 1.0) -> np.ndarray:
    return np.full((n, 2, 2, 1), value, np.float32)


def test_batcher_fills_to_max_batch_size() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_batch=8, window_ms=0)
    first = batcher.submit(images(1)).future
    assert model.started.wait(5)
    waiting = [batcher.submit(images(1, i)).future for i in range(10)]
    model.release.set()
    first.result(5)
    for future in waiting:
        future.result(5)
    assert model.sizes == [1, 8, 2]
    assert batcher.stats.batches == 3 and batcher.stats.images == 11 and batcher.stats.largest_batch == 8


def test_multi_image_requests_are_never_split_across_batches() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_batch=4, window_ms=0)
    batcher.submit(images(1))
    assert model.started.wait(5)
    futures = [
        batcher.submit(images(3)).future,
        batcher.submit(images(3)).future,
        batcher.submit(images(1)).future,
    ]
    model.release.set()
    assert [len(f.result(5)) for f in futures] == [3, 3, 1]
    assert model.sizes == [1, 3, 4]  # the second 3 did not fit beside the first; the 1 joined it


def test_batcher_waits_for_more_only_under_concurrent_load() -> None:
    model = GatedModel()
    model.release.set()
    batcher = Batcher(model, max_batch=8, window_ms=2000)
    started = time.monotonic()
    batcher.submit(images(1)).future.result(5)
    assert time.monotonic() - started < 1.5  # light traffic: no 2 s batching wait
    assert model.sizes == [1]

    model.release.clear()
    model.started.clear()
    blocker = batcher.submit(images(1)).future
    assert model.started.wait(5)
    pile = [batcher.submit(images(1)).future for _ in range(3)]  # concurrent traffic behind the blocker
    model.release.set()
    blocker.result(5)
    [f.result(5) for f in pile]
    # Traffic is now concurrent: the next request waits (up to 2 s) and one arriving later joins it.
    early = batcher.submit(images(1)).future
    time.sleep(0.2)
    late = batcher.submit(images(1)).future
    early.result(5), late.result(5)
    assert model.sizes[-1] == 2


def test_batcher_times_out_with_a_partial_batch() -> None:
    model = GatedModel()
    model.release.set()
    batcher = Batcher(model, max_batch=8, window_ms=50)
    batcher._concurrent = True  # as after a busy spell
    assert len(batcher.submit(images(1)).future.result(5)) == 1  # no second request ever comes
    assert model.sizes == [1]


def test_batcher_delivers_failure_to_every_waiter_and_keeps_serving() -> None:
    calls = []

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("device lost")
        started.set()
        gate.wait(5)
        return batch[:, 0, 0, :]

    gate, started = threading.Event(), threading.Event()
    batcher = Batcher(flaky, max_batch=8, window_ms=0)
    blocker = batcher.submit(images(1)).future
    assert started.wait(5)
    futures = [batcher.submit(images(1)).future for _ in range(3)]
    gate.set()
    blocker.result(5)
    for future in futures:
        with pytest.raises(RuntimeError, match="device lost"):
            future.result(5)
    assert batcher.submit(images(1)).future.result(5).shape == (1, 1)  # the next batch is served
    assert calls == [1, 3, 1]


def test_batcher_refuses_at_once_when_the_queue_of_images_is_full() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_batch=1, window_ms=0, policy=AdmissionPolicy(max_queue_images=3))
    batcher.submit(images(1))
    assert model.started.wait(5)  # running: not part of the queue
    batcher.submit(images(2))
    batcher.submit(images(1))
    with pytest.raises(Overloaded) as info:
        batcher.submit(images(1))
    assert info.value.status == 503 and info.value.retry_after and info.value.reason == "queue_full"
    assert batcher.stats.shed == 1 and batcher.admission.load().queued_images == 3
    model.release.set()


def test_batcher_preserves_per_request_results_under_concurrency() -> None:
    batcher = Batcher(
        lambda batch: batch.reshape(len(batch), -1).sum(axis=1, keepdims=True),
        max_batch=8,
        window_ms=2,
        policy=AdmissionPolicy(max_queue_images=1024),
    )

    def ask(i: int) -> tuple[int, np.ndarray]:
        return i, batcher.submit(images(1 + i % 3, float(i))).future.result(10)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(200)))
    for i, output in answers:
        assert output.shape == (1 + i % 3, 1)
        assert np.all(output == 4 * i)  # 2x2 pixels of value i each
    assert batcher.stats.images == sum(1 + i % 3 for i in range(200))
    assert batcher.stats.largest_batch > 1


def test_work_whose_deadline_passed_is_dropped_not_computed() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_batch=8, window_ms=0)
    blocker = batcher.submit(images(1)).future
    assert model.started.wait(5)
    late_by = time.monotonic() + 0.05
    late = batcher.submit(images(1), deadline=late_by).future
    on_time = batcher.submit(images(1), deadline=time.monotonic() + 60).future
    while time.monotonic() <= late_by:  # let its deadline pass while the model is busy
        time.sleep(0.01)
    model.release.set()
    blocker.result(5)
    assert len(on_time.result(5)) == 1
    with pytest.raises(DeadlineExceeded):
        late.result(5)
    assert model.sizes == [1, 1] and batcher.stats.expired == 1


def test_measured_batches_feed_the_admission_estimates() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_batch=4, window_ms=0)
    first = batcher.submit(images(1)).future
    assert model.started.wait(5)
    waiting = [batcher.submit(images(1)).future for _ in range(4)]
    assert batcher.admission.load().queued_images == 4 and batcher.admission.load().running_images == 1
    model.release.set()
    for future in [first, *waiting]:
        future.result(5)
    assert set(batcher.times.snapshot()) == {"1", "4"}  # the sizes actually formed
    load = batcher.admission.load()
    assert (load.queued_images, load.running_images) == (0, 0)


def test_a_failed_batch_leaves_no_work_counted() -> None:
    def broken(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("model crashed")

    batcher = Batcher(broken, max_batch=4, window_ms=0)
    with pytest.raises(RuntimeError):
        batcher.submit(images(3)).future.result(5)
    load = batcher.admission.load()
    assert (load.queued_images, load.running_images) == (0, 0)


def test_interactive_requests_start_before_every_waiting_background_one() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_batch=4, window_ms=0)
    running = batcher.submit(images(1, 0))
    assert model.started.wait(5)  # the model is busy: everything below waits
    jobs = [
        batcher.submit(images(2, 10), priority=Priority.BACKGROUND),
        batcher.submit(images(1, 11), priority=Priority.BACKGROUND),
        batcher.submit(images(1, 12), priority=Priority.BACKGROUND),
    ]
    interactive = [batcher.submit(images(1, i)) for i in range(1, 7)]
    assert batcher.describe()["queued_background_images"] == 4 and batcher.describe()["queued_images"] == 10
    model.release.set()
    for job in [running, *jobs, *interactive]:
        job.future.result(5)
    # Interactive first, batched as always and in order; then each job request alone, in order.
    assert model.values == [[0], [1, 2, 3, 4], [5, 6], [10, 10], [11], [12]]
    assert max(job.started_at for job in interactive) < min(job.started_at for job in jobs)
    assert batcher.describe()["queued_background_images"] == 0
    load = batcher.admission.load()
    assert (load.queued_images, load.running_images) == (0, 0)


def test_an_interactive_request_waits_behind_at_most_the_one_job_request_running() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_batch=8, window_ms=0)
    first_job = batcher.submit(images(1, 10), priority=Priority.BACKGROUND)
    assert model.started.wait(5)
    next_job = batcher.submit(images(1, 11), priority="background")  # a plain string does too
    interactive = [batcher.submit(images(1, i)) for i in (1, 2)]
    model.release.set()
    for job in [first_job, next_job, *interactive]:
        job.future.result(5)
    assert model.values == [[10], [1, 2], [11]]
    assert batcher.stats.batches == 3 and batcher.stats.requests == 4


def test_a_background_request_whose_deadline_passed_is_dropped_not_computed() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_batch=8, window_ms=0)
    blocker = batcher.submit(images(1, 0))
    assert model.started.wait(5)
    late_by = time.monotonic() + 0.05
    late = batcher.submit(images(2, 10), deadline=late_by, priority=Priority.BACKGROUND).future
    on_time = batcher.submit(images(1, 11), deadline=time.monotonic() + 60, priority=Priority.BACKGROUND)
    while time.monotonic() <= late_by:  # let the job's deadline pass while the model is busy
        time.sleep(0.01)
    model.release.set()
    blocker.future.result(5)
    assert len(on_time.future.result(5)) == 1
    with pytest.raises(DeadlineExceeded):
        late.result(5)
    assert model.values == [[0], [11]] and batcher.stats.expired == 1
    load = batcher.admission.load()
    assert (load.queued_images, load.running_images) == (0, 0)


def test_a_background_request_that_waited_long_enough_goes_first() -> None:
    """Aging: under unbroken interactive load a job request still runs, once per max wait."""
    model = GatedModel()
    batcher = Batcher(model, max_batch=8, window_ms=0, background_max_wait_ms=50)
    blocker = batcher.submit(images(1, 0))
    assert model.started.wait(5)
    job = batcher.submit(images(1, 10), priority=Priority.BACKGROUND)
    interactive = [batcher.submit(images(1, i)) for i in (1, 2)]
    while time.monotonic() - job.enqueued_at <= 0.05:  # until the job has waited its 50 ms
        time.sleep(0.01)
    model.release.set()
    for request in [blocker, job, *interactive]:
        request.future.result(5)
    assert model.values == [[0], [10], [1, 2]]


def test_aging_gives_background_work_one_call_per_period_however_many_waited_as_long() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_batch=8, window_ms=0, background_max_wait_ms=100)
    blocker = batcher.submit(images(1, 0))
    assert model.started.wait(5)
    jobs = [batcher.submit(images(1, 10 + i), priority=Priority.BACKGROUND) for i in range(2)]
    interactive = [batcher.submit(images(1, i)) for i in (1, 2)]
    while time.monotonic() - jobs[1].enqueued_at <= 0.1:  # both jobs have waited their period
        time.sleep(0.01)
    model.release.set()
    for request in [blocker, *jobs, *interactive]:
        request.future.result(5)
    # the first job goes first by aging; the second, as old, does not: the interactive batch does
    assert model.values[:3] == [[0], [10], [1, 2]]


def test_a_background_call_waits_until_interactive_batches_pause() -> None:
    """A client that sends its next photo as soon as it has the last answer never finds a
    background call started in between; background work runs once interactive batches pause."""
    model = GatedModel()
    model.release.set()  # answers at once
    batcher = Batcher(model, max_batch=8, window_ms=0, background_idle_ms=200)
    batcher.submit(images(1, 1)).future.result(5)
    job = batcher.submit(images(1, 10), priority=Priority.BACKGROUND)
    follow_up = batcher.submit(images(1, 2))  # well within the 200 ms since the last batch
    follow_up.future.result(5)
    job.future.result(5)
    assert model.values == [[1], [2], [10]]
    assert job.started_at - follow_up.started_at >= 0.19


def test_background_work_starts_at_once_when_no_interactive_client_is_about() -> None:
    model = GatedModel()
    model.release.set()
    batcher = Batcher(model, max_batch=8, window_ms=0, background_idle_ms=5000)
    job = batcher.submit(images(1, 10), priority=Priority.BACKGROUND)
    job.future.result(5)
    assert job.started_at - job.enqueued_at < 1.0  # never waited its 5 s: nothing interactive ran


def test_a_closed_batcher_answers_what_it_queued_then_stops_and_refuses_more() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_batch=2, window_ms=0)
    running = batcher.submit(images(1)).future
    assert model.started.wait(5)
    queued = [batcher.submit(images(1, i)).future for i in range(3)]
    batcher.close()
    with pytest.raises(ModelNotReady):
        batcher.submit(images(1))
    model.release.set()
    assert [f.result(5).ravel().tolist() for f in [running, *queued]] == [[8.0], [0.0], [8.0], [16.0]]
    assert batcher.join(5) and model.sizes == [1, 2, 1]


class TwoAtOnce:
    """A model whose first two calls each wait until the other is running too (a barrier of two):
    with one worker the barrier breaks and the batch fails. Later calls run at once."""

    def __init__(self) -> None:
        self.together = threading.Barrier(2, timeout=5)
        self.threads: set[str] = set()
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.threads.add(threading.current_thread().name)
            self.calls += 1
            first_two = self.calls <= 2
        if first_two:
            self.together.wait()
        return batch.sum(axis=(1, 2, 3))[:, None]


def test_with_two_streams_two_batches_run_at_once_and_the_queue_still_forms_batches() -> None:
    model = TwoAtOnce()
    batcher = Batcher(model, max_batch=2, window_ms=0)
    batcher.run_at_once(2)
    assert batcher.streams == 2 and batcher.admission.streams == 2
    assert batcher.describe()["streams"] == 2
    futures = [batcher.submit(images(1, i)).future for i in range(6)]
    assert [f.result(10).item() for f in futures] == [0.0, 4.0, 8.0, 12.0, 16.0, 20.0]
    assert len(model.threads) == 2  # each batch on a worker of its own
    assert batcher.stats.images == 6 and batcher.stats.batches >= 3 and batcher.stats.largest_batch <= 2
    batcher.close()
    assert batcher.join(5)  # every worker ends


def test_one_stream_runs_one_batch_at_a_time() -> None:
    model = TwoAtOnce()
    batcher = Batcher(model, max_batch=1, window_ms=0)
    futures = [batcher.submit(images(1, i)).future for i in range(2)]
    with pytest.raises(threading.BrokenBarrierError):
        futures[0].result(10)  # it waited alone for a second call that never came
    batcher.close()
    assert batcher.join(5)
