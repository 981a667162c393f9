"""A training job's life without Celery: a real Redis, a job folder as the gateway writes it, real
Keras, and a fake base model whose features are the photos' colours (so a head can learn them)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from common import imaging, repository
from common.errors import InvalidImage, Overloaded, ServiceError
from common.jobs import upkeep
from common.jobs.store import JobStore
from common.jobs.views import describe
from common.tenancy.keys import ADMIN, Principal
from common.tenancy.owners import LEGACY, NameTaken, Owners
from common.training import dataset
from common.training.dataset import Entry
from common.training.settings import TrainingSettings
from fleet.answers import MemberReply
from serving import custom
from tests import colours
from tests.helpers import gateway_settings
from tests.workers.fakes import ScriptedClient
from workers.training.runner import TrainingRunner


class ColourFeatures(ScriptedClient):
    """``resnet50`` answers with features: each image's mean colour per quadrant (12 numbers)."""

    def __init__(self) -> None:
        super().__init__(gateway_settings())

    def answer(self, model: str, images: list[bytes], **kwargs: Any) -> MemberReply:
        assert kwargs["features"] and kwargs["priority"] == "background"
        results: list[dict[str, Any]] = []
        for i, data in enumerate(images):
            try:
                imaging.probe(data, imaging.ImageLimits())
            except ServiceError as exc:
                if len(images) == 1:
                    raise
                results.append({"index": i, "error": {**exc.to_dict(), "status": exc.status}})
                continue
            pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32)), np.float32)
            quadrants = [pixels[r : r + 16, c : c + 16].mean(axis=(0, 1)) for r in (0, 16) for c in (0, 16)]
            vector = np.concatenate(quadrants).astype("<f4")
            results.append(
                {
                    "index": i,
                    "predictions": [],
                    "features": {"data": base64.b64encode(vector.tobytes()).decode()},
                }
            )
        return MemberReply.from_json(
            {"model": model, "weights": "random", "weights_hash": "base-hash", "results": results}
        )


class SwappedMidway(ColourFeatures):
    """The base serves other weights from its second features call on (a new version swapped in)."""

    def __init__(self) -> None:
        super().__init__()
        self.answered = 0

    def answer(self, model: str, images: list[bytes], **kwargs: Any) -> MemberReply:
        self.answered += 1
        reply = super().answer(model, images, **kwargs)
        weights_hash = "base-hash" if self.answered == 1 else "new-hash"
        return dataclasses.replace(reply, served=dataclasses.replace(reply.served, weights_hash=weights_hash))


def settings(tmp_path: Path, **overrides: Any) -> TrainingSettings:
    return TrainingSettings(models_dir=str(tmp_path / "models"), publish_wait_s=0, **overrides)


def submit(
    store: JobStore, files: dict[str, bytes], name: str = "colours", owner: Principal = ADMIN, **options: Any
) -> str:
    """A training job as the gateway writes one, its name claimed for ``owner`` (unless it is)."""
    if Owners(store.redis, cache_s=0.01).of(name) is LEGACY:
        Owners(store.redis).claim(
            name,
            owner,
            "resnet50",
            fine_tuned=bool(options.get("fine_tune_layers")),
            public=False,
            quotas=None,
            total=1000,
        )
    staged = store.staging()
    (staged / "inputs").mkdir()
    found = []
    for n, (path, data) in enumerate(files.items()):
        (staged / "inputs" / f"{n:06d}").write_bytes(data)
        found.append(Entry(path, staged / "inputs" / f"{n:06d}"))
    checked = dataset.check(
        found, staged, imaging.ImageLimits(), min_images_per_class=2, max_classes=10, max_images=1000
    )
    checked.write(staged)
    job_id = uuid.uuid4().hex
    store.create(
        job_id,
        staged,
        {
            "kind": "training",
            "model": name,
            "owner": owner.id,
            "base": "resnet50",
            "options": {
                "epochs": 40,
                "validation_split": 0.25,
                "augment": False,
                "fine_tune_layers": 0,
                **options,
            },
            "classes": checked.classes,
            "counts": checked.counts(),
            "skipped": checked.skipped,
            "total": len(checked.items),
            "chunks": 0,
            "top_k": 0,
        },
    )
    return job_id


def photos(per_class: int, seed: int) -> dict[str, bytes]:
    return {f"{label}/{n}.jpg": image for n, (label, image) in enumerate(colours.images(per_class, seed))}


