"""docs/reference/settings.md is generated from the settings classes and kept current."""

from __future__ import annotations

import dataclasses

from deploy import settings_reference


def test_committed_page_is_current() -> None:
    committed = settings_reference.PAGE.read_text(encoding="utf-8")
    assert settings_reference.render() == committed, (
        "docs/reference/settings.md is stale: run `python -m deploy.settings_reference`"
    )


def test_every_setting_of_every_class_is_on_the_page() -> None:
    page = settings_reference.render()
    missing = []
    for entry, cls, _ in settings_reference.load_classes():
        assert f"`{entry.module}.{entry.name}`" in page
        for field in dataclasses.fields(cls):
            if "help" not in field.metadata:
                continue  # not a setting: e.g. the replicas, read from <MODEL>_URLS (in the class's note)
            if f"| `{settings_reference.variable(entry, field)}` |" not in page:
                missing.append(f"{entry.module}.{entry.name}.{field.name}")
    assert not missing, f"settings missing from the page: {missing}"


def test_defaults_do_not_depend_on_the_checkout() -> None:
    page = settings_reference.render()
    assert str(settings_reference.ROOT) not in page
    assert "`<repo>/run/jobs`" in page
