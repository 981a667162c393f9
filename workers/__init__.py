"""The job workers: Celery processes that run asynchronous jobs' chunks against the model
services (``celery -A workers.app worker``). They never load a model themselves."""
