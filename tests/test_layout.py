"""The rooms of the house and the arrows allowed between them: an import that runs back up (the
service implementation reaching into the gateway, say) fails here before it becomes a habit."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("common", "serving", "fleet", "gateway", "workers", "services", "deploy", "client", "bench")
ALLOWED = {
    "common": {"common"},
    "serving": {"common", "serving"},
    "fleet": {"common", "fleet"},
    "gateway": {"common", "fleet", "gateway"},
    "workers": {"common", "fleet", "serving", "workers"},
    "services": {"common", "serving", "services"},
    "deploy": {"common", "deploy"},
    "client": {"client"},
    "bench": set(ROOMS),
}


def imported_rooms(path: Path) -> set[str]:
    """The project rooms ``path`` imports (absolute imports; the project has no relative ones)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(ROOMS)
    return found


def sources(room: str) -> list[Path]:
    """The room's Python files, not those of a virtualenv or cache kept in a hidden folder in it
    (bench/.venv-*: the peers')."""
    found = (ROOT / room).rglob("*.py")
    return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(ROOT).parts))


@pytest.mark.parametrize("room", ROOMS)
def test_every_import_runs_down_the_house(room: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_rooms(path) - ALLOWED[room]) for path in sources(room)
    }
    assert {path: rooms for path, rooms in wrong.items() if rooms} == {}


def test_the_fleet_library_loads_without_flask_or_tensorflow() -> None:
    """The job workers and the bench import ``fleet`` as a library: no web framework comes with it."""
    modules = sorted(p.stem for p in (ROOT / "fleet").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module('fleet.' + name)\n"
        "heavy = {'flask', 'werkzeug', 'tensorflow', 'keras'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("room", ["fleet", "workers"])
def test_below_the_gateway_nothing_imports_the_web_framework(room: str) -> None:
    """The fleet library and the job workers take the core's typed values (a job record's stored
    ``Selection``), never a request to parse: no Flask or werkzeug there."""
    wrong = {}
    for path in sources(room):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            if web := {name.split(".")[0] for name in names} & {"flask", "werkzeug"}:
                wrong[str(path.relative_to(ROOT))] = sorted(web)
    assert wrong == {}


def test_no_test_module_imports_another_or_a_conftest() -> None:
    """What tests share lives in helper modules (``tests/helpers.py``, ``<room>/fakes.py``) and
    fixtures in conftest.py files, which pytest loads: a test importing a test module runs its
    module-level code twice and ties the two together."""
    wrong = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests."):
                last = node.module.rsplit(".", 1)[-1]
                if last.startswith("test_") or last == "conftest":
                    wrong.setdefault(str(path.relative_to(ROOT)), []).append(node.module)
    assert wrong == {}
