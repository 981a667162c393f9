"""Running one training job: features from the base model's service, a head fitted with Keras, its
evaluation, and its publication as the next version of the custom model. No Celery here
(``workers.app`` wraps it), so it is tested with a fake client and a real Redis.

Features: every image once (and ``TRAINING_AUGMENT_VIEWS`` more views of each training image with
``augment``), ``TRAINING_FEATURES_BATCH`` at a time at *batch* priority through the gateway's own
client, so interactive clients of the base model keep their latency. An image the service refuses
is skipped and listed; a model that is down or overloaded is waited for (its ``Retry-After``) up to
``JOBS_RETRY_S``. Every batch and every epoch updates the record, which is also the heartbeat the
stall watchdog reads. Cancelling stops the job before the next call or epoch; nothing is published.

Publication is the last step and is atomic (``serving.custom.publish``): a job that dies
before it publishes nothing, one that dies after leaves a complete version. The job then waits
(``TRAINING_PUBLISH_WAIT_S``) until a replica of the base lists the new version, plus one
gateway probe interval, so ``completed`` means the model answers through the gateway.
"""

from __future__ import annotations

import importlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from common import imaging, repository, wire
from common.errors import ServiceError, TooManyFineTuned
from common.jobs.store import ACTIVE, JobStore, JobStoreUnavailable
from common.models import BACKBONE_LAYERS, ModelSpec
from common.tenancy.owners import Owners
from common.training import removals
from common.training.dataset import Dataset
from common.training.settings import TrainingSettings
from fleet.client import ModelClient
from serving import preprocessing
from serving.runtime import build_keras_model
from serving.settings import ServiceSettings
from serving.weights import WeightsPlan
from workers.training import fit as train

log = logging.getLogger("imagerec.training")
RETRYABLE = (500, 502, 503, 504)


class Cancelled(Exception):
    """The training job was cancelled (or expired) while it ran."""


class TrainingFailed(Exception):
    """The job cannot succeed; the message says why (for the record)."""


@dataclass
class Learned:
    """What training produced, for ``model.json`` and ``repository.publish``."""

    kind: str  # "head" | "fine-tuned"
    evaluation: dict[str, Any]
    base_weights: str | None
    base_hash: str
    features: int
    counts: dict[str, Any]
    write: Callable[[Path], None]


