"""A small Python client for the imagerec fleet.

    from client import Client
    fleet = Client("http://localhost:8080")
    fleet.predict("cat.jpg", model="ensemble")["predictions"][0]["label"]

Retries follow the server: 429 and 503 are retried after the ``Retry-After`` it sends (urllib3's
``Retry``), connection failures with a jittered back-off; other errors raise ``ImagerecError``
carrying the fleet's JSON error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
from urllib3.util.retry import Retry

__all__ = ["Client", "ImagerecError"]


class ImagerecError(Exception):
    """An answer other than 200: ``status``, ``code``, ``message`` and ``request_id`` from its body."""

    def __init__(self, status: int, body: object) -> None:
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {"message": str(error or body)}
        self.status = status
        self.code = str(error.get("code", "error"))
        self.message = str(error.get("message", ""))
        self.request_id = str(error.get("request_id", ""))
        super().__init__(f"{status} {self.code}: {self.message}")


class Client:
    def __init__(
        self,
        url: str = "http://localhost:8080",
        *,
        timeout_s: float = 60.0,
        retries: int = 5,
        backoff_s: float = 0.2,
        pool: int = 16,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._retry = Retry(
            total=retries,
            connect=retries,
            read=0,  # a request that reached the fleet is not sent twice after a read failure
            status=retries,
            status_forcelist=(429, 503),
            allowed_methods=None,  # predictions are idempotent: POST may be retried
            backoff_factor=backoff_s,
            backoff_jitter=backoff_s,
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        self._pool = pool
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        """One session per thread (requests sessions are not thread-safe)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(max_retries=self._retry, pool_maxsize=self._pool)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    def _json(self, response: requests.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"code": "not_json", "message": response.text[:200]}}
        if response.status_code != 200:
            raise ImagerecError(response.status_code, body)
        return body

    def models(self) -> dict[str, Any]:
        return self._json(self.session.get(f"{self.url}/v1/models", timeout=self.timeout_s))

    def predict(
        self,
        image: bytes | str | Path,
        *,
        model: str = "resnet50",
        top_k: int = 5,
        vote: str | None = None,
        deadline_ms: int | None = None,
    ) -> dict[str, Any]:
        """Classify one image (bytes or a path) with a model or ``ensemble``."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        params: dict[str, str | int] = {"model": model, "top_k": top_k}
        if vote:
            params["vote"] = vote
        headers = {"Content-Type": "application/octet-stream"}
        if deadline_ms:
            headers["X-Deadline-Ms"] = str(deadline_ms)
        response = self.session.post(
            f"{self.url}/v1/predict", params=params, data=data, headers=headers, timeout=self.timeout_s
        )
        return self._json(response)

    def predict_many(
        self,
        paths: Iterable[Path],
        *,
        concurrency: int = 4,
        on_done: Callable[[], None] | None = None,
        **options: Any,
    ) -> Iterator[tuple[Path, dict[str, Any] | ImagerecError]]:
        """(path, answer or error) for every path, in order, ``concurrency`` requests at a time."""

        def one(path: Path) -> tuple[Path, dict[str, Any] | ImagerecError]:
            try:
                return path, self.predict(path, **options)
            except ImagerecError as exc:
                return path, exc
            except requests.RequestException as exc:
                return path, ImagerecError(0, {"error": {"code": "unreachable", "message": str(exc)}})
            finally:
                if on_done:
                    on_done()

        with ThreadPoolExecutor(concurrency) as pool:
            yield from pool.map(one, paths)
