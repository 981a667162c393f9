"""The VGG16 service: ImageNet classifier, 224x224 input, 'caffe' preprocessing."""

from flask import Flask

from common.models import keras_application
from serving import app as service

SPEC = keras_application(
    name="vgg16",
    builder="VGG16",
    input_size=224,
    preprocessing="caffe",
    weights_path="vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5",
    md5="64373286793e3c8b2b4e3219cbf3544b",
)


def create_app(settings: service.ServiceSettings | None = None) -> Flask:
    """WSGI factory for Gunicorn: ``services.vgg16:create_app()``."""
    return service.create_app(SPEC, settings)
