"""What a model service serves, and how versions come and go (TF Serving's manager, in small).

A service serves its base model and the custom models trained on it, each from a folder of the one
layout ``common.repository`` describes: the base's versions in ``MODEL_REPOSITORY``, custom models
in ``CUSTOM_MODELS_DIR``. Both are handled the same way:

- **One poller** looks at both folders every ``REPOSITORY_POLL_S`` (and the admin endpoint asks
  for the base's newest version at once).
- **One loader**, a thread of its own, loads every runtime - the base at start-up, a new base
  version, a fine-tuned custom model - one at a time, off the serving path: requests, the poll and
  start-up never wait for one. What it loads is checked, warmed and timed before it serves, and the
  version before it serves meanwhile (``loading()`` lists the custom models it holds). A head is
  two arrays: it loads in the poll itself, in milliseconds.
- **One identity rule**: a version is its number plus its folder's inode and modification time
  (``common.repository.Identity``), so a model removed and trained again at version 1 is new.
- **One swap-and-drain**: a new version replaces the old in one assignment; the old one's batcher
  answers what it had queued, then stops (``Batcher.close``), and a request that found it just
  before is sent to its successor (``BatcherClosed``, in ``serving.app``).
- A version that does not load is listed as broken and not tried again (the poll's; the admin
  endpoint tries again); the one before it serves on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import labels as labels_mod
from common import repository
from common.errors import BadRequest, ServiceError
from common.repository import FINE_TUNED, META_FILE, Identity
from serving import custom
from serving.custom import Custom, FineTuned, Head
from serving.loaded import LoadedModel

log = logging.getLogger(__name__)

BuildBase = Callable[[int | None], LoadedModel]
"""A base model, not loaded yet: the repository's version ``n``, or (None) what WEIGHTS names."""
LoadFineTuned = Callable[[Path, str, int, dict[str, Any], labels_mod.Labels], FineTuned]
"""A fine-tuned custom model's version, loaded (on the loader thread)."""


class OverLimit(ValueError):
    """The service already serves ``CUSTOM_MAX_FINE_TUNED`` fine-tuned models."""


