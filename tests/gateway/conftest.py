"""Shared fixtures of the gateway tests (the Redis server is in tests/conftest.py)."""
