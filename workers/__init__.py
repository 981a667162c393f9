"""The Celery workers: the job workers run asynchronous jobs' chunks against the model services
(``celery -A workers.app worker``), and the trainer learns custom models and is the model
repository's one writer (``workers/training/``)."""
