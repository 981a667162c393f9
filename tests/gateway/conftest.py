"""Shared fixtures of the gateway tests (the Redis server and the trainer's removal loop are in
tests/conftest.py)."""
