"""Model replicas and their health: who may be called, in what order.

Custom models (trained on a base model, ``common.custom``) have no replicas of their own: the base
model's replicas serve them and list them in ``/v1/model``, so they appear here as soon as a probe
sees them (and go when no probe does), with no setting and no restart.

One thread (``start_polling``) keeps the picture fresh: it resolves replica host names (``dns.py``)
at start and every ``dns_refresh_s``, and probes every replica's ``/v1/model``. Requests only read
the picture (and report connect failures with ``mark_down``): nothing here runs inside a request.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from common import repository
from common.errors import TooManyFineTuned, UnknownModel
from fleet import dns
from fleet.replica import Replica

log = logging.getLogger(__name__)
DEFAULT_BODY_LIMIT = 16 * 1024 * 1024  # a model service's default max_body_bytes


def _serves(metadata: dict[str, Any], name: str, version: int) -> bool:
    """Whether a replica's metadata lists custom model ``name`` at ``version`` or later, ready."""
    return any(
        entry.get("name") == name
        and int(entry.get("version", 0)) >= version
        and entry.get("state") == "ready"
        for entry in metadata.get("custom_models") or []
    )


class Registry:
    """Replicas per model; a poller keeps ``ready`` fresh, callers report failures in between."""

    def __init__(
        self,
        replicas: Mapping[str, Sequence[str]],
        session: requests.Session,
        probe_timeout_s: float = 1.0,
        *,
        resolver: dns.Resolver = dns.system_resolver,
        dns_refresh_s: float = 0.0,
        unknown_probe_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Replicas as configured; host names are resolved only by ``resolve`` (the poller's job).

        Args:
            replicas: base URLs per model.
            session: for the probes.
            probe_timeout_s: how long a probe waits for an answer.
            resolver: looks up host names (tests hand in a fake).
            dns_refresh_s: seconds between lookups while polling; 0 uses the URLs as given.
            unknown_probe_s: a name no replica lists, asked for, probes every replica first - at
                most this often (0: never), so a custom model is routed as soon as its service
                serves it, not a probe round later.
            clock: ``time.monotonic``, or a test's.
        """
        self._sources = {name: tuple(urls) for name, urls in replicas.items()}
        self._replicas = {
            name: [Replica(url, name, source=url) for url in urls] for name, urls in replicas.items()
        }
        self._custom: dict[str, tuple[str, dict[str, Any]]] = {}
        self.on_weights_change: Callable[[str], object] | None = None  # e.g. the response cache's drop
        self._session = session
        self._probe_timeout_s = probe_timeout_s
        self._resolver = resolver
        self._dns_refresh_s = dns_refresh_s
        self._turns = {name: itertools.count() for name in replicas}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._unknown_probe_s = unknown_probe_s
        self._clock = clock
        self._probed_for_unknown = -math.inf
        self._probing = threading.Lock()

    @property
    def models(self) -> list[str]:
        """The configured models, then the custom models their replicas serve."""
        return list(self._replicas) + sorted(self.custom())

    @property
    def bases(self) -> list[str]:
        """The configured models (those with replicas of their own)."""
        return list(self._replicas)

    def custom(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Custom models the replicas list: name -> (base model, the newest entry seen), as of the
        last round of probes (each round derives it once; requests only read it)."""
        return self._custom

    def _find_custom(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """What ``custom`` answers. A replica that stopped answering still counts with what it
        said last, so a custom model whose base is down is unavailable (503), not unknown (404)."""
        found: dict[str, tuple[str, dict[str, Any]]] = {}
        for base, replicas in list(self._replicas.items()):
            for replica in replicas:
                for entry in replica.metadata.get("custom_models") or []:
                    seen = found.get(entry["name"])
                    if seen is None or int(entry["version"]) > int(seen[1]["version"]):
                        found[entry["name"]] = (base, entry)
        return found

    def base_of(self, model: str) -> str:
        """The model whose replicas serve ``model``: itself, or a custom model's base."""
        if model in self._replicas:
            return model
        custom = self.custom()
        if model not in custom and self._probe_for(model):
            custom = self.custom()
        if model in custom:
            return custom[model][0]
        raise self.unknown(model)

    def _probe_for(self, model: str) -> bool:
        """Probe every replica for a name none listed at the last round, unless one did so less than
        ``unknown_probe_s`` ago (a client naming random models costs a round at most that often).
        True when a round ran; requests that arrive meanwhile wait for it, then look again."""
        if self._unknown_probe_s <= 0 or repository.check_name(model):
            return False
        with self._probing:
            if self._clock() - self._probed_for_unknown < self._unknown_probe_s:
                return model in self._custom
            self._probed_for_unknown = self._clock()
            self.refresh()
            return True

    def serving(self, base: str, name: str, version: int) -> bool:
        """Whether every ready replica of ``base`` (and at least one) serves ``name`` at ``version``
        or later, asked now: the trainer's confirmation that what it published is served."""
        replicas = list(self._replicas[base])
        self.refresh(replicas)
        ready = [r for r in replicas if r.ready]
        return bool(ready) and all(_serves(r.metadata, name, version) for r in ready)

    def unknown(self, model: str) -> UnknownModel:
        """The 404 for a name that is not served - or not the caller's to see: custom models are not
        named in it (a private one must not be confirmed to others)."""
        available = ", ".join(self._replicas)
        return UnknownModel(
            f"unknown model {model[:64]!r}; available: {available}, ensemble, and the custom models "
            "GET /v1/models lists for you"
        )

    def is_custom(self, model: str) -> bool:
        return model not in self._replicas

    def replicas(self, model: str) -> list[Replica]:
        return self._replicas[self.base_of(model)]

    def candidates(self, model: str) -> list[Replica]:
        """Ready replicas in round-robin order, then the rest (their state may be stale). For a
        custom model, the ready replicas that already list it come first."""
        base = self.base_of(model)
        replicas = self._replicas[base]
        if not replicas:
            return []
        with self._lock:
            turn = next(self._turns[base])
        rotated = replicas[turn % len(replicas) :] + replicas[: turn % len(replicas)]
        ready = [r for r in rotated if r.ready]
        if base != model:
            listing = [r for r in ready if _lists(r, model)]
            ready = listing + [r for r in ready if not _lists(r, model)]
        return ready + [r for r in rotated if not r.ready]

    def mark_down(self, replica: Replica) -> None:
        replica.ready = False

    def resolve(self) -> None:
        """Look every named replica URL up anew: each address one replica, health kept by address.

        New addresses join (not ready until probed, so last in ``candidates``), vanished ones
        leave; a failed lookup keeps the replicas that URL had.
        """
        if self._dns_refresh_s <= 0:
            return
        for model, sources in self._sources.items():
            current = self._replicas[model]
            known = {r.url: r for r in current}
            fresh: dict[str, Replica] = {}
            for url in sources:
                targets = dns.expand(url, self._resolver)
                if targets is None:
                    fresh.update((r.url, r) for r in current if r.source == url)
                    continue
                for target in targets:
                    replica = known.get(target.url) or Replica(
                        target.url, model, host=target.host, source=url
                    )
                    fresh.setdefault(target.url, replica)
            if fresh.keys() != known.keys():
                log.info("%s replicas: %s (were %s)", model, ", ".join(fresh), ", ".join(known))
            self._replicas[model] = list(fresh.values())  # one assignment: readers see old or new

    def _probe(self, replica: Replica) -> None:
        if replica.probe(self._session, self._probe_timeout_s) and self.on_weights_change:
            self.on_weights_change(replica.model)

    def refresh(self, replicas: Sequence[Replica] | None = None) -> None:
        """Probe every replica (or those given) now, in parallel."""
        everyone = replicas or [r for found in list(self._replicas.values()) for r in found]
        with ThreadPoolExecutor(max_workers=min(16, len(everyone)) or 1) as pool:
            list(pool.map(self._probe, everyone))
        self._custom = self._find_custom()  # one assignment: readers see the old map or the new

    def start_polling(self, interval_s: float) -> None:
        """Resolve names now and every ``dns_refresh_s`` (at most as often), probe every ``interval_s``."""

        def loop() -> None:
            next_lookup = 0.0
            while not self._stop.is_set():
                if self._dns_refresh_s > 0 and time.monotonic() >= next_lookup:
                    self.resolve()
                    next_lookup = time.monotonic() + self._dns_refresh_s
                self.refresh()
                self._stop.wait(interval_s)

        self._poller = threading.Thread(target=loop, name="replica-health", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        """Stop polling, and wait for a round under way to finish."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=10)

    def body_limit(self, model: str) -> int:
        """The largest request body every replica of ``model`` accepts (what it reports, else 16 MiB)."""
        limits = [r.metadata.get("max_body_bytes") for r in self.replicas(model)]
        return min((n for n in limits if isinstance(n, int) and n > 0), default=DEFAULT_BODY_LIMIT)

    def metadata(self, model: str) -> dict[str, Any]:
        """What a ready replica of ``model`` says about itself (empty when none is ready); for a
        custom model, its base's serving fields with the custom model's own."""
        base = self.base_of(model)
        first = next((r.metadata for r in self._replicas[base] if r.ready), {})
        if base == model or not first:
            return first
        entry = self.custom().get(model, (base, {}))[1]
        shared = ("input_size", "preprocessing", "center_crop", "backend", "precision", "max_body_bytes")
        found = {**{key: first.get(key) for key in shared}, **entry, "weights": entry.get("base_weights")}
        if entry.get("state") != "ready":  # stale: no hash, so the response cache never answers for it
            found.pop("weights_hash", None)
        return found

    def check_room_for_fine_tuned(self, base: str, name: str) -> None:
        """Refuse a fine-tuned model the base's service would not load: it already holds as many as
        its ``CUSTOM_MAX_FINE_TUNED`` allows (retraining one of them replaces it, so it is allowed)."""
        meta = self.metadata(base)
        if (
            "max_fine_tuned" not in meta
        ):  # no ready replica, or one from before fine-tuning: the trainer checks
            return
        listed = meta.get("custom_models") or []
        tuned = {m["name"] for m in listed if m.get("kind") == repository.FINE_TUNED}
        tuned |= {
            m["name"] for m in meta.get("custom_models_loading") or []
        }  # only fine-tuned ones load slowly
        tuned.discard(name)
        if len(tuned) >= int(meta["max_fine_tuned"]):
            raise TooManyFineTuned(
                f"{base} already serves {len(tuned)} fine-tuned models ({', '.join(sorted(tuned))}), "
                f"the most its CUSTOM_MAX_FINE_TUNED allows (each holds a copy of the backbone): delete "
                f"one, or train a head on the frozen backbone (fine_tune_layers=0)"
            )

    def describe(self, model: str) -> dict[str, Any]:
        """The ``/v1/models`` entry for one model."""
        replicas = self.replicas(model)
        first = self.metadata(model)
        if self.is_custom(model):
            return {
                "name": model,
                "status": "ready" if first.get("state") == "ready" else "unavailable",
                "custom": True,
                **{key: value for key, value in first.items() if key not in ("name", "class_names", "state")},
                "class_names": first.get("class_names"),
                "replicas": [r.describe() for r in replicas if _lists(r, model)],
            }
        return {
            "name": model,
            "status": "ready" if first else "unavailable",
            **{
                key: first.get(key)
                for key in (
                    "input_size",
                    "preprocessing",
                    "weights",
                    "weights_hash",
                    "backend",
                    "precision",
                    "version",
                    "classes",
                )
            },
            "replicas": [r.describe() for r in replicas],
        }


def _lists(replica: Replica, model: str) -> bool:
    """Whether ``replica`` says it serves the custom model ``model``."""
    return any(entry.get("name") == model for entry in replica.metadata.get("custom_models") or [])