def test_a_training_job_trains_evaluates_and_publishes_version_1(store: JobStore, tmp_path: Path) -> None:
    client = ColourFeatures()
    runner = TrainingRunner(store, client, settings(tmp_path, features_batch=4))  # type: ignore[arg-type]
    job_id = submit(store, photos(8, seed=1))
    assert runner.run(job_id) == "completed"
    job = store.get(job_id)
    assert job is not None
    shown = describe(job)
    assert (shown["status"], shown["phase"], shown["progress"]) == ("completed", "done", 1.0)
    assert shown["features_done"] == 32 and shown["epoch"] == 40
    assert shown["evaluation"]["evaluated_on"] == "validation" and shown["evaluation"]["images"] == 8
    assert shown["evaluation"]["accuracy"] >= 0.85, shown["evaluation"]
    assert shown["served"] == {"name": "colours", "version": "1", "serving": False}
    assert shown["started_at"] < shown["published_at"] <= shown["finished_at"]
    head = custom.load(tmp_path / "models" / "colours" / "1", "colours", 1)
    assert head.meta["base_weights_hash"] == "base-hash" and head.meta["features"] == 12
    assert (
        head.meta["classes"] == ["blue", "green", "red", "yellow"]
        and head.meta["training"]["job_id"] == job_id
    )
    assert runner.run(job_id) == "completed"  # delivered twice: trained once
    assert len(list((tmp_path / "models" / "colours").iterdir())) == 1


def test_augmented_views_add_training_images(store: JobStore, tmp_path: Path) -> None:
    client = ColourFeatures()
    runner = TrainingRunner(store, client, settings(tmp_path, augment_views=2))  # type: ignore[arg-type]
    job_id = submit(store, photos(4, seed=2), augment=True, epochs=5)
    assert runner.run(job_id) == "completed"
    training = custom.load(tmp_path / "models" / "colours" / "1", "colours", 1).meta["training"]
    assert training["augmented_views"] == 2 * training["images"] == 24


def test_an_image_the_model_cannot_read_is_skipped_and_listed(store: JobStore, tmp_path: Path) -> None:
    client = ColourFeatures()
    runner = TrainingRunner(store, client, settings(tmp_path, features_batch=1))  # type: ignore[arg-type]
    files = photos(4, seed=3)
    job_id = submit(store, files)
    # It passed the header check at submission, then fails at the model (truncated after it).
    target = store.folder(job_id) / "inputs" / "000000"
    target.write_bytes(target.read_bytes()[:40])
    client.script = []
    state = runner.run(job_id)
    job = describe(store.get(job_id))  # type: ignore[arg-type]
    assert state == "completed", job["error"]
    assert job["features_failed"] == 1 and job["skipped"][-1]["name"] == "red/0.jpg"


def test_a_base_model_down_is_waited_for_then_fails_the_job_and_publishes_nothing(
    store: JobStore, tmp_path: Path
) -> None:
    slept: list[float] = []
    client = ColourFeatures()
    runner = TrainingRunner(store, client, settings(tmp_path), retry_s=10, sleep=slept.append)  # type: ignore[arg-type]
    client.script = [Overloaded("busy", retry_after=0)] * 2
    job_id = submit(store, photos(3, seed=4), epochs=3)
    assert runner.run(job_id) == "completed" and len(slept) == 2
    client.script = [ServiceError("down", status=503, code="model_unavailable")] * 1000
    runner = TrainingRunner(store, client, settings(tmp_path), retry_s=0.0, sleep=slept.append)  # type: ignore[arg-type]
    other = submit(store, photos(3, seed=5), name="other")
    assert runner.run(other) == "failed"
    job = describe(store.get(other))  # type: ignore[arg-type]
    assert "stayed unavailable" in job["error"] and not (tmp_path / "models" / "other").exists()


def test_cancelling_stops_it_before_the_next_call_and_nothing_is_published(
    store: JobStore, tmp_path: Path
) -> None:
    client = ColourFeatures()
    runner = TrainingRunner(store, client, settings(tmp_path, features_batch=2))  # type: ignore[arg-type]
    job_id = submit(store, photos(4, seed=6))
    client.after_call = lambda: store.cancel(job_id)
    assert runner.run(job_id) == "cancelled"
    assert client.calls_made == 1 and store.get(job_id)["status"] == "cancelled"  # type: ignore[index]
    assert not (tmp_path / "models" / "colours").exists()


def test_a_refused_request_fails_the_job(store: JobStore, tmp_path: Path) -> None:
    client = ColourFeatures()
    client.script = [InvalidImage("the service refused the batch")]
    runner = TrainingRunner(store, client, settings(tmp_path))  # type: ignore[arg-type]
    job_id = submit(store, photos(3, seed=7))
    assert runner.run(job_id) == "failed"
    assert "refused" in describe(store.get(job_id))["error"]  # type: ignore[arg-type]


