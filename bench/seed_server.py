"""The approach of the article this project grew from, reconstructed as the baseline: one Flask app
that decodes with Pillow, resizes, calls Keras ``model.predict`` once per request and returns the
top 3. Deployed like the article: ``gunicorn -w 4 bench.seed_server:app`` (each worker loads its
own model at import). Random weights (seed 0), like the fleet in the benchmark."""

from __future__ import annotations

import io

import keras
import numpy as np
from flask import Flask, jsonify, request
from PIL import Image

from common import labels

keras.utils.set_random_seed(0)
model = keras.applications.ResNet50(weights=None)
INDEX = labels.load()
app = Flask(__name__)


@app.route("/predict", methods=["POST"])
def predict():  # type: ignore[no-untyped-def]
    image = Image.open(io.BytesIO(request.files["file"].read())).convert("RGB").resize((224, 224))
    batch = keras.applications.resnet50.preprocess_input(np.expand_dims(np.asarray(image, np.float32), 0))
    probabilities = model.predict(batch, verbose=0)[0]
    top = np.argsort(-probabilities)[:3]
    return jsonify(predictions=[{"label": INDEX.names[i], "prob": float(probabilities[i])} for i in top])