Decoder = Callable[[bytes], np.ndarray]


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
    ) -> None:
        """``removals``: where the gateway asks for custom models to be removed (the job store's
        Redis; ``common.training.removals``), carried out before a publication."""
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
        try:
            with self._heartbeat(job_id):
                fields = self._train(job)
        except Cancelled:
            log.info("training cancelled", extra={"job_id": job_id})
            self._release_unpublished(job)
            return "cancelled"
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
        if (Path(self.settings.models_dir) / name).exists():
            return  # an earlier version serves: the name stays its owner's
        try:
            if any(
                other.get("kind") == "training" and other.get("model") == name and other["id"] != job["id"]
                for other in self.store.active()
            ):
                return
            Owners(self.store.redis).release(name)
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
        rows = train.split(labels, float(options["validation_split"]))
        learn = self._learn_tuned if int(options.get("fine_tune_layers") or 0) else self._learn_head
        learned = learn(job, folder, dataset, labels, rows)
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
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if learned.kind == repository.FINE_TUNED:  # others may have been trained meanwhile
            self.client.registry.refresh()
            self._check_room(job)
        # From "publishing" on, a cancel is refused (the store's cancel script): check once more
        # after setting it, so a cancel that came first is honoured and none comes after.
        self._update(job_id, {"phase": "publishing"})
        if self._cancelled(job_id):
            raise Cancelled(job_id)
        try:
            version = self._publish(job["model"], learned.write, meta)
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

    def _learn_head(
        self,
        job: dict[str, Any],
        folder: Path,
        dataset: Dataset,
        labels: np.ndarray,
        rows: tuple[np.ndarray, np.ndarray],
    ) -> Learned:
        """A softmax layer on the frozen base's features, which the base's service computes."""
        job_id, base, options = job["id"], job["base"], job["options"]
        self._update(job_id, {"phase": "features"})
        features, base_hash, failed = self._features(job_id, base, folder, dataset.items)
        extra_x: list[np.ndarray] = []
        extra_y: list[np.ndarray] = []
        if options.get("augment") and self.settings.augment_views:
            extra_x, extra_y, seen = self._augmented(job_id, base, folder, dataset, rows[0], failed)
            if seen - {"", base_hash}:
                raise TrainingFailed(f"{base} changed weights while features were computed: train again")
        train_rows, held_rows = self._readable(job_id, dataset, labels, rows, failed)
        x = np.concatenate([features[train_rows], *extra_x]) if extra_x else features[train_rows]
        y = np.concatenate([labels[train_rows], *extra_y]) if extra_y else labels[train_rows]
        fitted = train.fit(
            x,
            y,
            len(dataset.classes),
            int(options["epochs"]),
            (features[held_rows], labels[held_rows]) if len(held_rows) else None,
            self._epochs(job_id, []),
        )
        if self._cancelled(job_id):
            raise Cancelled(job_id)
        self._update(job_id, {"phase": "evaluating"})
        evaluated, evaluated_on = (held_rows, "validation") if len(held_rows) else (train_rows, "training")
        evaluation = {
            "evaluated_on": evaluated_on,
            **train.evaluate(fitted.probabilities(features[evaluated]), labels[evaluated], dataset.classes),
        }
        registry = self.client.registry
        registry.refresh()
        base_meta = registry.metadata(base)
        if base_meta.get("weights_hash") not in (None, base_hash):
            raise TrainingFailed(
                f"{base} now serves other weights ({base_meta['weights_hash']}) than the features were "
                f"computed with ({base_hash}): the model would be stale at once; train again"
            )
        return Learned(
            kind="head",
            evaluation=evaluation,
            base_weights=base_meta.get("weights"),
            base_hash=base_hash,
            features=int(features.shape[1]),
            counts=self._counts(train_rows, held_rows, extra_y),
            write=repository.write_head(fitted.kernel, fitted.bias),
        )

    def _learn_tuned(
        self,
        job: dict[str, Any],
        folder: Path,
        dataset: Dataset,
        labels: np.ndarray,
        rows: tuple[np.ndarray, np.ndarray],
    ) -> Learned:
        """The base's last ``fine_tune_layers`` layers and a head, trained together here with
        Keras (``workers.training.finetune``) on a copy of the base the trainer builds itself - from
        the weights the base's service names - and checks against the served weights' hash."""
        from serving.runtime import weights_digest
        from workers.training import finetune

        job_id, base, options = job["id"], job["base"], job["options"]
        self._update(job_id, {"phase": "features"})
        base_meta = self._ready_base(base)
        self._check_room(job)
        spec = importlib.import_module(f"services.{base}").SPEC
        plan = self._served_plan(base, base_meta)
        model = build_keras_model(spec, plan)
        base_hash = weights_digest(model.get_weights())
        if base_hash != base_meta.get("weights_hash"):
            raise TrainingFailed(
                f"the trainer's copy of {base} ({plan.kind} weights) has "
                f"weights {base_hash}, but {base} serves {base_meta.get('weights_hash')}: fine-tuning "
                f"needs the weights the service loads (the same file, or the same seed)"
            )
        part = finetune.cut(model, int(options["fine_tune_layers"]))
        views = self.settings.augment_views if options.get("augment") else 0
        cached = len(dataset.items) + views * len(rows[0])
        # Held twice at the peak: the activations, and the training and held-out sets made from
        # them (then the activations go, and Keras copies the training set once).
        needed_mb = 2 * cached * part.bytes_per_image() / 2**20
        if needed_mb > self.settings.fine_tune_cache_mb:
            raise TrainingFailed(
                f"the frozen layers' activations for {cached} images would take {needed_mb:.0f} MB "
                f"(counted twice: they and the training set made of them), over "
                f"TRAINING_FINE_TUNE_CACHE_MB ({self.settings.fine_tune_cache_mb}): fine-tune fewer "
                f"layers (a deeper cut is smaller), or train on fewer images"
            )
        decode, items = self._decoder(spec, base_meta), dataset.items
        acts, failed = self._activations(
            job_id, part, decode, lambda i: (folder / items[i]["file"]).read_bytes(), len(items)
        )
        extra_acts: list[list[np.ndarray]] = []
        extra_y: list[np.ndarray] = []
        if views:  # more views of each readable training image, made as they are needed
            rng = np.random.default_rng(0)
            wanted = np.array([i for i in rows[0].tolist() if i not in failed for _ in range(views)], int)
            extra, unread = self._activations(
                job_id,
                part,
                decode,
                lambda j: train.augmented((folder / items[wanted[j]]["file"]).read_bytes(), rng),
                len(wanted),
                progress="augmented",
            )
            kept = np.array([j for j in range(len(wanted)) if j not in unread], int)
            extra_acts, extra_y = [[a[kept] for a in extra]], [labels[wanted[kept]]]
            del extra
        train_rows, held_rows = self._readable(job_id, dataset, labels, rows, failed)
        x = [np.concatenate([a[train_rows], *(e[k] for e in extra_acts)]) for k, a in enumerate(acts)]
        y = np.concatenate([labels[train_rows], *extra_y]) if extra_y else labels[train_rows]
        held = ([a[held_rows] for a in acts], labels[held_rows]) if len(held_rows) else None
        # Evaluated on the held-out photos, or on the training photos (not their views) without any.
        evaluated = held or ([a[: len(train_rows)] for a in x], labels[train_rows])
        del acts, extra_acts  # the sets above are all training needs
        epochs, tuning_epochs = int(options["epochs"]), self.settings.fine_tune_epochs
        self._update(job_id, {"epochs_total": epochs + tuning_epochs, "stage": "head"})
        history: list[dict[str, Any]] = []
        features = finetune.features(part.trained, x)
        fitted = train.fit(
            features,
            y,
            len(dataset.classes),
            epochs,
            (finetune.features(part.trained, held[0]), held[1]) if held else None,
            self._epochs(job_id, history, stage="head"),
        )
        if self._cancelled(job_id):
            raise Cancelled(job_id)
        self._update(job_id, {"stage": "fine_tune"})
        tuned = finetune.fine_tune(
            part,
            fitted,
            x,
            y,
            tuning_epochs,
            self.settings.fine_tune_learning_rate,
            held,
            self._epochs(job_id, history, stage="fine_tune", offset=epochs),
        )
        if self._cancelled(job_id):
            raise Cancelled(job_id)
        self._update(job_id, {"phase": "evaluating"})
        evaluation = {
            "evaluated_on": "validation" if held else "training",
            **train.evaluate(tuned.probabilities(evaluated[0]), evaluated[1], dataset.classes),
        }
        classifier = finetune.classifier(part, tuned)
        return Learned(
            kind=repository.FINE_TUNED,
            evaluation=evaluation,
            base_weights=base_meta.get("weights"),
            base_hash=base_hash,
            features=int(features.shape[1]),
            counts={
                **self._counts(train_rows, held_rows, extra_y),
                "fine_tune_epochs": tuning_epochs,
                "fine_tune_learning_rate": self.settings.fine_tune_learning_rate,
                "trained_layers": [part.layer_names[0], part.layer_names[-1]],
            },
            write=lambda target: classifier.save(target / repository.MODEL_FILE),
        )

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

    @staticmethod
    def _counts(train_rows: np.ndarray, held_rows: np.ndarray, extra_y: list[np.ndarray]) -> dict[str, int]:
        return {
            "images": int(len(train_rows)),
            "augmented_views": int(sum(len(e) for e in extra_y)),
            "held_out": int(len(held_rows)),
        }

    def _epochs(
        self, job_id: str, history: list[dict[str, Any]], *, stage: str = "", offset: int = 0
    ) -> Callable[[int, dict[str, float]], bool]:
        """The ``on_epoch`` of a fit: each epoch's figures into the record; False once cancelled."""

        def on_epoch(epoch: int, figures: dict[str, float]) -> bool:
            history.append({"epoch": offset + epoch, **({"stage": stage} if stage else {}), **figures})
            self._update(job_id, {"history": history})
            return not self._cancelled(job_id)

        return on_epoch

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

    # --- fine-tuning: the trainer's own copy of the base ----------------------------------------

    def _ready_base(self, base: str) -> dict[str, Any]:
        """What a ready replica of ``base`` says of itself, waiting up to ``JOBS_RETRY_S`` for one."""
        registry, give_up = self.client.registry, time.monotonic() + self.retry_s
        while True:
            registry.refresh()
            if found := registry.metadata(base):
                return found
            if time.monotonic() >= give_up:
                raise TrainingFailed(f"{base} had no ready replica for {self.retry_s:g}s")
            self.sleep(1.0)

    def _check_room(self, job: dict[str, Any]) -> None:
        """Fail a fine-tuning the base's service would not load (``CUSTOM_MAX_FINE_TUNED``)."""
        try:
            self.client.registry.check_room_for_fine_tuned(job["base"], job["model"])
        except TooManyFineTuned as exc:
            raise TrainingFailed(exc.message) from None

    @staticmethod
    def _served_plan(base: str, meta: dict[str, Any]) -> WeightsPlan:
        """The weights the base's service loaded, as it names them: a seed, or a file the trainer
        must be able to read at the same path (the Keras cache, the model repository)."""
        kind, source = str(meta.get("weights")), str(meta.get("weights_source") or "")
        if kind == "random":
            return WeightsPlan("random", seed=int(source.removeprefix("seed=") or 0))
        path = Path(source)
        if not path.is_file():
            log.warning("base weights unreadable", extra={"base": base, "path": source})
            raise TrainingFailed(
                f"{base} loads its weights from a file the trainer cannot read (its log names it): "
                "give the trainer the same file at the same path (as the model services mount it)"
            )
        return WeightsPlan(kind, path)

    @staticmethod
    def _decoder(spec: ModelSpec, meta: dict[str, Any]) -> tuple[Decoder, Callable[[np.ndarray], np.ndarray]]:
        """Photos to pixels as the base's service makes them (its size, crop and image limits),
        and its preprocessing."""
        service = ServiceSettings.from_env(spec.name)
        limits = imaging.ImageLimits(service.max_image_bytes, service.max_image_pixels)
        size = int(meta.get("input_size") or spec.input_size)
        crop = float(meta.get("center_crop") or service.center_crop)
        return (lambda data: imaging.load_pixels(data, size, limits, crop)), preprocessing.get(
            spec.preprocessing
        )

    def _activations(
        self,
        job_id: str,
        part: Any,
        decode: tuple[Decoder, Callable[[np.ndarray], np.ndarray]],
        images: Callable[[int], bytes],
        count: int,
        *,
        progress: str = "done",
    ) -> tuple[list[np.ndarray], dict[int, str]]:
        """The frozen layers' activations for ``count`` images (``images(i)``: the bytes of the
        i-th), ``TRAINING_FEATURES_BATCH`` at a time; rows of unreadable ones stay zeros."""
        from workers.training import finetune

        pixels_of, preprocess = decode
        acts = [np.zeros((count, *t.shape[1:]), np.float32) for t in part.trained.inputs]
        failed: dict[int, str] = {}
        size = self.settings.features_batch
        for start in range(0, count, size):
            if self._cancelled(job_id):
                raise Cancelled(job_id)
            rows, pixels = [], []
            for i in range(start, min(start + size, count)):
                try:
                    pixels.append(pixels_of(images(i)))
                    rows.append(i)
                except ServiceError as exc:
                    failed[i] = exc.message
            if rows:
                for array, out in zip(
                    acts, finetune.activations(part.frozen, preprocess(np.stack(pixels))), strict=True
                ):
                    array[rows] = out
            fields = {progress: min(start + size, count) - len(failed)}
            self._update(job_id, {**fields, "failed": len(failed)} if progress == "done" else fields)
        return acts, failed

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
                vectors.append(wire.decode_vector(result["features"]).copy())
                errors.append("")
            else:
                vectors.append(None)
                errors.append(str(result.get("error", {}).get("message", "not readable")))
        return vectors, errors, str(reply.get("weights_hash", ""))

    def _publish(self, name: str, write: Callable[[Path], None], meta: dict[str, Any]) -> int:
        """Publish a version under the repository's lock, after every removal asked before it (a
        name deleted and trained again keeps its new version)."""
        root = Path(self.settings.models_dir)
        with repository.locked(root):
            if self.removals is not None:
                removals.carry_out(self.removals, root)
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
        try:
            job = self.store.get(job_id)
        except JobStoreUnavailable:
            return False  # cannot tell: go on, and look again at the next step
        return job is None or job.get("status") not in ACTIVE
