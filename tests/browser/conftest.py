"""The dashboard in a real headless browser: Debian's chromium driven by Playwright for Python
(sync API; these tests are plain functions, not Trio ones), against `capacitor-trio run` as a
subprocess with DCMTK peers: storescp as one destination (STORESCP), a port nobody listens on
as the other (DEAD: its items fail), storescu as the modality.

One router per module, shared by its tests; each test gets a fresh browser context (no cookies).
Skipped cleanly when chromium or Playwright is absent (./scripts/test installs both).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from tests.helpers.datasets import write_corpus
from tests.helpers.peers import HAVE_DCMTK, dcmtk_env, free_port

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "browser-password"
TOKEN = "browser-token"

try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

    expect.set_options(timeout=20_000)  # the cards refresh every 2 s; deliveries take a moment
except ImportError:  # the test extra not installed
    sync_playwright = None  # type: ignore[assignment]

needs_browser = pytest.mark.skipif(
    sync_playwright is None or not os.access(CHROMIUM, os.X_OK) or not HAVE_DCMTK,
    reason="needs Playwright (the test extra), /usr/bin/chromium and DCMTK (./scripts/test installs them)",
)


@attrs.define
class Router:
    """The router subprocess, its peers and a bearer-token API client to check what it reports."""

    data: Path
    base: str
    scp_port: int
    proc: subprocess.Popen[bytes]
    storescp: subprocess.Popen[bytes]
    api: httpx.Client
    lines: list[str] = attrs.field(factory=list)
    corpus: Path | None = None
    sent: int = 0

    def get(self, path: str, **params: Any) -> Any:
        body = self.api.get(path, params=params).json()
        assert body["ok"], body
        return body["data"]

    def post(self, path: str, **kw: Any) -> Any:
        body = self.api.post(path, **kw).json()
        assert body["ok"], body
        return body["data"]

    def send(self, called_ae: str, n: int, *, wait: bool = True) -> subprocess.Popen[bytes]:
        """storescu `n` fresh images to `called_ae` (one association)."""
        files = write_corpus(self.data.parent / f"corpus{self.sent}", n, rows=32)
        self.sent += 1
        proc = subprocess.Popen(
            ["storescu", "-aet", "MODALITY", "-aec", called_ae, "127.0.0.1", str(self.scp_port), *map(str, files)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dcmtk_env(),
        )
        if wait:
            self.finish(proc)
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen[bytes]) -> None:
        """Wait for a `send` and check that storescu succeeded."""
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-2000:]


def _config(data: Path, scp_port: int, api_port: int, storescp_port: int, dead_port: int) -> None:
    data.mkdir(parents=True)
    (data / "config.yml").write_text(
        f"myAeTitle: ROUTER\nscpPort: {scp_port}\nminimumAge: 0\nstorageInterval: 0\n"
        "retryDelaySeconds: 1\nretryMaxDelaySeconds: 2\ndurableWrites: false\n"
        f"api:\n  enabled: true\n  port: {api_port}\n  token: {TOKEN}\n  servicePassword: {PASSWORD}\n"
    )
    (data / "nodes.yml").write_text(
        f"# the destinations of the browser tests\n"
        f"- AeTitle: STORESCP\n  HostName: 127.0.0.1\n  Port: {storescp_port}\n"
        f"- AeTitle: DEAD\n  HostName: 127.0.0.1\n  Port: {dead_port}\n"
    )


def _read_lines(proc: subprocess.Popen[bytes], lines: list[str], ready: threading.Event) -> None:
    assert proc.stderr is not None
    for raw in proc.stderr:
        line = raw.decode(errors="replace").rstrip("\n")
        lines.append(line)
        if "router ready" in line:
            ready.set()
    ready.set()  # exited: the waiter looks at the return code


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    if sync_playwright is None or not os.access(CHROMIUM, os.X_OK) or not HAVE_DCMTK:
        pytest.skip("needs Playwright, /usr/bin/chromium and DCMTK")
    root = tmp_path_factory.mktemp("browser")
    scp_port, api_port, storescp_port, dead_port = (free_port() for _ in range(4))
    (root / "received").mkdir()
    storescp = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(root / "received"), str(storescp_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env(),
    )
    data = root / "data"
    _config(data, scp_port, api_port, storescp_port, dead_port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "capacitor_trio", "run", "--path", str(data)],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    ready = threading.Event()
    reader = threading.Thread(target=_read_lines, args=(proc, lines, ready), daemon=True)
    reader.start()
    api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=20)
    r = Router(data, f"http://127.0.0.1:{api_port}", scp_port, proc, storescp, api, lines)
    try:
        assert ready.wait(30) and proc.poll() is None, "\n".join(lines[-30:])
        yield r
    finally:
        api.close()
        for p in (proc, storescp):
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        reader.join(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()
        assert not any("Traceback" in line for line in lines), "\n".join(lines)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None or not os.access(CHROMIUM, os.X_OK):
        pytest.skip("needs Playwright and /usr/bin/chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    ctx.set_default_timeout(20_000)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def log_in(page: Page, base: str, next_path: str = "/") -> None:
    """Log in on the login page; it returns to `next_path`."""
    page.goto(f"{base}/login?next={urllib.parse.quote(next_path, safe='')}")
    page.get_by_label("Service password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: url == f"{base}{next_path}")


__all__ = ["PASSWORD", "Router", "log_in", "needs_browser"]