def test_features_from_two_weights_fail_the_training_before_any_fitting(
    store: JobStore, tmp_path: Path
) -> None:
    runner = TrainingRunner(store, SwappedMidway(), settings(tmp_path, features_batch=4))  # type: ignore[arg-type]
    job_id = submit(store, photos(8, seed=1))
    assert runner.run(job_id) == "failed"
    job = describe(store.get(job_id))  # type: ignore[arg-type]
    assert "changed weights while features were computed" in job["error"]
    assert job["features_done"] == 4 and not job.get("epoch")  # the second batch, never the fit
    assert not (tmp_path / "models" / "colours").exists()


def test_a_failed_first_training_frees_its_name_and_a_later_one_keeps_it(
    store: JobStore, tmp_path: Path
) -> None:
    """A name is claimed when its training is accepted; if nothing was ever published under it
    and no other training of it is queued, the failure gives it back (and the owner's quota)."""
    owners = Owners(store.redis, cache_s=0.01)
    alice = Principal("a1b2c3d4e5f6", "alice", frozenset({"train"}))

    def claim(name: str) -> None:
        owners.claim(name, alice, "resnet50", fine_tuned=False, public=False, quotas=(5, 1), total=100)

    def failing_run(name: str) -> str:
        client = ColourFeatures()
        client.script = [InvalidImage("the service refused the batch")]
        runner = TrainingRunner(store, client, settings(tmp_path))  # type: ignore[arg-type]
        return runner.run(submit(store, photos(3, seed=7), name=name, owner=alice))

    claim("fresh")
    assert failing_run("fresh") == "failed" and owners.of("fresh") is LEGACY  # free again
    claim("queued")
    waiting = submit(store, photos(3, seed=8), name="queued", owner=alice)  # a second training of it, pending
    assert failing_run("queued") == "failed" and owners.of("queued").owner == alice.id
    store.cancel(waiting)
    claim("served")
    (tmp_path / "models" / "served" / "1").mkdir(parents=True)  # a version is published
    assert failing_run("served") == "failed" and owners.of("served").owner == alice.id


def test_the_watchdog_finds_a_training_job_whose_worker_died(store: JobStore, tmp_path: Path) -> None:
    job_id = submit(store, photos(3, seed=8))
    store.mark_running(job_id)
    assert upkeep.stalled_training(store, 60) == []
    store.redis.hset(store.key(job_id), "progress_at", time.time() - 120)
    assert upkeep.stalled_training(store, 60) == [job_id]
    assert upkeep.stalled(store, 60, pending_too=True) == []  # the inference watchdog leaves it alone
    assert store.finish(job_id, "failed", {"error": "worker died"}) == "failed"
    assert upkeep.stalled_training(store, 60) == []
    cancelled = submit(store, photos(3, seed=9), name="x")
    store.cancel(cancelled)
    assert store.finish(cancelled, "completed") == "cancelled"  # an ended job keeps its state


def test_a_job_publishing_its_model_can_no_longer_be_cancelled(store: JobStore, tmp_path: Path) -> None:
    job_id = submit(store, photos(3, seed=10))
    store.mark_running(job_id)
    assert not store.mark_running(job_id)  # a second delivery finds it taken
    store.update(job_id, {"phase": "publishing"})
    assert store.cancel(job_id) == "publishing"
    assert store.get(job_id)["status"] == "running"  # type: ignore[index]


def test_a_model_deleted_as_it_publishes_is_not_published_and_its_name_freed_after(
    store: JobStore, tmp_path: Path
) -> None:
    """Too late to cancel (publishing), the delete marks the name: the trainer publishes nothing
    without its owner, ends the job, and only then frees the name, so no one claims it before."""
    owners = Owners(store.redis, cache_s=0.01)
    alice = Principal("a1b2c3d4e5f6", "alice", frozenset({"train"}))
    bob = Principal("b1b2c3d4e5f6", "bob", frozenset({"train"}))
    client = ColourFeatures()
    runner = TrainingRunner(store, client, settings(tmp_path))  # type: ignore[arg-type]
    job_id = submit(store, photos(3, seed=12), name="pets", owner=alice)

    def deleted_meanwhile() -> None:  # what DELETE /v1/models/pets does while the job runs
        owners.mark_deleting("pets")
        with pytest.raises(NameTaken):  # the name is not free while its training is in flight
            owners.claim("pets", bob, "resnet50", fine_tuned=False, public=False, quotas=(5, 1), total=100)

    client.after_call = deleted_meanwhile
    assert runner.run(job_id) == "cancelled"
    assert "deleted" in describe(store.get(job_id))["error"]  # type: ignore[arg-type]
    assert not (tmp_path / "models" / "pets").exists()
    assert owners.of("pets") is LEGACY  # free now: bob may have it
    owners.claim("pets", bob, "resnet50", fine_tuned=False, public=False, quotas=(5, 1), total=100)


