"""The repository layout: tools and tests are packages run from the root, and every tool command
or tool path the documentation gives exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("tools", "tests")
DOCUMENTS = ("README.md", "docs/*.md", "models/*/README.md", "tools/test.sh")
MODULE = re.compile(r"-m ((?:tools|tests)(?:\.[a-z_]+)+)\b(?!\.)")  # NAME: a placeholder
HACK = re.compile(r"sys\.path\.(?:insert|append)\(")
PATH = re.compile(r"(?<![\w/.])((?:tools|tests)/[\w/.-]+\.(?:py|toml|sh))")


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def documents() -> list[Path]:
    return sorted(p for pattern in DOCUMENTS for p in REPO.glob(pattern))


def test_tools_and_tests_are_packages_without_path_hacks() -> None:
    hacks = [str(p.relative_to(REPO)) for p in sources() if HACK.search(p.read_text())]
    assert hacks == []
    folders = {p.parent for p in sources()}
    loose = [str(f.relative_to(REPO)) for f in folders if not (f / "__init__.py").is_file()]
    assert loose == []


def test_every_tool_module_resolves_by_package_name() -> None:
    tools = [p for p in sources() if p.parts[len(REPO.parts)] == "tools" and p.stem != "__init__"]
    assert len(tools) >= 15  # the train and bench tools
    for path in tools:
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        assert importlib.util.find_spec(name) is not None, name


def test_documented_tool_commands_and_paths_exist() -> None:
    missing = []
    for document in documents():
        text = document.read_text()
        for module in MODULE.findall(text):
            if not (REPO / (module.replace(".", "/") + ".py")).is_file():
                missing.append(f"{document.name}: python -m {module}")
        for path in PATH.findall(text):
            if not (REPO / path).is_file():
                missing.append(f"{document.name}: {path}")
    assert missing == []
