"""The VGG16 service: ImageNet classifier, 224x224 input, 'caffe' preprocessing."""

from flask import Flask

from common import service
from common.models import keras_application

SPEC = keras_application("vgg16", "VGG16", 224, "caffe", "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5")


def create_app(settings: service.ServiceSettings | None = None) -> Flask:
    """WSGI factory for Gunicorn: ``services.vgg16:create_app()``."""
    return service.create_app(SPEC, settings)
