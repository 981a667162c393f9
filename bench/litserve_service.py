"""LitServe serving the fleet's ResNet50 IR (bench/peer_model.py: OpenVINO, Pillow, top 5) as a
comparison point: LitServe's batching up to 8 within 5 ms, the photo as a multipart upload
(``image``, which ``decode_request`` reads from the form LitServe parses). Runs in its own
virtualenv (bench/.venv-litserve), started by bench/baselines.py with
``PEER_IR=<model.xml> python -m bench.litserve_service --port N``."""

from __future__ import annotations

import argparse
from typing import Any

import litserve as ls
import numpy as np

from bench import peer_model


class ResNet50(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = peer_model.ResNet50()

    # NOTE: ``request`` unannotated: LitServe reads its annotation as the request's schema, and
    # without one passes the form it parsed (an upload's field is a Starlette UploadFile).
    def decode_request(self, request) -> np.ndarray:  # type: ignore[no-untyped-def]
        return peer_model.decode(request["image"].file.read())

    def predict(self, batch: np.ndarray) -> list[peer_model.Top5]:
        return self.model(batch)

    def encode_response(self, output: peer_model.Top5) -> dict[str, Any]:
        return {"predictions": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    api = ResNet50(max_batch_size=8, batch_timeout=0.005)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
