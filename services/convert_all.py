"""``make convert`` (``python -m services.convert_all``): convert the three models to OpenVINO
ahead of serving, with the fleet's settings - and quantize them to int8 where ``PRECISION=int8``
(``<MODEL>_PRECISION``), printing the quality gate's verdict.

Uses each service's own ``WEIGHTS``/``MODEL_CACHE``/``CALIBRATION_DIR`` settings, so the services
find the result.
"""

from __future__ import annotations

import sys

from services import inceptionv3, resnet50, vgg16
from serving.app import ServiceSettings
from serving.backends import OpenVINORuntime
from serving.quantize import choose


def main() -> int:
    for spec in (vgg16.SPEC, resnet50.SPEC, inceptionv3.SPEC):
        settings = ServiceSettings.from_env(spec.name)
        plan = settings.weights_plan(spec)
        runtime = OpenVINORuntime(
            spec, plan, cache_dir=settings.cache_dir, quantization=settings.quantization
        )
        record = runtime.ensure_converted()
        parity = record["parity"]
        print(
            f"{spec.name}: {record['backend']} weights={plan.kind} hash={record['weights_hash']} "
            f"parity {'passed' if parity['passed'] else 'FAILED'} (max |dp| {parity['max_abs_diff']:.1e})"
        )
        if settings.precision == "int8":
            record = runtime.ensure_quantized()
            quantization = settings.quantization
            served, _ = choose(record, quantization.gate, quantization.weights_fallback)
            figures = ", ".join(
                f"{c['precision']} top-1 agreement {c['gate']['top1_agreement']:.2f} top-5 overlap "
                f"{c['gate']['top5_overlap']:.2f}"
                for c in record["candidates"]
            )
            print(f"{spec.name}: {figures}: {served} will serve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
