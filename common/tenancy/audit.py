"""The audit log: one JSON line (logger ``imagerec.audit``) per key, job, training and deletion
call, naming the principal (key id and name, never the secret), the action, its target, the
outcome and the request id."""

from __future__ import annotations

import logging
from typing import Any

from common.tenancy.keys import Principal

log = logging.getLogger("imagerec.audit")


def record(
    principal: Principal, action: str, target: str, outcome: str, request_id: str, **extra: Any
) -> None:
    log.info(
        "audit",
        extra={
            "audit": True,
            **principal.audit(),
            "action": action,
            "target": target[:200],
            "outcome": outcome,
            "request_id": request_id,
            **extra,
        },
    )
