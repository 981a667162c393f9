"""The InceptionV3 service: ImageNet classifier, 299x299 input, 'tf' preprocessing."""

from flask import Flask

from common.models import keras_application
from serving import app as service

SPEC = keras_application(
    name="inceptionv3",
    builder="InceptionV3",
    input_size=299,
    preprocessing="tf",
    weights_path="inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
    md5="9a0d58056eeedaa3f26cb7ebd46da564",
)


def create_app(settings: service.ServiceSettings | None = None) -> Flask:
    """WSGI factory for Gunicorn: ``services.inceptionv3:create_app()``."""
    return service.create_app(SPEC, settings)
