"""The fleet's settings: a renamed one is refused at start-up, naming its successor."""

from __future__ import annotations

import pytest

from fleet.settings import FleetSettings
from gateway.settings import GatewaySettings


@pytest.mark.parametrize("cls", [FleetSettings, GatewaySettings])
def test_a_renamed_setting_is_refused_naming_the_new_one(cls: type[FleetSettings]) -> None:
    with pytest.raises(
        ValueError, match="GATEWAY_MAX_BATCH_IMAGES is no longer read: use GATEWAY_MAX_REQUEST"
    ):
        cls.from_env({"GATEWAY_MAX_BATCH_IMAGES": "8"})
    assert cls.from_env({"GATEWAY_MAX_REQUEST_IMAGES": "8"}).max_request_images == 8
