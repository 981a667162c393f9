"""What a model service answers the fleet client, for ``responses``-backed tests."""

from __future__ import annotations

R1, R2 = "http://r1:8502", "http://r2:8502"


def reply(count: int = 1, **extra: object) -> dict:
    results = [
        {"index": i, "predictions": [{"label": "tabby", "class_id": "n02123045", "index": 281, "score": 0.9}]}
        for i in range(count)
    ]
    return {"model": "resnet50", "weights": "random", "results": results, **extra}
