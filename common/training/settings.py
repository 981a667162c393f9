"""Training settings: ``TRAINING_<FIELD>``, read by the gateway (which checks and accepts training
jobs) and the training worker (which runs them). Where custom models are published is
``CUSTOM_MODELS_DIR``, the setting the model services read too: without it, ``POST /v1/training``
answers 503 ``training_unavailable``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from common.settings import load, setting


@dataclass(frozen=True)
class TrainingSettings:
    models_dir: str = setting(
        "", "read from CUSTOM_MODELS_DIR (not TRAINING_MODELS_DIR): where custom models are published"
    )
    queue: str = setting("training", "Celery queue of training tasks (never the inference jobs' queue)")
    min_images_per_class: int = setting(5, "fewest readable images a class needs")
    max_classes: int = setting(100, "most classes in one dataset")
    max_images: int = setting(5_000, "most images in one dataset")
    default_epochs: int = setting(60, "epochs when the request names none")
    max_epochs: int = setting(500, "most epochs a request may ask for")
    max_wall_s: float = setting(
        3600.0,
        "longest one training may run, features to publication; past it the job fails saying so, and "
        "the trainer takes the next (one tenant's long training cannot hold it)",
    )
    default_validation_split: float = setting(0.2, "share of each class held out for the evaluation")
    augment_views: int = setting(
        2, "extra views (flip, crop, exposure) of each training image when augment=true"
    )
    features_batch: int = setting(8, "images per call to the base model for features, at background priority")
    stall_s: float = setting(
        120.0,
        "a running training job whose heartbeat stopped this long ago (its trainer was killed) is "
        "marked failed; nothing was published",
    )
    publish_wait_s: float = setting(
        180.0,
        "how long a training job waits for the fleet to serve the new version before completing (a "
        "head is served within seconds; a fine-tuned model is converted and warmed first)",
    )
    remove_wait_s: float = setting(
        10.0,
        "how long DELETE /v1/models/<name> waits for the trainer to remove the model (200); past it, "
        "a 202: the removal stays queued until the trainer is back",
    )
    keep_versions: int = setting(
        2,
        "versions of a custom model kept once a new one is served (the newest ones; older ones are "
        "deleted - a fine-tuned version is a whole classifier, up to 530 MB)",
    )
    fine_tune_epochs: int = setting(
        10, "with fine_tune_layers > 0: epochs of the trained layers and the head together, after the head"
    )
    fine_tune_learning_rate: float = setting(
        1e-4, "with fine_tune_layers > 0: Adam's learning rate for those epochs (low: small steps)"
    )
    fine_tune_cache_mb: int = setting(
        1024,
        "with fine_tune_layers > 0: most memory the frozen layers' cached activations may take, "
        "counted twice (they and the training set made of them: images x views x the size at the "
        "cut x 2); a job over it fails saying so",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TrainingSettings:
        env = os.environ if environ is None else environ
        return load(cls, ("TRAINING_",), env, models_dir=env.get("CUSTOM_MODELS_DIR", ""))

    def __post_init__(self) -> None:
        if not 0 <= self.default_validation_split < 1:
            raise ValueError("TRAINING_DEFAULT_VALIDATION_SPLIT must be in [0, 1)")
        if self.keep_versions < 1:
            raise ValueError("TRAINING_KEEP_VERSIONS must be at least 1 (the version served)")
        if self.min_images_per_class < 2:
            raise ValueError("TRAINING_MIN_IMAGES_PER_CLASS must be at least 2 (one to train, one to test)")
