"""Which models answer, as the protocols name them, made into the core's ``Selection``: v1's query
(``model``, ``models``, ``vote``, ``member_weights``) and v2's model name with its ``vote``
parameter. A name the fleet does not serve is a 404 here, before the body is read."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.errors import BadRequest
from common.outcomes import Selection
from fleet.ensemble import VOTES
from fleet.registry import Registry
from fleet.settings import FleetSettings


def from_query(args: Mapping[str, str], settings: FleetSettings, registry: Registry) -> Selection:
    """Parse ``model``/``models``/``vote``/``member_weights``; unknown names are a 404."""
    if args.get("models"):
        members = tuple(dict.fromkeys(m.strip() for m in args["models"].split(",") if m.strip()))
        name = "ensemble"
    elif args.get("model") == "ensemble":
        members, name = settings.ensemble_members, "ensemble"
    elif args.get("model"):
        members = (args["model"],)
        name = members[0]
    else:
        raise BadRequest(f"choose a model: ?model=<{'|'.join(settings.models)}|ensemble> or ?models=a,b")
    for member in members:
        registry.replicas(member)  # raises UnknownModel listing what exists
    if name != "ensemble":
        return Selection(name, members)
    vote = args.get("vote", "soft")
    if vote not in VOTES:
        raise BadRequest(f"vote must be one of {', '.join(VOTES)}, got {vote!r}")
    if args.get("member_weights") and vote == "soft":
        raise BadRequest("member_weights needs vote=weighted or vote=hard")
    weights = parse_member_weights(args.get("member_weights", ""), list(members))
    return Selection(name, members, vote, weights)


def named(name: str, vote: str, settings: FleetSettings, registry: Registry) -> Selection:
    """v2's: a model (or ``ensemble``) by its name in the path, and the ``vote`` parameter."""
    return from_query({"model": name, "vote": vote}, settings, registry)


def parse_member_weights(raw: str, members: list[str]) -> dict[str, float]:
    """``"resnet50:2,vgg16:1"`` -> weights for every member (unlisted members weigh 1)."""
    weights = dict.fromkeys(members, 1.0)
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, value = item.partition(":")
        if not sep or name not in weights:
            raise BadRequest(
                f"member_weights entry {item!r} must be <member>:<weight> with a member "
                f"of this ensemble ({', '.join(members)})"
            )
        try:
            weights[name] = float(value)
        except ValueError:
            raise BadRequest(f"member_weights: {value!r} is not a number") from None
        if not np.isfinite(weights[name]) or weights[name] < 0:
            raise BadRequest(f"member_weights: {name} needs a finite weight >= 0")
    if sum(weights.values()) <= 0:
        raise BadRequest("member_weights: at least one weight must be positive")
    return weights
