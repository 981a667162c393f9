"""``make weights``: fetch the three ImageNet weight files into the Keras cache (needs internet).

Each model is built once with ``weights="imagenet"``, so Keras downloads and verifies the file
exactly as it would at serving time. Afterwards ``WEIGHTS=auto`` (``make run``) serves real weights.
"""

from __future__ import annotations

import sys

from common.weights import keras_cache_dir


def main() -> int:
    import keras

    from services import inceptionv3, resnet50, vgg16

    for spec in (vgg16.SPEC, resnet50.SPEC, inceptionv3.SPEC):
        print(f"{spec.name}: fetching {spec.imagenet_url}", flush=True)
        try:
            getattr(keras.applications, str(spec.builder))(weights="imagenet")
        except Exception as exc:
            print(
                f"{spec.name}: failed ({exc}); copy {spec.imagenet_file} into {keras_cache_dir()} by hand",
                file=sys.stderr,
            )
            return 1
    print(f"done: weights are in {keras_cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