def test_a_revoked_keys_training_stops_at_its_next_step(store: JobStore, tmp_path: Path) -> None:
    revoked: set[str] = set()
    client = ColourFeatures()
    runner = TrainingRunner(
        store, client, settings(tmp_path, features_batch=2), is_live=lambda owner: owner not in revoked
    )  # type: ignore[arg-type]
    alice = Principal("a1b2c3d4e5f6", "alice", frozenset({"train"}))
    job_id = submit(store, photos(4, seed=13), name="alices", owner=alice)
    client.after_call = lambda: revoked.add(alice.id)
    assert runner.run(job_id) == "cancelled"
    assert store.get(job_id)["error"] == "key_revoked" and client.calls_made == 1  # type: ignore[index]
    assert not (tmp_path / "models" / "alices").exists() and Owners(store.redis).of("alices") is LEGACY


def test_an_unforeseen_error_fails_the_job_at_once_saying_what(store: JobStore, tmp_path: Path) -> None:
    client = ColourFeatures()
    runner = TrainingRunner(store, client, settings(tmp_path))  # type: ignore[arg-type]
    job_id = submit(store, photos(3, seed=11))
    (store.folder(job_id) / "dataset.json").write_text("{broken")
    assert runner.run(job_id) == "failed"
    error = describe(store.get(job_id))["error"]  # type: ignore[arg-type]
    assert "JSONDecodeError" in error and str(tmp_path) not in error and "internal error" in error


def test_an_unwritable_repository_fails_the_job_and_nothing_is_published(
    store: JobStore, tmp_path: Path
) -> None:
    client = ColourFeatures()
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the repository should be")
    runner = TrainingRunner(store, client, TrainingSettings(models_dir=str(blocked), publish_wait_s=0))  # type: ignore[arg-type]
    job_id = submit(store, photos(3, seed=12), epochs=2)
    assert runner.run(job_id) == "failed"
    error = describe(store.get(job_id))["error"]  # type: ignore[arg-type]
    assert "could not be written" in error and str(blocked) not in error  # the path is the log's


@pytest.mark.parametrize("name", ["../../etc", "a/b", "resnet50", "x" * 65, ""])
def test_a_record_whose_name_the_gateway_would_refuse_is_failed_not_trained(
    store: JobStore, tmp_path: Path, name: str
) -> None:
    """The gateway checked the name; the trainer checks again what Redis hands it."""
    runner = TrainingRunner(store, ColourFeatures(), settings(tmp_path))  # type: ignore[arg-type]
    job_id = submit(store, photos(3, seed=13), epochs=2)
    store.update(job_id, {"model": name})
    assert runner.run(job_id) == "failed"
    assert (store.get(job_id) or {})["error"] == "the job's model name or base is not valid"
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


def test_progress_never_brings_back_an_expired_record(store: JobStore) -> None:
    job_id = submit(store, photos(3, seed=13))
    store.redis.delete(store.key(job_id))
    store.update(job_id, {"phase": "features"})
    assert store.get(job_id) is None


# --- fine-tuning: the trainer's own copy of the base (real ResNet50, seeded random weights) ------


@pytest.fixture(scope="module")
def resnet50_hash() -> str:
    from services import resnet50
    from serving.runtime import build_keras_model, weights_digest
    from serving.weights import WeightsPlan

    return weights_digest(build_keras_model(resnet50.SPEC, WeightsPlan("random", seed=0)).get_weights())


def serving_base(client: ColourFeatures, weights_hash: str, **fields: Any) -> None:
    """The base as the registry would describe its ready replica (a ResNet50 service's ``/v1/model``)."""
    from serving.settings import ServiceSettings

    service = ServiceSettings()
    meta = {
        **fields,
        "weights": "random",
        "weights_source": "seed=0",
        "weights_hash": weights_hash,
        "input_size": 224,
        "preprocessing": "caffe",
        "builder": "ResNet50",
        "center_crop": service.center_crop,
        "max_image_bytes": service.max_image_bytes,
        "max_image_pixels": service.max_image_pixels,
    }
    client.registry.refresh = lambda: None  # type: ignore[method-assign]
    client.registry.metadata = lambda model: meta  # type: ignore[method-assign]


