"""One package per model service; each is a ``ModelSpec`` on top of ``serving.app``."""
