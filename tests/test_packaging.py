"""packaging/capacitor-trio.service: systemd accepts it (`systemd-analyze verify`, with the
router's path replaced by one that exists here), and it says what docs/operations.md promises: a
dedicated user, restart on failure, writes to the data directory only, a raised open-file limit,
SIGTERM with a stop timeout longer than the router's shutdown grace."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from capacitor_trio.actors.node import RELEASE_GRACE
from capacitor_trio.actors.sending import RECORD_GRACE

UNIT = Path(__file__).resolve().parents[1] / "packaging" / "capacitor-trio.service"


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def test_unit_says_what_operations_md_promises() -> None:
    s = service()
    assert s["User"] not in ("", "root") and s["Restart"] == "on-failure"
    data_dir = s["ExecStart"].split("--path", 1)[1].split()[0]
    assert s["ReadWritePaths"] == data_dir and s["ProtectSystem"] == "strict"
    assert int(s["LimitNOFILE"]) >= 65536 and s["KillSignal"] == "SIGTERM"
    # outcome recording, then the release of checkouts, each shielded up to its grace
    assert int(s["TimeoutStopSec"]) > RECORD_GRACE + RELEASE_GRACE


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    executable = service()["ExecStart"].split()[0]
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(executable, shutil.which("true") or "/bin/true"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and UNIT.name not in result.stderr, result.stderr
