"""MLServer serving the fleet's ResNet50 IR (bench/peer_model.py: OpenVINO, Pillow, top 5) as a
comparison point: a custom runtime, MLServer's adaptive batching up to 8 within 5 ms
(model-settings.json), one inference worker process (``parallel_workers``, its default, in
settings.json). A request is a v2 JSON infer request whose ``image`` input is the JPEG as base64
BYTES (``content_type: base64``); the answer's ``labels`` (BYTES) and ``scores`` (FP32) are
``[n, 5]``. Runs in its own virtualenv (bench/.venv-mlserver), started by bench/baselines.py with
``PEER_IR=<model.xml> mlserver start bench/mlserver_peer`` from the repository's root."""

from __future__ import annotations

import numpy as np
from mlserver import MLModel
from mlserver.codecs import Base64Codec, NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

from bench import peer_model


class ResNet50(MLModel):
    async def load(self) -> bool:
        self.model = peer_model.ResNet50()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        photos = Base64Codec.decode_input(payload.inputs[0])
        answers = self.model(np.stack([peer_model.decode(photo) for photo in photos]))
        labels = [a["label"] for top in answers for a in top]
        scores = np.array([[a["score"] for a in top] for top in answers], np.float32)
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                ResponseOutput(name="labels", datatype="BYTES", shape=[len(answers), 5], data=labels),
                NumpyCodec.encode_output("scores", scores),
            ],
        )
