"""The model-service implementation: each of services/vgg16, resnet50, inceptionv3 and keras_file is
``serving.app.create_app`` with its own spec."""
