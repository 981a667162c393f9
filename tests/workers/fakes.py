"""A fake model client for the workers: scripted errors first, a hook after every call."""

from __future__ import annotations

from typing import Any

from common.errors import ServiceError
from fleet.answers import MemberReply
from tests.gateway.fakes import FakeModelClient


class ScriptedClient(FakeModelClient):
    """Raises the scripted errors on the first calls, then answers (``answer``); ``after_call``
    runs after each call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.script: list[ServiceError] = []
        self.after_call = lambda: None
        self.calls_made = 0

    def predict(self, model: str, images: list[bytes], **kwargs: Any) -> MemberReply:
        self.calls_made += 1
        try:
            if self.script:
                raise self.script.pop(0)
            return self.answer(model, images, **kwargs)
        finally:
            self.after_call()

    def answer(self, model: str, images: list[bytes], **kwargs: Any) -> MemberReply:
        return super().predict(model, images, **kwargs)
