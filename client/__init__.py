"""A small Python client for the imagerec fleet.

    from client import Client
    fleet = Client("http://localhost:8080", api_key="irk_...")  # the key: jobs, training, keys
    fleet.predict("cat.jpg", model="ensemble")["predictions"][0]["label"]
    job = fleet.submit_job("photos/", model="resnet50")  # a folder or a zip/tar: a batch job
    fleet.wait_for_job(job["job_id"])["status"]
    job = fleet.train("pets/", name="pets")  # one folder per class: a training job, then a model

Without ``api_key`` the client predicts anonymously; ``find_key()`` is what the command line uses:
``IMAGEREC_API_KEY``, else the admin key ``make run`` wrote into ``run/admin.key``.

Retries follow the server: 429 and 503 are retried after the ``Retry-After`` it sends (urllib3's
``Retry``), connection failures with a jittered back-off; other errors raise ``ImagerecError``
carrying the fleet's JSON error.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import requests
from urllib3.util.retry import Retry

from client import upload

__all__ = ["ACTIVE_JOB_STATES", "Client", "ImagerecError", "find_key"]

ADMIN_KEY_FILE = Path(__file__).resolve().parents[1] / "run" / "admin.key"


def find_key(environ: dict[str, str] | None = None, admin_file: Path = ADMIN_KEY_FILE) -> str | None:
    """``IMAGEREC_API_KEY``, else the admin key of a fleet ``make run`` started from this checkout
    (``run/admin.key``, readable by whoever started it), else None (anonymous)."""
    import os

    env = os.environ if environ is None else environ
    if env.get("IMAGEREC_API_KEY"):
        return env["IMAGEREC_API_KEY"].strip()
    try:
        return admin_file.read_text().strip() or None
    except OSError:
        return None


ACTIVE_JOB_STATES = ("pending", "running")
"""A job in any other state (completed, failed, cancelled) has finished."""


class ImagerecError(Exception):
    """An answer other than 200: ``status``, ``code``, ``message``, ``request_id`` and ``problems``
    (each reason a refusal gives, such as a training dataset's; often none) from its body."""

    def __init__(self, status: int, body: object) -> None:
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {"message": str(error or body)}
        self.status = status
        self.code = str(error.get("code", "error"))
        self.message = str(error.get("message", ""))
        self.request_id = str(error.get("request_id", ""))
        problems = error.get("problems")
        self.problems = [str(p) for p in problems] if isinstance(problems, list) else []
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
        api_key: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
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
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
            self._local.session = session
        return session

    def _json(self, response: requests.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"code": "not_json", "message": response.text[:200]}}
        if not 200 <= response.status_code < 300:
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
        parents: bool = False,
        confidence: float | None = None,
        min_score: float | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Classify one image (bytes or a path) with a model or ``ensemble``. ``parents``: each
        label's ancestors and categories; ``confidence``: the hedged answer (``hedged``);
        ``include`` / ``exclude``: class ids, ancestor ids, class names or categories."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        params: dict[str, str | int | float] = {"model": model, "top_k": top_k}
        if vote:
            params["vote"] = vote
        if parents:
            params["parents"] = "true"
        for key, value in (("confidence", confidence), ("min_score", min_score)):
            if value is not None:
                params[key] = value
        for key, names in (("include", include), ("exclude", exclude)):
            if names:
                params[key] = ",".join(names)
        headers = {"Content-Type": "application/octet-stream"}
        if deadline_ms:
            headers["X-Deadline-Ms"] = str(deadline_ms)
        response = self.session.post(
            f"{self.url}/v1/predict", params=params, data=data, headers=headers, timeout=self.timeout_s
        )
        return self._json(response)

    def explain(
        self,
        image: bytes | str | Path,
        *,
        model: str = "resnet50",
        grid: int | None = None,
        class_id: str | None = None,
    ) -> dict[str, Any]:
        """Where in the photo the score of ``class_id`` (default: the top class) comes from: the
        grid of score drops, the forward passes it cost and ``overlay_png`` (base64)."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        params: dict[str, str | int] = {"model": model}
        if grid:
            params["grid"] = grid
        if class_id:
            params["class_id"] = class_id
        response = self.session.post(
            f"{self.url}/v1/explain",
            params=params,
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            timeout=self.timeout_s,
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

    # --- asynchronous batch jobs ---------------------------------------------------------------

    def submit_job(
        self,
        source: str | Path,
        *,
        model: str = "resnet50",
        models: Sequence[str] = (),
        vote: str | None = None,
        top_k: int | None = None,
        callback_url: str | None = None,
    ) -> dict[str, Any]:
        """Start a job on a folder (zipped on the fly into a temporary file) or a zip/tar archive
        (sent as it is); returns the job as accepted (``job_id``, ``status``, ``total``, ...).

        ``models`` (an ensemble of those members) takes the place of ``model``. Raises ``ValueError``
        for a folder without files and ``OSError`` for a path that cannot be read.
        """
        params: dict[str, str | int] = {"models": ",".join(models)} if models else {"model": model}
        for key, value in (("vote", vote), ("top_k", top_k), ("callback_url", callback_url)):
            if value:
                params[key] = value
        return self._send_archive("/v1/jobs", "archive", Path(source), params)

    def job_status(self, job_id: str) -> dict[str, Any]:
        """The job's state and progress (``status``, ``done``, ``failed``, ``total``, ``eta_s``, ...)."""
        return self._json(self.session.get(self._job_url(job_id), timeout=self.timeout_s))

    def wait_for_job(
        self,
        job_id: str,
        *,
        interval_s: float = 1.0,
        timeout_s: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll the job every ``interval_s`` until it has finished; returns it as it ended.

        ``on_update`` is called with every state seen, the last one included. Raises ``TimeoutError``
        when ``timeout_s`` passes first (the job carries on).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job_status(job_id)
            if on_update:
                on_update(job)
            if job["status"] not in ACTIVE_JOB_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout_s} s")
            time.sleep(interval_s)

    def job_results(self, job_id: str, out: IO[bytes], *, format: str = "json") -> str:
        """Stream the job's results (``json``, ``jsonl`` or ``csv``, in input order) into ``out``.

        Returns the job's status when they were read: a pending or running job's results are partial.
        """
        with self.session.get(
            f"{self._job_url(job_id)}/results", params={"format": format}, stream=True, timeout=self.timeout_s
        ) as response:
            if response.status_code != 200:
                self._json(response)  # raises the fleet's error
            for chunk in response.iter_content(1 << 16):
                out.write(chunk)
            return response.headers.get("X-Job-Status", "")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel a pending or running job (its results so far stay readable); returns the job."""
        return self._json(self.session.delete(self._job_url(job_id), timeout=self.timeout_s))

    def list_jobs(self, *, limit: int = 20, before: str | None = None) -> dict[str, Any]:
        """Recent jobs, newest first: ``{"jobs": [...], "next": <path of the next page> or None}``."""
        params: dict[str, str | int] = {"limit": limit, **({"before": before} if before else {})}
        return self._json(self.session.get(f"{self.url}/v1/jobs", params=params, timeout=self.timeout_s))

    def _job_url(self, job_id: str) -> str:
        return f"{self.url}/v1/jobs/{quote(job_id, safe='')}"

    def _send_archive(
        self, route: str, field: str, path: Path, params: dict[str, str | int]
    ) -> dict[str, Any]:
        """POST a folder (zipped on the fly into a temporary file, paths relative to it) or an
        archive (as it is) as the multipart part ``field``, streamed from disk."""
        with ExitStack() as stack:
            if path.is_dir():
                archive: IO[bytes] = stack.enter_context(tempfile.TemporaryFile())
                if not upload.zip_folder(path, archive):
                    raise ValueError(f"no files under {path}")
                filename = f"{path.resolve().name or 'folder'}.zip"
            else:
                archive = stack.enter_context(path.open("rb"))
                filename = path.name
            body = upload.MultipartFile(field, filename, archive)
            response = self.session.post(
                f"{self.url}{route}",
                params=params,
                data=body,
                headers={"Content-Type": body.content_type},
                timeout=self.timeout_s,
            )
        return self._json(response)

    # --- custom models -------------------------------------------------------------------------

    def train(
        self,
        source: str | Path,
        *,
        name: str,
        base: str = "resnet50",
        epochs: int | None = None,
        validation_split: float | None = None,
        augment: bool = False,
        fine_tune_layers: int = 0,
        public: bool = False,
    ) -> dict[str, Any]:
        """Start training the custom model ``name`` on ``base`` from a folder of one folder per class
        (zipped on the fly) or a zip/tar of those; returns the training job as accepted (``job_id``,
        ``classes``, ``counts``, ``skipped``, ...). Follow it with ``wait_for_job``.
        ``fine_tune_layers`` > 0 trains the base's last layers too (a model with its own backbone).

        The options go in the query, which the fleet checks before it reads the upload. Raises
        ``ImagerecError`` for a refusal (its ``problems`` name each reason), ``ValueError`` for a
        folder without files and ``OSError`` for a path that cannot be read.
        """
        params: dict[str, str | int] = {"name": name, "base": base}
        if epochs is not None:
            params["epochs"] = epochs
        if validation_split is not None:
            params["validation_split"] = str(validation_split)
        if augment:
            params["augment"] = "true"
        if fine_tune_layers:
            params["fine_tune_layers"] = fine_tune_layers
        if public:
            params["public"] = "true"
        return self._send_archive("/v1/training", "dataset", Path(source), params)

    def share_model(self, name: str, public: bool = True) -> dict[str, Any]:
        """Make the custom model ``name`` public (every caller may use it) or private again."""
        url = f"{self.url}/v1/models/{quote(name, safe='')}"
        return self._json(self.session.patch(url, json={"public": public}, timeout=self.timeout_s))

    # --- keys (admin) ---------------------------------------------------------------------------

    def create_key(
        self, name: str, scopes: Sequence[str] = ("predict",), quotas: dict[str, int] | None = None
    ) -> dict[str, Any]:
        """A new key: ``key`` (the secret, shown this once), ``id``, ``name``, ``scopes``, ``quotas``."""
        body = {"name": name, "scopes": list(scopes), "quotas": quotas or {}}
        return self._json(self.session.post(f"{self.url}/v1/keys", json=body, timeout=self.timeout_s))

    def list_keys(self) -> list[dict[str, Any]]:
        return list(self._json(self.session.get(f"{self.url}/v1/keys", timeout=self.timeout_s))["keys"])

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        url = f"{self.url}/v1/keys/{quote(key_id, safe='')}"
        return self._json(self.session.delete(url, timeout=self.timeout_s))

    def delete_model(self, name: str) -> dict[str, Any]:
        """Remove the custom model ``name``, every version: ``{"deleted": name}``."""
        url = f"{self.url}/v1/models/{quote(name, safe='')}"
        return self._json(self.session.delete(url, timeout=self.timeout_s))
