"""Running one training job: features from the base model's service, a head fitted with Keras, its
evaluation, and its publication as the next version of the custom model. No Celery here
(``workers.app`` wraps it), so it is tested with a fake client and a real Redis.

Features: every image once (and ``TRAINING_AUGMENT_VIEWS`` more views of each training image with
``augment``), ``TRAINING_FEATURES_BATCH`` at a time at *batch* priority through the gateway's own
client, so interactive clients of the base model keep their latency. An image the service refuses
is skipped and listed; a model that is down or overloaded is waited for (its ``Retry-After``) up to
``JOBS_RETRY_S``. Every batch and every epoch updates the record, which is also the heartbeat the
stall watchdog reads. Cancelling stops the job before the next call or epoch; nothing is published.

Publication is the last step and is atomic (``common.custom.heads.publish``): a job that dies
before it publishes nothing, one that dies after leaves a complete version. The job then waits
(``TRAINING_PUBLISH_WAIT_S``) until a replica of the base lists the new version, plus one
gateway probe interval, so ``completed`` means the model answers through the gateway.
"""

from __future__ import annotations

import base64
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from common.custom import heads, train
from common.custom.dataset import Dataset
from common.custom.settings import TrainingSettings
from common.errors import ServiceError
from common.jobs.store import ACTIVE, JobStore, JobStoreUnavailable
from gateway.client import ModelClient

log = logging.getLogger("imagerec.training")
RETRYABLE = (500, 502, 503, 504)


class Cancelled(Exception):
    """The training job was cancelled (or expired) while it ran."""


class TrainingFailed(Exception):
    """The job cannot succeed; the message says why (for the record)."""


