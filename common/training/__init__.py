"""The training contract between the gateway (which checks and accepts a training job) and the
trainer (which runs it): the training settings and the dataset a job trains on."""
