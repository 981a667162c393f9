"""The Open Inference Protocol's operations on the fleet, whatever carries them: the REST routes
(``gateway.v2``) and the gRPC service (``gateway.v2_grpc``) each translate their own input into
these calls and the answers back.

A model is a base or custom model, or ``ensemble``. Versions: a model served from a repository
lists its versions; the others, and the ensemble, have one, "1". The fleet serves only a model's
newest version: that one answers on the versioned routes as on the unversioned ones; a listed older
version is a known model version that is not ready (503 ``version_not_served``, naming the served
one); any other version is a 404.
"""

from __future__ import annotations

from typing import Any

from common.errors import BadRequest, ModelUnavailable, ServiceError
from common.outcomes import Predicted, Prediction, Selection
from fleet.predict import Predictor
from gateway import selection as selections
from gateway import v2_request as read
from gateway.settings import GatewaySettings

VERSION = "1"
EXTENSIONS = ("binary_tensor_data", "parameters", "model_configuration")
"""Triton's protocol extensions the fleet serves, by Triton's names."""


class UnknownVersion(ServiceError):
    status, code = 404, "unknown_version"


class VersionNotServed(ServiceError):
    """A version the model has, but not the one the fleet serves (no Retry-After: waiting will not
    bring it back)."""

    status, code = 503, "version_not_served"


class V2Service:
    """The protocol's health, metadata and inference over ``predictor``."""

    def __init__(self, settings: GatewaySettings, predictor: Predictor) -> None:
        self.settings = settings
        self.predictor = predictor
        self.registry = predictor.client.registry

    def selection(self, name: str, vote: str = "soft") -> Selection:
        return selections.named(name, vote, self.settings, self.registry)

    def server(self) -> dict[str, Any]:
        return {"name": "imagerec", "version": VERSION, "extensions": list(EXTENSIONS)}

    def check_ready(self) -> None:
        """Ready when every base model has a ready replica (the protocol's server readiness); a
        custom model is ready with its base, and is never named here (it may be private)."""
        missing = [name for name in self.registry.bases if not self.registry.metadata(name)]
        if missing:
            raise ModelUnavailable(f"not ready: {', '.join(missing)}")

    def check_model_ready(self, name: str, version: str | None) -> None:
        chosen = self.selection(name)
        self.check_version(chosen, version)
        if not all(self.registry.metadata(member) for member in chosen.members):
            raise ModelUnavailable(f"{name} is not ready")

    def versions(self, chosen: Selection) -> tuple[str, list[str]]:
        """The version ``chosen`` serves, and every version it has."""
        if chosen.vote is not None:
            return VERSION, [VERSION]
        meta = self.registry.metadata(chosen.name)
        if not meta:
            raise ModelUnavailable(f"{chosen.name} has no ready replica to say which versions it has")
        served = str(meta.get("version") or VERSION)
        return served, [str(v) for v in meta.get("versions") or [served]]

    def check_version(self, chosen: Selection, version: str | None) -> None:
        """Nothing when ``version`` is absent or the one served; else why it cannot be used."""
        if version is None:
            return
        served, known = self.versions(chosen)
        if version == served:
            return
        if version in known:
            raise VersionNotServed(
                f"{chosen.name} version {version} is not served: "
                f"the fleet serves only its newest version, {served}"
            )
        raise UnknownVersion(
            f"{chosen.name} has no version {version[:64]!r}; it has {', '.join(known)} (serving {served})"
        )

    def metadata(self, name: str, version: str | None) -> dict[str, Any]:
        chosen = self.selection(name)
        self.check_version(chosen, version)
        members = chosen.members
        meta = self.registry.metadata(members[0])
        single = chosen.vote is None
        return {
            "name": name,
            # a model served from a repository lists its versions; others have one, "1"
            "versions": (meta.get("versions") or [VERSION]) if single else [VERSION],
            "platform": f"imagerec-{meta.get('backend') or 'unavailable'}" if single else "imagerec-ensemble",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": n, "datatype": t, "shape": [-1, -1]} for n, t in read.OUTPUTS.items()],
            "parameters": {
                "members": list(members),
                "weights": {m: self.registry.metadata(m).get("weights") for m in members},
                "precision": {m: self.registry.metadata(m).get("precision") for m in members},
            },
        }

    def config(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's model configuration extension (``GET /v2/models/<name>/config``, gRPC
        ``ModelConfig``), the fields a client reads before it sends a request: the tensors of
        ``metadata`` in the configuration's own types, and ``max_batch_size`` 0 (a request's
        tensor is a batch of any size; the fleet batches images across requests at each model
        service, where a client does not see it)."""
        meta = self.metadata(name, version)

        def tensor(spec: dict[str, Any]) -> dict[str, Any]:
            datatype = "STRING" if spec["datatype"] == "BYTES" else spec["datatype"]
            return {"name": spec["name"], "data_type": f"TYPE_{datatype}", "dims": spec["shape"]}

        return {
            "name": name,
            "platform": meta["platform"],
            "backend": "imagerec",
            "max_batch_size": 0,
            "input": [tensor(t) for t in meta["inputs"]],
            "output": [tensor(t) for t in meta["outputs"]],
        }

    def infer(
        self,
        name: str,
        version: str | None,
        body: dict[str, Any],
        blob: bytes,
        *,
        request_id: str,
        deadline: float,
    ) -> tuple[dict[str, Any], bytes]:
        """An inference request (its JSON object, and the binary tensor data after it) answered:
        the response's JSON object and the binary data of the outputs asked for as binary."""
        self.check_version(self.selection(name), version)
        tensor = read.tensor(body)
        parameters = read.parameters(body, "the request's")
        chosen = self.selection(name, str(parameters.get("vote", "soft")))
        top_k = parameters.get("top_k", self.settings.default_top_k)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= self.settings.max_top_k:
            raise BadRequest(f"parameter top_k must be an integer between 1 and {self.settings.max_top_k}")
        wanted = read.outputs(body)
        refinement = read.refinement(parameters)
        items = read.images(tensor, blob, self.settings.max_request_images, self.settings.max_image_bytes)
        # a tensor is answered whole or not at all: its first bad image refuses it before any decoding
        prediction = self.predictor.predict(
            chosen,
            items,
            top_k=top_k,
            request_id=request_id,
            deadline=deadline,
            whole=True,
            refinement=refinement,
        )
        return answer(name, version, body.get("id") or request_id, wanted, prediction)