class ModelManager:
    def __init__(
        self,
        base: str,
        build_base: BuildBase,
        *,
        versions_dir: str = "",
        custom_dir: str = "",
        load_fine_tuned: LoadFineTuned | None = None,
        max_fine_tuned: int = 2,
    ) -> None:
        self.name = base
        self.versions_dir = Path(versions_dir) if versions_dir else None
        self.custom_dir = Path(custom_dir) if custom_dir else None
        self.build_base = build_base
        self.load_fine_tuned = load_fine_tuned
        self.max_fine_tuned = max_fine_tuned
        newest = self._newest_base()
        self._base = build_base(newest[0][0] if newest else None)
        self._base_identity: Identity | None = newest[0] if newest else None
        self._custom: dict[str, Custom] = {}
        # Per name (the base's own name included): what serves, what loads, what did not load.
        self._served: dict[str, Identity] = {}
        self._loading: dict[str, Future[Any]] = {}
        self._loading_identity: dict[str, Identity] = {}
        self._failed: dict[str, Identity] = {}
        self._broken: dict[str, str] = {}
        self._lock = threading.RLock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"loader-{base}")

    # --- what serves ----------------------------------------------------------------------------

    @property
    def base(self) -> LoadedModel:
        """The base model's version serving now."""
        return self._base

    def get(self, name: str) -> Custom | None:
        return self._custom.get(name)

    def all(self) -> list[Custom]:
        return sorted(self._custom.values(), key=lambda model: model.name)

    def loading(self) -> dict[str, int]:
        """Custom models' versions on the loader (name -> version)."""
        return {n: identity[0] for n, identity in self._loading_identity.items() if n != self.name}

    def broken(self) -> dict[str, str]:
        """Custom models whose newest version does not load, with why (an older one may serve)."""
        return {name: reason for name, reason in self._broken.items() if name != self.name}

    def versions(self) -> list[int]:
        return repository.versions(self.versions_dir, self.name) if self.versions_dir else []

    # --- start-up, the poll and the admin endpoint ----------------------------------------------

    def start(self, background: bool = True) -> None:
        """Load the base (on the loader, or here when ``background`` is False), then the custom
        models on it."""
        if background:
            self._loader.submit(self._base.load)
        else:
            self._base.load()
        self.refresh()

    def poll(self, every_s: float) -> None:
        """Look at both repositories every ``every_s`` seconds, in a thread of its own."""

        def loop() -> None:
            while True:
                time.sleep(every_s)
                try:
                    self.refresh()
                except Exception:  # a file-system error (a removal racing the listing) must not stop it
                    log.exception("%s: looking at the model repository failed", self.name)

        threading.Thread(target=loop, name=f"repository-{self.name}", daemon=True).start()

    def refresh(self) -> bool:
        """One look at both repositories: queue a newer base version, load new heads, queue new
        fine-tuned versions, drop removed custom models. True when the custom models served changed."""
        if self.versions_dir is not None and self._base.info is not None:
            newest = self._newest_base()
            if newest is not None and newest[0] not in (self._base_identity, self._failed.get(self.name)):
                self._queue(self.name, newest[0], lambda: self._load_base(newest[0]))
        return self._refresh_custom()

    def reload(self) -> dict[str, object]:
        """The admin endpoint: serve the base's newest version now if it is not served (waits for
        the loader; a version that did not load on the poll is tried again)."""
        if self.versions_dir is None:
            raise BadRequest("this service has no MODEL_REPOSITORY: nothing to reload", code="no_repository")
        previous = self._base.version
        newest = self._newest_base()
        if newest is None or self._base.info is None or newest[0] == self._base_identity:
            return {"version": previous, "previous": previous, "changed": False}
        with self._lock:
            self._failed.pop(self.name, None)
            future, mine = self._queue(self.name, newest[0], lambda: self._load_base(newest[0]))
        try:
            info = future.result()
        except Exception as exc:  # the served version keeps serving
            raise ServiceError(
                f"version {newest[0][0]} did not load ({exc}); still serving {previous}",
                code="reload_failed",
            ) from None
        if not mine:  # another reload (the poller) got there first
            return {"version": self._base.version, "previous": previous, "changed": False}
        return {"version": self._base.version, "previous": previous, "changed": True, "weights_hash": info}

    # --- the loader and the swap ----------------------------------------------------------------

    def _queue(self, name: str, identity: Identity, load: Callable[[], Any]) -> tuple[Future[Any], bool]:
        """``load`` on the loader, once per version: a version already queued gives its future
        (and False: queued by someone else)."""
        with self._lock:
            if self._loading_identity.get(name) == identity:
                return self._loading[name], False

            def run() -> Any:
                try:
                    return load()
                finally:
                    with self._lock:
                        if self._loading_identity.get(name) == identity:
                            del self._loading[name], self._loading_identity[name]

            self._loading_identity[name] = identity
            self._loading[name] = future = self._loader.submit(run)
            return future, True

    def _load_base(self, identity: Identity) -> str:
        """On the loader: a new base version, loaded beside the one serving, then swapped in."""
        loaded = self.build_base(identity[0])
        if not loaded.load():
            loaded.close()
            self._failed_to_load(self.name, identity, RuntimeError(loaded.error))
            raise RuntimeError(loaded.error)
        with self._lock:
            old, self._base, self._base_identity = self._base, loaded, identity
            self._broken.pop(self.name, None)
        log.info("%s now serves version %s (was %s)", self.name, loaded.version, old.version or "-")
        old.close()
        assert loaded.info is not None
        return loaded.info.weights_hash

    def _refresh_custom(self) -> bool:
        listing = repository.newest(self.custom_dir) if self.custom_dir is not None else {}
        with self._lock:
            found: dict[str, Custom] = {}
            for name, (identity, folder) in listing.items():
                current = self._custom.get(name)
                if current is not None and self._served.get(name) == identity:
                    found[name] = current
                    continue
                if identity not in (self._failed.get(name), self._loading_identity.get(name)):
                    head = self._load_custom(name, identity, folder)
                    if head is not None:
                        found[name] = head
                        self._served[name] = identity
                        continue
                if current is not None:  # the new version is loading (or failed): the old one serves
                    found[name] = current
            for name in [*self._failed, *self._broken]:
                if name != self.name and name not in listing:  # gone: trained again, tried afresh
                    self._failed.pop(name, None)
                    self._broken.pop(name, None)
            previous, self._custom = self._custom, found  # one assignment: readers see old or new
            self._served = {name: self._served[name] for name in found}
        for name, old in previous.items():
            if found.get(name) is not old:
                old.close()
        return found.keys() != previous.keys() or any(found[n] is not previous[n] for n in found)

    def _load_custom(self, name: str, identity: Identity, folder: Path) -> Head | None:
        """A head, loaded; None for another base's model, a broken version, or a fine-tuned one
        (queued for the loader)."""
        try:
            meta = json.loads((folder / META_FILE).read_text())
            if meta.get("base") != self.name:
                return None  # another base model's service serves it
            if meta.get("kind") == FINE_TUNED:
                if self.load_fine_tuned is None:
                    raise ValueError("this service does not serve fine-tuned models")
                self._queue(name, identity, lambda: self._load_fine_tuned(name, identity, folder, meta))
                return None
            head = custom.load(folder, name, identity[0])
        except Exception as exc:  # noqa: BLE001 - a broken version: keep what was served, say why
            self._failed_to_load(name, identity, exc)
            return None
        self._broken.pop(name, None)
        classes = len(head.labels)
        log.info("custom model %s version %d on %s: %d classes", name, identity[0], self.name, classes)
        return head

    def _load_fine_tuned(self, name: str, identity: Identity, folder: Path, meta: dict[str, Any]) -> None:
        """On the loader: one fine-tuned version, served if it is still its model's newest."""
        assert self.load_fine_tuned is not None
        try:
            others = {n for n, m in self._custom.items() if isinstance(m, FineTuned) and n != name}
            if len(others) >= self.max_fine_tuned:
                raise OverLimit(
                    f"{self.name} already serves {len(others)} fine-tuned models, the most "
                    f"CUSTOM_MAX_FINE_TUNED allows (each holds a copy of the backbone)"
                )
            labels = labels_mod.from_json(meta["classes"])
            loaded = self.load_fine_tuned(folder, name, identity[0], meta, labels)
        except Exception as exc:  # noqa: BLE001 - listed as broken; the older version serves on
            self._failed_to_load(name, identity, exc)
            return
        assert self.custom_dir is not None
        with self._lock:
            newest = repository.newest_version(self.custom_dir, name)
            if newest is None or newest[0] != identity:  # removed or replaced while it loaded
                old = None
                gone = True
            else:
                old, gone = self._custom.get(name), False
                self._custom = {**self._custom, name: loaded}
                self._served[name] = identity
                self._broken.pop(name, None)
        if gone:
            loaded.close()
            return
        log.info("custom model %s version %d (fine-tuned) on %s: ready", name, identity[0], self.name)
        if old is not None:
            old.close()

    def _failed_to_load(self, name: str, identity: Identity, exc: Exception) -> None:
        with self._lock:  # the poller reads both records (an RLock: callers may hold it already)
            self._record_failure(name, identity, exc)

    def _record_failure(self, name: str, identity: Identity, exc: Exception) -> None:
        reason = f"version {identity[0]} does not load: {type(exc).__name__}: {exc}"
        if self._broken.get(name) != reason:
            log.warning("%s: %s", name, reason)
            self._broken[name] = reason
        if not isinstance(exc, OverLimit):  # over the limit: tried again once another one is gone
            self._failed[name] = identity

    def _newest_base(self) -> tuple[Identity, Path] | None:
        return repository.newest_version(self.versions_dir, self.name) if self.versions_dir else None
