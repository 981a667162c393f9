"""The ResNet50 service: ImageNet classifier, 224x224 input, 'caffe' preprocessing."""

from flask import Flask

from common.models import keras_application
from serving import app as service

SPEC = keras_application(
    name="resnet50",
    builder="ResNet50",
    input_size=224,
    preprocessing="caffe",
    weights_path="resnet/resnet50_weights_tf_dim_ordering_tf_kernels.h5",
    md5="2cb95161c43110f7111970584f804107",
)


def create_app(settings: service.ServiceSettings | None = None) -> Flask:
    """WSGI factory for Gunicorn: ``services.resnet50:create_app()``."""
    return service.create_app(SPEC, settings)