class TrainingRunner:
    def __init__(
        self,
        store: JobStore,
        client: ModelClient,
        settings: TrainingSettings,
        *,
        retry_s: float = 120.0,
        probe_interval_s: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``probe_interval_s``: how often the gateways probe replicas (``GATEWAY_HEALTH_INTERVAL_S``);
        once a replica serves the new version, every gateway has seen it one interval later."""
        self.store = store
        self.client = client
        self.settings = settings
        self.retry_s = retry_s
        self.probe_interval_s = probe_interval_s
        self.sleep = sleep

    def run(self, job_id: str) -> str:
        """Train, evaluate and publish ``job_id``; returns the state it ended in."""
        job = self.store.get(job_id)
        if job is None:
            return "expired"
        if job["status"] != "pending" or not self.store.mark_running(job_id):
            return str(job["status"])  # a job is trained once: a second delivery changes nothing
        try:
            with self._heartbeat(job_id):
                fields = self._train(job)
        except Cancelled:
            log.info("training cancelled", extra={"job_id": job_id})
            return "cancelled"
        except TrainingFailed as failure:
            return self._fail(job_id, str(failure))
        except Exception as exc:  # anything unforeseen fails the job, saying what, not a stall later
            log.exception("training crashed", extra={"job_id": job_id})
            return self._fail(job_id, f"training stopped: {type(exc).__name__}: {exc}"[:1000])
        return self.store.finish(job_id, "completed", {**fields, "phase": "done"}) or "completed"

    def _fail(self, job_id: str, reason: str) -> str:
        log.warning("training failed", extra={"job_id": job_id, "reason": reason})
        try:
            return self.store.finish(job_id, "failed", {"phase": "failed", "error": reason}) or "failed"
        except JobStoreUnavailable:  # Redis is away: the watchdog fails it once the heartbeat is gone
            return "failed"

    # --- the steps --------------------------------------------------------------------------

    def _train(self, job: dict[str, Any]) -> dict[str, Any]:
        job_id, base, options = job["id"], job["base"], job["options"]
        folder = self.store.folder(job_id)
        dataset = Dataset.read(folder)
        labels = np.array([dataset.classes.index(item["class"]) for item in dataset.items])
        train_rows, held_rows = train.split(labels, float(options["validation_split"]))
        self._update(job_id, {"phase": "features"})
        features, base_hash, failed = self._features(job_id, base, folder, dataset.items)
        extra_x: list[np.ndarray] = []
        extra_y: list[np.ndarray] = []
        if options.get("augment") and self.settings.augment_views:
            extra_x, extra_y, seen = self._augmented(job_id, base, folder, dataset, train_rows, failed)
            if seen - {"", base_hash}:
                raise TrainingFailed(f"{base} changed weights while features were computed: train again")
        keep = np.array([i not in failed for i in range(len(dataset.items))])
        train_rows = train_rows[keep[train_rows]]
        held_rows = held_rows[keep[held_rows]]
        skipped = dataset.skipped + [
            {"name": dataset.items[i]["name"], "reason": reason} for i, reason in sorted(failed.items())
        ]
        if len(np.unique(labels[train_rows])) < len(dataset.classes):
            raise TrainingFailed("after unreadable images were skipped, a class has no training image left")
        x = np.concatenate([features[train_rows], *extra_x]) if extra_x else features[train_rows]
        y = np.concatenate([labels[train_rows], *extra_y]) if extra_y else labels[train_rows]
        self._update(job_id, {"phase": "training", "skipped": skipped})

        def on_epoch(epoch: int, figures: dict[str, float]) -> bool:
            history.append({"epoch": epoch, **figures})
            self._update(job_id, {"history": history})
            return not self._cancelled(job_id)

        history: list[dict[str, float]] = []
        fitted = train.fit(
            x,
            y,
            len(dataset.classes),
            int(options["epochs"]),
            (features[held_rows], labels[held_rows]) if len(held_rows) else None,
            on_epoch,
        )
        if self._cancelled(job_id):
            raise Cancelled(job_id)
        self._update(job_id, {"phase": "evaluating"})
        rows, evaluated_on = (held_rows, "validation") if len(held_rows) else (train_rows, "training")
        evaluation = {
            "evaluated_on": evaluated_on,
            **train.evaluate(fitted, features[rows], labels[rows], dataset.classes),
        }
        self._update(job_id, {"evaluation": evaluation})
        registry = self.client.registry
        registry.refresh()
        base_meta = registry.metadata(base)
        if base_meta.get("weights_hash") not in (None, base_hash):
            raise TrainingFailed(
                f"{base} now serves other weights ({base_meta['weights_hash']}) than the features were "
                f"computed with ({base_hash}): the model would be stale at once; train again"
            )
        meta = {
            "name": job["model"],
            "base": base,
            "base_weights": base_meta.get("weights"),
            "base_weights_hash": base_hash,
            "features": int(features.shape[1]),
            "classes": dataset.classes,
            "evaluation": evaluation,
            "training": {
                **options,
                "images": int(len(train_rows)),
                "augmented_views": int(sum(len(e) for e in extra_y)),
                "held_out": int(len(held_rows)),
                "job_id": job_id,
            },
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        # From "publishing" on, a cancel is refused (the store's cancel script): check once more
        # after setting it, so a cancel that came first is honoured and none comes after.
        self._update(job_id, {"phase": "publishing"})
        if self._cancelled(job_id):
            raise Cancelled(job_id)
        try:
            version = heads.publish(
                Path(self.settings.models_dir), job["model"], fitted.kernel, fitted.bias, meta
            )
        except OSError as exc:
            raise TrainingFailed(f"the model could not be published in CUSTOM_MODELS_DIR: {exc}") from None
        log.info(
            "custom model published", extra={"job_id": job_id, "model": job["model"], "version": version}
        )
        served = self._wait_served(job["model"], version)
        return {
            "evaluation": evaluation,
            "served": {"name": job["model"], "version": str(version), "serving": served},
        }

    def _features(
        self, job_id: str, base: str, folder: Path, items: list[dict[str, str]]
    ) -> tuple[np.ndarray, str, dict[int, str]]:
        """Features of every item (rows of failed ones are zeros), the base weights' hash, and
        the items that failed with why."""
        rows: list[np.ndarray | None] = []
        failed: dict[int, str] = {}
        hashes: set[str] = set()
        size = self.settings.features_batch
        for start in range(0, len(items), size):
            if self._cancelled(job_id):
                raise Cancelled(job_id)
            batch = items[start : start + size]
            images = [(folder / item["file"]).read_bytes() for item in batch]
            vectors, errors, digest = self._call(base, images)
            if digest:  # "" when the call's one image was refused
                hashes.add(digest)
            for offset, (vector, error) in enumerate(zip(vectors, errors, strict=True)):
                rows.append(vector)
                if error:
                    failed[start + offset] = error
            self._update(job_id, {"done": len(rows) - len(failed), "failed": len(failed)})
        if len(hashes) > 1:
            raise TrainingFailed(f"{base} changed weights while features were computed: train again")
        width = next((len(r) for r in rows if r is not None), 0)
        if not width:
            raise TrainingFailed(f"{base} could not read any image of the dataset")
        matrix = np.stack([r if r is not None else np.zeros(width, np.float32) for r in rows])
        return matrix, hashes.pop(), failed

    def _augmented(
        self,
        job_id: str,
        base: str,
        folder: Path,
        dataset: Dataset,
        train_rows: np.ndarray,
        failed: dict[int, str],
    ) -> tuple[list[np.ndarray], list[np.ndarray], set[str]]:
        """Features of ``augment_views`` more views of each training image, with their labels, and
        the base weights' hashes they were computed with. Views are made a batch at a time."""
        rng = np.random.default_rng(0)
        sources = [i for i in train_rows.tolist() if i not in failed]
        wanted = [i for i in sources for _ in range(self.settings.augment_views)]
        xs, ys, hashes = [], [], set()
        size = self.settings.features_batch
        for start in range(0, len(wanted), size):
            if self._cancelled(job_id):
                raise Cancelled(job_id)
            batch = wanted[start : start + size]
            views = [train.augmented((folder / dataset.items[i]["file"]).read_bytes(), rng) for i in batch]
            vectors, _, digest = self._call(base, views)
            hashes.add(digest)
            for i, vector in zip(batch, vectors, strict=True):
                if vector is not None:
                    xs.append(vector)
                    ys.append(dataset.classes.index(dataset.items[i]["class"]))
            self._update(job_id, {"augmented": start + len(batch)})
        if not xs:
            return [], [], hashes
        return [np.stack(xs)], [np.array(ys)], hashes

    def _call(self, base: str, images: list[bytes]) -> tuple[list[np.ndarray | None], list[str], str]:
        """One features call, retried while the model is down or busy: (vectors, errors, hash)."""
        backoff, give_up = 0.5, time.monotonic() + self.retry_s
        while True:
            try:
                reply = self.client.predict(
                    base, images, top_k=1, features=True, priority="batch", deadline=time.monotonic() + 60
                )
                break
            except ServiceError as exc:
                if exc.status not in RETRYABLE:
                    if len(images) == 1:  # the one image was refused: it alone fails
                        return [None], [exc.message], ""
                    raise TrainingFailed(f"{base} refused the features request: {exc.message}") from None
                wait = float(exc.retry_after or backoff) * random.uniform(1.0, 1.5)
                backoff = min(backoff * 2, 5.0)
                if time.monotonic() + wait > give_up:
                    raise TrainingFailed(
                        f"{base} stayed unavailable for {self.retry_s:g}s: {exc.message}"
                    ) from None
                self.sleep(wait)
        vectors: list[np.ndarray | None] = []
        errors: list[str] = []
        for result in reply["results"]:
            if "features" in result:
                vectors.append(np.frombuffer(base64.b64decode(result["features"]["data"]), "<f4").copy())
                errors.append("")
            else:
                vectors.append(None)
                errors.append(str(result.get("error", {}).get("message", "not readable")))
        return vectors, errors, str(reply.get("weights_hash", ""))

    def _wait_served(self, name: str, version: int) -> bool:
        """Whether the fleet lists ``name`` at ``version`` (or later) within the publish wait."""
        registry = self.client.registry
        give_up = time.monotonic() + self.settings.publish_wait_s
        while self.settings.publish_wait_s > 0:
            registry.refresh()
            entry = registry.custom().get(name)
            if entry is not None and int(entry[1]["version"]) >= version:
                self.sleep(self.probe_interval_s + 0.5)  # every gateway's poller has probed since
                return True
            if time.monotonic() >= give_up:
                break
            self.sleep(1.0)
        return False

    # --- helpers ----------------------------------------------------------------------------

    @contextmanager
    def _heartbeat(self, job_id: str) -> Iterator[None]:
        """Mark the job as progressing every quarter of ``TRAINING_STALL_S`` while this process
        lives, so a slow step (a model call waiting behind interactive load, TensorFlow's import)
        is never taken for a dead worker; a killed one stops beating."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.settings.stall_s / 4):
                try:
                    self.store.update(job_id, {})
                except Exception:  # noqa: BLE001 - Redis away for a moment: the next beat retries
                    log.warning("training heartbeat failed", extra={"job_id": job_id})

        thread = threading.Thread(target=beat, name=f"heartbeat-{job_id[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def _update(self, job_id: str, fields: dict[str, Any]) -> None:
        """Progress into the record; a moment without Redis loses one update, not the training."""
        try:
            self.store.update(job_id, fields)
        except JobStoreUnavailable:
            log.warning("training progress not recorded: job store unreachable", extra={"job_id": job_id})

    def _cancelled(self, job_id: str) -> bool:
        try:
            job = self.store.get(job_id)
        except JobStoreUnavailable:
            return False  # cannot tell: go on, and look again at the next step
        return job is None or job.get("status") not in ACTIVE
