"""`capacitor-trio run` as a new user runs it: a fresh directory, echoscu, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.helpers.peers import RouterProcess, dcmtk_env, free_port, needs_dcmtk


@needs_dcmtk
async def test_fresh_data_dir_echo_and_clean_shutdown(tmp_path: Path, nursery: trio.Nursery) -> None:
    data = tmp_path / "capacitor-data"
    scp, api = free_port(), free_port()
    router = RouterProcess(data, f"--config.scpPort={scp}", f"--config.api.port={api}")
    try:
        await router.start(nursery)
        assert (data / "config.yml").exists() and (data / "nodes.yml").read_text() == "[]\n"
        assert f"INFO: DICOM listening on 0.0.0.0:{scp} as CAPACITOR" in router.lines
        assert f"INFO: API listening on http://127.0.0.1:{api}" in router.lines
        echo = await trio.run_process(
            ["echoscu", "-aec", "CAPACITOR", "127.0.0.1", str(scp)], env=dcmtk_env(), check=False,
            capture_stdout=True, capture_stderr=True,
        )
        assert echo.returncode == 0, echo.stderr
        unknown = await trio.run_process(
            ["echoscu", "-aec", "NOBODY", "127.0.0.1", str(scp)], env=dcmtk_env(), check=False,
            capture_stdout=True, capture_stderr=True,
        )
        assert unknown.returncode != 0  # association rejected: called AE not recognised
        near = await trio.run_process(
            ["echoscu", "-aec", "capacitor", "127.0.0.1", str(scp)], env=dcmtk_env(), check=False,
            capture_stdout=True, capture_stderr=True,
        )
        assert near.returncode != 0  # AE titles are case-sensitive: refused, with a hint
        await router.wait_for_line(
            lambda line: line.startswith("WARN: A-ASSOCIATE-RJ: called AE 'capacitor' not recognized")
            and line.endswith("AE titles are case-sensitive: did you mean CAPACITOR?")
        )
        router.signal(signal.SIGTERM)
        assert await router.wait() == 0
        assert router.lines[-1] == "INFO: stopped"
        assert not any("Traceback" in line for line in router.lines)
    finally:
        await router.aclose()


async def test_run_without_path_uses_capacitor_data_in_cwd(tmp_path: Path, nursery: trio.Nursery) -> None:
    scp, api = free_port(), free_port()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "capacitor_trio", "run", f"--config.scpPort={scp}", f"--config.api.port={api}"],
        cwd=tmp_path, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        seen = b""
        with trio.fail_after(30):
            async for chunk in proc.stderr:
                seen += chunk
                if b"router ready" in seen:
                    break
        assert b"created a default configuration" in seen
        assert (tmp_path / "capacitor-data" / "config.yml").exists()
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            assert await proc.wait() == 0
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await proc.stderr.aclose()  # type: ignore[union-attr]


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "capacitor_trio", "run", "--path", str(tmp_path / "d"),
             f"--config.scpPort={port}", "--config.api.enabled=false"],
            capture_output=True, text=True, timeout=60,
        )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert ("cannot start" in r.stderr and str(port) in r.stderr) or "Address already in use" in r.stderr


async def test_a_second_router_on_the_same_directory_is_refused(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Started twice on one data directory (a service and a hand-started copy), the second must
    not run recovery under the first one's feet: it stops with a one-line error naming the
    first one's pid, and the first carries on."""
    data = tmp_path / "d"
    router = RouterProcess(data, f"--config.scpPort={free_port()}", "--config.api.enabled=false")
    try:
        await router.start(nursery)
        assert router.proc is not None
        second = await trio.run_process(
            [sys.executable, "-m", "capacitor_trio", "run", "--path", str(data),
             f"--config.scpPort={free_port()}", "--config.api.enabled=false"],
            capture_stdout=True, capture_stderr=True, check=False,
        )
        err = second.stderr.decode()
        assert second.returncode == 1 and "Traceback" not in err, err
        assert "cannot start: the cache directory" in err
        assert f"in use by another capacitor-trio process (pid {router.proc.pid})" in err
        router.signal(signal.SIGTERM)
        assert await router.wait() == 0
        assert router.lines[-1] == "INFO: stopped"
    finally:
        await router.aclose()


pytestmark = pytest.mark.timeout(120)


@needs_dcmtk
async def test_sighup_reloads_nodes_and_a_bad_file_keeps_the_router_up(tmp_path: Path, nursery: trio.Nursery) -> None:
    data = tmp_path / "capacitor-data"
    scp, api = free_port(), free_port()
    router = RouterProcess(data, f"--config.scpPort={scp}", f"--config.api.port={api}")
    try:
        await router.start(nursery)

        async def echo(called: str) -> int:
            done = await trio.run_process(
                ["echoscu", "-aec", called, "127.0.0.1", str(scp)], env=dcmtk_env(), check=False,
                capture_stdout=True, capture_stderr=True,
            )
            return done.returncode

        assert await echo("ADDED") != 0
        (data / "nodes.yml").write_text("- AeTitle: ADDED\n  HostName: 127.0.0.1\n  Port: 9\n")
        router.signal(signal.SIGHUP)
        await router.wait_for_line(lambda line: "configuration reloaded: added ADDED" in line)
        assert await echo("ADDED") == 0  # the called AE now names a node
        (data / "nodes.yml").write_text("- AeTitle: [broken\n")
        router.signal(signal.SIGHUP)
        line = await router.wait_for_line(lambda line: "configuration reload refused" in line)
        assert line.startswith("ERROR: ") and "nodes.yml" in line
        assert await echo("ADDED") == 0  # the previous configuration stays in force
        router.signal(signal.SIGTERM)
        assert await router.wait() == 0
        assert not any("Traceback" in line for line in router.lines)
    finally:
        await router.aclose()
