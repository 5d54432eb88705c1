"""Suite-wide options: `--soak` runs the soak harness (tests/soak) with its long parameters;
`--soak-report FILE` writes the figures the soak tests collected as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run tests/soak with long parameters")
    parser.addoption("--soak-report", default="", help="write the soak figures to this JSON file")


@pytest.fixture(scope="session")
def soak(request: pytest.FixtureRequest) -> bool:
    """True in a long soak run (--soak); the soak tests pick short parameters otherwise."""
    return bool(request.config.getoption("--soak"))


_FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="session")
def figures() -> dict[str, Any]:
    """Figures a soak test reports (printed at the end, written with --soak-report)."""
    return _FIGURES


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("soak figures")
    for key, value in _FIGURES.items():
        terminalreporter.write_line(f"{key}: {value}")
    path = config.getoption("--soak-report")
    if path:
        Path(path).write_text(json.dumps(_FIGURES, indent=2, sort_keys=True) + "\n")
