"""Member calls that fit the member's body limit: several calls when a batch does not fit in one.

The gateway may gather more bytes than a model service reads in one request (32 images of 10 MB
against its ``max_body_bytes``, 16 MiB by default). The images then go out in consecutive groups
whose bodies each fit; an image that cannot fit even alone gets its own 413
``image_too_large`` result and is never sent. Results come back in image order either way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from common.errors import ImageTooLarge
from common.outcomes import Served
from fleet.answers import MemberReply, MemberResult

PART_OVERHEAD = 256  # per image (its length in X-Image-Lengths), with room to spare
BODY_OVERHEAD = 64  # the request's own lines


@dataclass(frozen=True)
class Split:
    """Image positions per call, in order, and the images too large for any call."""

    parts: list[list[int]]
    too_large: list[int]

    @property
    def whole(self) -> bool:
        """One call carries every image: nothing to split or merge."""
        return not self.too_large and len(self.parts) <= 1


def split(sizes: list[int], limit: int) -> Split:
    """Group consecutive images so each call's body stays within ``limit`` bytes.

    Args:
        sizes: each image's length in bytes, in request order.
        limit: the largest body the member accepts. One image travels as the raw body, so it fits
            when its own size does; several travel framed, each image counted with an overhead.
    """
    parts: list[list[int]] = []
    too_large: list[int] = []
    current: list[int] = []
    used = BODY_OVERHEAD
    for index, size in enumerate(sizes):
        if size > limit:
            too_large.append(index)
            continue
        if current and used + size + PART_OVERHEAD > limit:
            parts.append(current)
            current, used = [], BODY_OVERHEAD
        current.append(index)
        used += size + PART_OVERHEAD
    if current:
        parts.append(current)
    return Split(parts, too_large)


def merge(model: str, count: int, plan: Split, replies: list[MemberReply], limit: int) -> MemberReply:
    """One answer for all ``count`` images: the first reply's serving fields, every result at its
    index. Timings add up: the calls ran one after another."""
    results = [MemberResult()] * count
    for part, reply in zip(plan.parts, replies, strict=True):
        for index, result in zip(part, reply.results, strict=True):
            results[index] = result
    for index in plan.too_large:
        error = ImageTooLarge(f"image {index} is over the {limit} bytes {model} accepts in one request")
        results[index] = MemberResult(error=error)
    timing: dict[str, float] = {}
    for reply in replies:
        for key, value in reply.timing_ms.items():
            timing[key] = round(timing.get(key, 0.0) + value, 2)
    if not replies:  # every image too large: nothing was sent
        return MemberReply(Served(), tuple(results))
    return replace(replies[0], results=tuple(results), timing_ms=timing)
