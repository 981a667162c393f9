"""``make weights`` (``python -m services.fetch_weights``): fetch the three ImageNet weight files
into the Keras cache (needs internet).

Keras downloads each file and checks its hash, exactly as ``WEIGHTS=imagenet`` would at start-up.
Afterwards ``WEIGHTS=auto`` (``make run``) serves real weights.
"""

from __future__ import annotations

import sys

from common.errors import WeightsUnavailable
from services import inceptionv3, resnet50, vgg16
from serving.settings import ServiceSettings
from serving.weights import download, keras_cache_dir


def main() -> int:
    settings = ServiceSettings.from_env("")  # WEIGHTS_BASE_URL, WEIGHTS_DOWNLOAD_TIMEOUT_S
    for spec in (vgg16.SPEC, resnet50.SPEC, inceptionv3.SPEC):
        target = keras_cache_dir() / str(spec.imagenet_file)
        if target.is_file():
            print(f"{spec.name}: already in {target.parent}")
            continue
        try:
            download(
                spec,
                target,
                base_url=settings.weights_base_url,
                timeout_s=settings.weights_download_timeout_s,
            )
        except WeightsUnavailable as exc:
            print(exc.message, file=sys.stderr)
            return 1
        print(f"{spec.name}: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
