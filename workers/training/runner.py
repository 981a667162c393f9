"""Running one training job, one sequence for both kinds of custom model (``learners``): the inputs
of every photo (and its augmented views), the split without the unreadable ones, the fit, the
evaluation, and the publication as the next version of the custom model. No Celery here
(``workers.app`` wraps it), so it is tested with a fake client and a real Redis.

Features: every image once (and ``TRAINING_AUGMENT_VIEWS`` more views of each training image with
``augment``), ``TRAINING_FEATURES_BATCH`` at a time at *background* priority through the gateway's own
client, so interactive clients of the base model keep their latency. An image the service refuses
is skipped and listed; a model that is down or overloaded is waited for (its ``Retry-After``) up to
``JOBS_RETRY_S``. Every batch and every epoch updates the record, which is also the heartbeat the
stall watchdog reads. Cancelling stops the job before the next call or epoch; nothing is published.

Publication is the last step and is atomic (``common.repository.publish``): a job that dies
before it publishes nothing, one that dies after leaves a complete version. The job then waits
(``TRAINING_PUBLISH_WAIT_S``) until every ready replica of the base serves the new version, so
``completed`` means the model answers through the gateway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import redis

from common import repository, wire
from common.jobs.store import ACTIVE, JobStore, JobStoreUnavailable
from common.models import BACKBONE_LAYERS
from common.tenancy.owners import Owners
from common.training import removals
from common.training.dataset import Dataset
from common.training.settings import TrainingSettings
from fleet.client import ModelClient
from workers.training import fit
from workers.training.learners import (
    Cancelled,
    HeadLearner,
    Inputs,
    Learned,
    Learner,
    OnEpoch,
    Run,
    TrainingFailed,
    TunedLearner,
    check_room,
)

log = logging.getLogger("imagerec.training")


class ModelDeleted(Exception):
    """The model was deleted (or is no longer the job owner's) before it could be published."""


class TrainingRunner:
    def __init__(
        self,
        store: JobStore,
        client: ModelClient,
        settings: TrainingSettings,
        *,
        retry_s: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
        removals: redis.Redis | None = None,
        is_live: Callable[[str], bool] = lambda owner: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``removals``: where the gateway asks for custom models to be removed (the job store's
        Redis; ``common.training.removals``), carried out before a publication. ``is_live``:
        whether a job's owner still has a key (``KeyStore.is_live``): a revoked principal's
        training stops at its next step."""
        self.is_live = is_live
        self.clock = clock  # for TRAINING_MAX_WALL_S
        self._give_up_at = float("inf")  # set when a training starts (TRAINING_MAX_WALL_S)
        self.store = store
        self.client = client
        self.settings = settings
        self.retry_s = retry_s
        self.sleep = sleep
        self.removals = removals

    def run(self, job_id: str) -> str:
        """Train, evaluate and publish ``job_id``; returns the state it ended in."""
        job = self.store.get(job_id)
        if job is None:
            return "expired"
        if job["status"] != "pending" or not self.store.mark_running(job_id):
            return str(job["status"])  # a job is trained once: a second delivery changes nothing
        # What Redis holds is checked again before it names a folder or a model: the gateway
        # checked it, but anything that can write to Redis could have written this record.
        if repository.check_name(str(job.get("model", ""))) or job.get("base") not in BACKBONE_LAYERS:
            return self._fail(job_id, "the job's model name or base is not valid")
        self._give_up_at = self.clock() + self.settings.max_wall_s
        try:
            with self._heartbeat(job_id):
                fields = self._train(job)
        except Cancelled:
            log.info("training cancelled", extra={"job_id": job_id})
            self._release_unpublished(job)
            return "cancelled"
        except ModelDeleted:
            log.info("training stopped: its model was deleted", extra={"job_id": job_id})
            state = self.store.finish(
                job_id,
                "cancelled",
                {"phase": "cancelled", "error": "the model was deleted during its training"},
            )
            self._release_unpublished(job)
            return state or "cancelled"
        except TrainingFailed as failure:
            state = self._fail(job_id, str(failure))
        except Exception as exc:  # anything unforeseen fails the job at once, not a stall later
            log.exception("training crashed", extra={"job_id": job_id})
            # NOTE: the kind of error, not its text: that may hold paths and internals (the log has it)
            state = self._fail(
                job_id,
                f"training stopped by an internal error ({type(exc).__name__}); "
                f"the trainer's log has the details of job {job_id}",
            )
        else:
            return self.store.finish(job_id, "completed", {**fields, "phase": "done"}) or "completed"
        self._release_unpublished(job)
        return state

    def _release_unpublished(self, job: dict[str, Any]) -> None:
        """A name claimed for a model that was never published, and that no other training of its
        owner is about to publish, is free again (and no longer counts against the owner's
        ``custom_models`` quota)."""
        name = str(job["model"])
        try:
            if any(
                other.get("kind") == "training" and other.get("model") == name and other["id"] != job["id"]
                for other in self.store.active()
            ):
                return
            owners = Owners(self.store.redis)
            if owners.release_if_deleting(name):
                return  # deleted during its training: the name is free now
            if (Path(self.settings.models_dir) / name).exists():
                return  # an earlier version serves: the name stays its owner's
            owners.release(name)
        except (JobStoreUnavailable, redis.RedisError):  # the owner can still DELETE the name
            log.warning("could not release a model name", extra={"job_id": job["id"], "model": name})

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
        rows = fit.split(labels, float(options["validation_split"]))
        learned = self._learn(job, folder, dataset, labels, rows)
        self._update(job_id, {"evaluation": learned.evaluation})
        meta = {
            "name": job["model"],
            "kind": learned.kind,
            "base": base,
            "base_weights": learned.base_weights,
            "base_weights_hash": learned.base_hash,
            "features": learned.features,
            "classes": dataset.classes,
            "evaluation": learned.evaluation,
            "training": {**options, **learned.counts, "job_id": job_id},
            "created_at": wire.timestamp(time.time()),
        }
        if learned.kind == repository.FINE_TUNED:  # others may have been trained meanwhile
            self.client.registry.refresh()
            check_room(self.client, job)
        # From "publishing" on, a cancel is refused (the store's cancel script): check once more
        # after setting it, so a cancel that came first is honoured and none comes after.
        self._update(job_id, {"phase": "publishing"})
        if self._cancelled(job_id):
            raise Cancelled(job_id)
        try:
            version = self._publish(job["model"], learned.write, meta, str(job.get("owner") or "admin"))
        except OSError as exc:  # the record says what failed; the log says where (a path is internal)
            log.warning("publishing failed", extra={"job_id": job_id, "reason": str(exc)})
            raise TrainingFailed(
                f"the model could not be written to the model repository ({type(exc).__name__}); "
                "the trainer's log has the details"
            ) from None
        log.info(
            "custom model published", extra={"job_id": job_id, "model": job["model"], "version": version}
        )
        self._update(job_id, {"published_at": time.time()})
        served = self._wait_served(base, job["model"], version)
        if served:  # the new version serves: versions before the ones kept are not needed
            root = Path(self.settings.models_dir)
            with repository.locked(root):
                repository.prune(root, job["model"], self.settings.keep_versions)
        return {
            "evaluation": learned.evaluation,
            "served": {"name": job["model"], "version": str(version), "serving": served},
        }

    def _learn(
        self,
        job: dict[str, Any],
        folder: Path,
        dataset: Dataset,
        labels: np.ndarray,
        rows: tuple[np.ndarray, np.ndarray],
    ) -> Learned:
        """The one sequence: every photo's inputs, its augmented views', the split without the
        unreadable photos, the fit, the evaluation; the learner says how each step is done."""
        job_id, options = job["id"], job["options"]
        self._update(job_id, {"phase": "features"})
        learner = self._learner(job)
        views = self.settings.augment_views if options.get("augment") else 0
        if isinstance(learner, TunedLearner):
            learner.check_budget(len(dataset.items) + views * len(rows[0]))
        items = dataset.items
        photo = lambda i: (folder / items[i]["file"]).read_bytes()  # noqa: E731
        inputs, failed = self._inputs(job_id, learner, len(items), photo)
        if not inputs:
            raise TrainingFailed(f"{job['base']} could not read any image of the dataset")
        extra: list[Inputs] = []
        extra_y: list[np.ndarray] = []
        if views:  # more views of each readable training image, made as they are needed
            rng = np.random.default_rng(0)
            wanted = np.array([i for i in rows[0].tolist() if i not in failed for _ in range(views)], int)

            def view(j: int) -> bytes:
                return fit.augmented((folder / items[wanted[j]]["file"]).read_bytes(), rng)

            made, unread = self._inputs(job_id, learner, len(wanted), view, progress="augmented")
            kept = np.array([j for j in range(len(wanted)) if j not in unread], int)
            if made and len(kept):
                extra, extra_y = [[a[kept] for a in made]], [labels[wanted[kept]]]
            del made
        train_rows, held_rows = self._readable(job_id, dataset, labels, rows, failed)
        x = [np.concatenate([a[train_rows], *(e[k] for e in extra)]) for k, a in enumerate(inputs)]
        y = np.concatenate([labels[train_rows], *extra_y]) if extra_y else labels[train_rows]
        held = ([a[held_rows] for a in inputs], labels[held_rows]) if len(held_rows) else None
        # Evaluated on the held-out photos, or on the training photos (not their views) without any.
        evaluated = held or ([a[: len(train_rows)] for a in x], labels[train_rows])
        del inputs, extra  # the sets above are all training needs
        fitted = learner.fit(x, y, held, len(dataset.classes))
        if self._cancelled(job_id):
            raise Cancelled(job_id)
        self._update(job_id, {"phase": "evaluating"})
        evaluation = {
            "evaluated_on": "validation" if held else "training",
            **fit.evaluate(fitted.probabilities(evaluated[0]), evaluated[1], dataset.classes),
        }
        counts = {
            "images": int(len(train_rows)),
            "augmented_views": int(sum(len(e) for e in extra_y)),
            "held_out": int(len(held_rows)),
        }
        return learner.learned(fitted, evaluation, counts)

    def _learner(self, job: dict[str, Any]) -> Learner:
        history: list[dict[str, Any]] = []

        def epochs(*, stage: str = "", offset: int = 0) -> OnEpoch:
            """An ``on_epoch``: each epoch's figures into the record; False once cancelled."""

            def on_epoch(epoch: int, figures: dict[str, float]) -> bool:
                history.append({"epoch": offset + epoch, **({"stage": stage} if stage else {}), **figures})
                self._update(job["id"], {"history": history})
                return not self._cancelled(job["id"])

            return on_epoch

        run = Run(
            job,
            self.client,
            self.settings,
            epochs,
            lambda fields: self._update(job["id"], fields),
            lambda: self._cancelled(job["id"]),
            self.retry_s,
            self.sleep,
        )
        return TunedLearner(run) if int(job["options"].get("fine_tune_layers") or 0) else HeadLearner(run)

    def _inputs(
        self,
        job_id: str,
        learner: Learner,
        count: int,
        image: Callable[[int], bytes],
        *,
        progress: str = "done",
    ) -> tuple[Inputs, dict[int, str]]:
        """The inputs of ``count`` images (``image(i)``: the bytes of the i-th),
        ``TRAINING_FEATURES_BATCH`` at a time (rows of unreadable ones stay zeros; none readable:
        empty), and the images that failed with why."""
        arrays: Inputs = []
        failed: dict[int, str] = {}
        size = self.settings.features_batch
        for start in range(0, count, size):
            if self._cancelled(job_id):
                raise Cancelled(job_id)
            batch = [image(i) for i in range(start, min(start + size, count))]
            outputs, readable, errors = learner.batch(batch)
            if outputs and not arrays:
                arrays = [np.zeros((count, *out.shape[1:]), np.float32) for out in outputs]
            for array, out in zip(arrays, outputs, strict=bool(outputs)):
                array[[start + k for k in readable]] = out
            failed.update({start + k: error for k, error in errors.items()})
            fields = {progress: min(start + size, count) - len(failed)}
            self._update(job_id, {**fields, "failed": len(failed)} if progress == "done" else fields)
        return arrays, failed

    def _readable(
        self,
        job_id: str,
        dataset: Dataset,
        labels: np.ndarray,
        rows: tuple[np.ndarray, np.ndarray],
        failed: dict[int, str],
    ) -> tuple[np.ndarray, np.ndarray]:
        """The split without the images that could not be read; these are listed in the record."""
        keep = np.array([i not in failed for i in range(len(dataset.items))])
        train_rows, held_rows = (r[keep[r]] for r in rows)
        skipped = dataset.skipped + [
            {"name": dataset.items[i]["name"], "reason": reason} for i, reason in sorted(failed.items())
        ]
        if len(np.unique(labels[train_rows])) < len(dataset.classes):
            raise TrainingFailed("after unreadable images were skipped, a class has no training image left")
        self._update(job_id, {"phase": "training", "skipped": skipped})
        return train_rows, held_rows

    def _publish(self, name: str, write: Callable[[Path], None], meta: dict[str, Any], owner: str) -> int:
        """Publish a version under the repository's lock, after every removal asked before it (a
        name deleted and trained again keeps its new version)."""
        root = Path(self.settings.models_dir)
        with repository.locked(root):
            if self.removals is not None:
                removals.carry_out(self.removals, root)
            # Nothing is published without its owner: not once the model was deleted (or its name
            # went to someone else) during the training.
            if not Owners(self.store.redis).publishable(name, owner):
                raise ModelDeleted(name)
            return repository.publish(root, name, write, meta)

    def _wait_served(self, base: str, name: str, version: int) -> bool:
        """Whether every ready replica of ``base`` serves ``name`` at ``version`` (or later) within
        the publish wait, asked of the replicas themselves; the gateways route it from the first
        request that names it (``Registry.base_of`` probes for a name it does not know)."""
        give_up = time.monotonic() + self.settings.publish_wait_s
        while self.settings.publish_wait_s > 0:
            if self.client.registry.serving(base, name, version):
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
        """Cancelled, gone, or its owner's key revoked (then cancelled here, as the job workers do).
        Raises ``TrainingFailed`` once the training has run for ``TRAINING_MAX_WALL_S``."""
        if self.clock() > self._give_up_at:
            raise TrainingFailed(
                f"the training ran for longer than TRAINING_MAX_WALL_S ({self.settings.max_wall_s:g} s); "
                "ask for fewer epochs or images"
            )
        try:
            job = self.store.get(job_id)
            if (
                job is not None
                and job.get("status") in ACTIVE
                and not self.is_live(str(job.get("owner") or "admin"))
            ):
                self.store.finish(job_id, "cancelled", {"phase": "cancelled", "error": "key_revoked"})
                return True
        except JobStoreUnavailable:
            return False  # cannot tell: go on, and look again at the next step
        return job is None or job.get("status") not in ACTIVE
