"""The training worker: a training job from its dataset to a published, served custom model."""
