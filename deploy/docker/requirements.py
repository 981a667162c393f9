"""Print the project's requirements, one a line, for ``pip install -r``: the core dependencies of
pyproject.toml plus those of the extras named on the command line (``model``, ``gpu``...).

The images install these before they copy the code, so the layer that holds them (and its pip cache)
is rebuilt only when pyproject.toml changes. Standard library only: it runs before anything is
installed. An extra that names the project itself (``imagerec[model,fleet]``) is expanded.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).with_name("pyproject.toml")


def requirements(project: dict, extras: list[str]) -> list[str]:
    name, optional = project["name"], project.get("optional-dependencies", {})
    found, todo, seen = list(project.get("dependencies", [])), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"requirements: {name} has no extra {extra!r} (it has {sorted(optional)})")
        seen.add(extra)
        for requirement in optional[extra]:
            own = re.fullmatch(rf"{re.escape(name)}\[([\w,\s-]+)\]", requirement)
            if own:
                todo += [e.strip() for e in own[1].split(",")]
            else:
                found.append(requirement)
    return list(dict.fromkeys(found))


def main() -> None:
    path = PYPROJECT if PYPROJECT.exists() else Path("pyproject.toml")
    project = tomllib.loads(path.read_text())["project"]
    print("\n".join(requirements(project, sys.argv[1:])))


if __name__ == "__main__":
    main()
