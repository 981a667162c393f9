"""Client threads that keep sending requests while a test breaks or changes the fleet, recording
every answer for the checks afterwards."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import requests

from deploy.local.running import wait_until
from tests.e2e.running import E2EFleet
from tests.helpers import photo

CAT = photo("chelsea.jpg")
JPEG = {"Content-Type": "image/jpeg"}
Send = Callable[[requests.Session], requests.Response]


@dataclass(frozen=True)
class Outcome:
    kind: str
    status: int  # 0: no HTTP answer at all
    code: str = ""  # the error code, if any
    degraded: bool = False
    retry_after: str | None = None
    version: str = ""  # the model version that answered, when it has versions
    message: str = ""  # the error's message, if any


class Load:
    """Client threads sending requests in a loop until the block ends; every outcome is kept."""

    def __init__(self, kinds: dict[str, Send], threads_per_kind: int = 1, polite: bool = False) -> None:
        self.kinds = kinds
        self.threads_per_kind = threads_per_kind
        self.polite = polite  # wait Retry-After seconds after a refusal, as a good client does
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _loop(self, kind: str, send: Send) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                try:
                    response = send(session)
                except requests.RequestException as exc:
                    self.outcomes.append(Outcome(kind, 0, type(exc).__name__))
                    continue
                body = (
                    response.json()
                    if response.headers.get("Content-Type", "").startswith("application/json")
                    else {}
                )
                self.outcomes.append(
                    Outcome(
                        kind,
                        response.status_code,
                        body.get("error", {}).get("code", ""),
                        bool(body.get("degraded")),
                        response.headers.get("Retry-After"),
                        str(body.get("version") or ""),
                        str(body.get("error", {}).get("message", ""))[:160],
                    )
                )
                if self.polite and response.status_code in (429, 503):
                    self._stop.wait(float(response.headers.get("Retry-After", 1)))

    def __enter__(self) -> Load:
        for kind, send in self.kinds.items():
            for _ in range(self.threads_per_kind):
                thread = threading.Thread(target=self._loop, args=(kind, send), daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def of(self, kind: str, since: int = 0) -> list[Outcome]:
        return [o for o in self.outcomes[since:] if o.kind == kind]

    def wait_for(self, count: int, kind: str | None = None, since: int = 0, timeout_s: float = 120) -> None:
        """Until ``count`` more answers (of ``kind``) have come back: proof that load kept flowing."""
        wait_until(
            lambda: len(self.of(kind, since) if kind else self.outcomes[since:]) >= count,
            timeout_s,
            f"{count} answers{f' of {kind}' if kind else ''}",
        )


def predict(fleet: E2EFleet, query: str, **kwargs: object) -> Send:
    kwargs = kwargs or {"data": CAT, "headers": JPEG}
    return lambda session: session.post(f"{fleet.url}/v1/predict?{query}", timeout=60, **kwargs)


def failures(outcomes: list[Outcome], ok: int = 200) -> Counter[tuple[str, int, str]]:
    return Counter((o.kind, o.status, o.code) for o in outcomes if o.status != ok)