@pytest.mark.slow
def test_fine_tuning_trains_the_last_layers_and_publishes_a_whole_classifier(
    store: JobStore, tmp_path: Path, resnet50_hash: str
) -> None:
    import keras

    client = ColourFeatures()
    serving_base(client, resnet50_hash)
    runner = TrainingRunner(store, client, settings(tmp_path, fine_tune_epochs=3))  # type: ignore[arg-type]
    job_id = submit(store, photos(6, seed=1), epochs=20, fine_tune_layers=11)
    assert runner.run(job_id) == "completed", store.get(job_id)
    assert client.calls_made == 0  # no features from the service: the trainer ran its own copy
    job = store.get(job_id)
    assert job is not None
    shown = describe(job)
    assert shown["features_done"] == 24 and shown["epochs_total"] == 23
    stages = [(entry["epoch"], entry["stage"]) for entry in shown["history"]]
    assert stages == [(n, "head") for n in range(1, 21)] + [(n, "fine_tune") for n in range(21, 24)]
    assert shown["evaluation"]["images"] == 8 and shown["evaluation"]["accuracy"] >= 0.75, shown["evaluation"]
    folder = tmp_path / "models" / "colours" / "1"
    meta = json.loads((folder / repository.META_FILE).read_text())
    assert (meta["kind"], meta["base_weights_hash"], meta["features"]) == ("fine-tuned", resnet50_hash, 2048)
    assert meta["training"]["trained_layers"] == ["conv5_block3_1_conv", "avg_pool"]
    classifier = keras.models.load_model(folder / "model.keras", compile=False)
    assert classifier.input_shape == (None, 224, 224, 3) and classifier.output_shape == (None, 4)
    assert not (folder / repository.HEAD_FILE).exists()


@pytest.mark.slow
def test_fine_tuning_refuses_a_base_it_cannot_copy_or_cache(
    store: JobStore, tmp_path: Path, resnet50_hash: str
) -> None:
    client = ColourFeatures()
    serving_base(client, "other-weights")
    runner = TrainingRunner(store, client, settings(tmp_path))  # type: ignore[arg-type]
    job_id = submit(store, photos(3, seed=1), fine_tune_layers=11)
    assert runner.run(job_id) == "failed"
    assert "fine-tuning needs the weights the service loads" in (store.get(job_id) or {})["error"]
    serving_base(client, resnet50_hash)
    runner = TrainingRunner(store, client, settings(tmp_path, fine_tune_cache_mb=1))  # type: ignore[arg-type]
    job_id = submit(store, photos(3, seed=1), fine_tune_layers=11)
    assert runner.run(job_id) == "failed"
    assert "TRAINING_FINE_TUNE_CACHE_MB" in (store.get(job_id) or {})["error"]
    full = [{"name": "other", "kind": "fine-tuned"}]
    serving_base(client, resnet50_hash, max_fine_tuned=1, custom_models=full)
    job_id = submit(store, photos(3, seed=1), fine_tune_layers=11)
    assert runner.run(job_id) == "failed"
    assert "CUSTOM_MAX_FINE_TUNED" in (store.get(job_id) or {})["error"]
    assert not (tmp_path / "models" / "colours").exists()


def test_a_training_past_its_wall_clock_cap_fails_saying_so(store: JobStore, tmp_path: Path) -> None:
    """TRAINING_MAX_WALL_S: one tenant's long training cannot hold the trainer."""
    clock = [0.0]
    client = ColourFeatures()
    client.after_call = lambda: clock.__setitem__(0, 120.0)  # the first features call takes "two minutes"
    runner = TrainingRunner(
        store, client, settings(tmp_path, features_batch=2, max_wall_s=60), clock=lambda: clock[0]
    )  # type: ignore[arg-type]
    job_id = submit(store, photos(4, seed=14))
    assert runner.run(job_id) == "failed"
    assert "TRAINING_MAX_WALL_S" in describe(store.get(job_id))["error"]  # type: ignore[arg-type]
    assert client.calls_made == 1 and not (tmp_path / "models" / "colours").exists()


def test_a_base_that_does_not_describe_its_model_fails_the_training_clearly() -> None:
    from workers.training.learners import TrainingFailed, base_spec

    spec = base_spec("resnet50", {"input_size": 224, "preprocessing": "caffe", "builder": "ResNet50"})
    assert (spec.name, spec.input_size, spec.preprocessing, spec.builder) == (
        "resnet50",
        224,
        "caffe",
        "ResNet50",
    )
    with pytest.raises(TrainingFailed, match="does not describe its model"):
        base_spec("resnet50", {"weights": "random"})  # a service from before it said