def answer(
    name: str,
    version: str | None,
    answer_id: str,
    wanted: list[tuple[str, bool]],
    prediction: Prediction,
) -> tuple[dict[str, Any], bytes]:
    """The inference response: the ``wanted`` outputs, ``[N, k]`` each, and the version that
    answered; with the binary data of the outputs asked for as binary (empty: none)."""
    if error := prediction.first_error():
        raise error
    rows = [o.labels for o in prediction.outcomes if isinstance(o, Predicted)]
    k = min(len(row) for row in rows)
    columns: dict[str, list[Any]] = {
        "labels": [p.label for row in rows for p in row[:k]],
        "scores": [p.score for row in rows for p in row[:k]],
        "indices": [p.index for row in rows for p in row[:k]],
    }
    served = prediction.served
    # a model served from a repository names the version that answered; others are "1"
    answered = {s.version or VERSION for s in served.values()}
    answered_by = answered.pop() if prediction.selection.vote is None and len(answered) == 1 else VERSION
    if version is not None and answered_by != version:  # the model moved on during the request
        raise VersionNotServed(f"{name} switched to version {answered_by}; version {version} is not served")
    outputs, binary = [], []
    for output, as_binary in wanted:
        datatype = read.OUTPUTS[output]
        entry: dict[str, Any] = {"name": output, "datatype": datatype, "shape": [len(rows), k]}
        if as_binary:
            binary.append(read.encode(datatype, columns[output]))
            entry["parameters"] = {"binary_data_size": len(binary[-1])}
        else:
            entry["data"] = columns[output]
        outputs.append(entry)
    head = {
        "model_name": name,
        "model_version": answered_by,
        "id": answer_id,
        "parameters": {
            "weights": {m: s.weights for m, s in served.items()},
            "degraded": prediction.degraded,
            **refined(prediction, k),
        },
        "outputs": outputs,
    }
    return head, b"".join(binary)


def refined(prediction: Prediction, k: int) -> dict[str, Any]:
    """What a refinement added, per image, as response parameters (JSON text over gRPC):
    ``hedged`` (the hedged answer of each image), ``parents`` (each of the k labels' ancestors),
    ``hierarchy`` (why neither could be given)."""
    rows = [o for o in prediction.outcomes if isinstance(o, Predicted)]
    found: dict[str, Any] = {}
    if any(o.hedged is not None for o in rows):
        found["hedged"] = [o.hedged.to_json() if o.hedged else None for o in rows]
    if any(label.parents is not None for o in rows for label in o.labels):
        found["parents"] = [
            [[n.to_json() for n in label.parents or ()] for label in o.labels[:k]] for o in rows
        ]
    if rows and rows[0].flat:
        found["hierarchy"] = rows[0].flat
    return found
