"""issue 23's browser tests: the dashboard in headless chromium against `capacitor-trio run`
with DCMTK peers. Each test opens its own browser context (no cookies); the router is shared."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

from .conftest import Router, log_in, needs_browser

if TYPE_CHECKING:
    from playwright.sync_api import Page

expect = pytest.importorskip("playwright.sync_api", reason="Playwright: the test extra").expect

pytestmark = [pytest.mark.browser, needs_browser]


def card(page: Page, ae: str):  # type: ignore[no-untyped-def]
    return page.locator(f'article[data-node="{ae}|Storage"]')


def fact(page: Page, ae: str, name: str):  # type: ignore[no-untyped-def]
    return card(page, ae).locator(f'[data-fact="{name}"]')


def test_login_see_counts_change_and_pause_a_node(router: Router, page: Page) -> None:
    log_in(page, router.base)
    expect(page.get_by_role("button", name="Log out")).to_be_visible()
    expect(card(page, "STORESCP")).to_be_visible()
    expect(card(page, "DEAD")).to_be_visible()
    expect(fact(page, "STORESCP", "lastDelivery")).to_have_text("never")
    expect(fact(page, "DEAD", "queue")).to_contain_text("new 0 · prepared 0 · failed 0")
    # while storescu sends, the cards change without a reload: deliveries to STORESCP, failures at
    # DEAD (its items fail, then wait: prepared while the node backs off, failed after an attempt)
    sending = [router.send("STORESCP", 20, wait=False), router.send("DEAD", 3, wait=False)]
    for proc in sending:
        router.finish(proc)
    expect(fact(page, "STORESCP", "lastDelivery")).not_to_have_text("never")
    expect(fact(page, "DEAD", "queue")).to_contain_text(re.compile(r"failed [1-3] "))
    queue = router.get("/api/nodes/DEAD")["queue"]
    assert queue["new"] + queue["prepared"] + queue["failed"] == 3
    expect(fact(page, "DEAD", "oldest")).not_to_have_text("—")
    expect(fact(page, "DEAD", "lastError")).not_to_have_text("none")
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1  # no reload

    # only the buttons that apply are shown (a running, unpaused node: no Resume, no Restart)
    expect(card(page, "STORESCP").get_by_role("button", name="Resume")).to_be_hidden()
    expect(card(page, "STORESCP").get_by_role("button", name="Restart")).to_be_hidden()
    # pause a node from its card: the API reports it paused
    card(page, "STORESCP").get_by_role("button", name="Pause").click()
    expect(fact(page, "STORESCP", "paused")).to_have_text("yes")
    assert router.get("/api/nodes/STORESCP")["paused"] is True
    # with the keyboard: the card's Resume button is a real button, focusable and pressable
    card(page, "STORESCP").get_by_role("button", name="Resume").focus()
    page.keyboard.press("Enter")
    expect(fact(page, "STORESCP", "paused")).to_have_text("no")
    assert router.get("/api/nodes/STORESCP")["paused"] is False
    # readable at 1280 x 800: nothing wider than the window
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280


def test_retry_a_failed_item_from_the_queue_page(router: Router, page: Page) -> None:
    router.send("DEAD", 1)
    log_in(page, router.base, "/queue")
    page.get_by_label("State", exact=True).select_option("failed")
    page.get_by_label("Destination", exact=True).fill("DEAD")
    page.get_by_role("button", name="Apply").click()
    row = page.locator("#items tr").first
    expect(row).to_contain_text("failed")
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    router.post("/api/nodes/DEAD/pause")  # so that the retried item waits instead of failing again
    item_id = int(row.get_attribute("data-item") or "0")
    row.get_by_role("button", name=f"Retry item {item_id}").click()
    expect(page.locator("#status")).to_contain_text(f"retry item {item_id}: done")
    assert router.get(f"/api/queue/items/{item_id}")["state"] in ("new", "prepared")
    router.post("/api/nodes/DEAD/resume")


def test_edit_a_node(router: Router, page: Page) -> None:
    log_in(page, router.base)
    card(page, "DEAD").get_by_role("link", name="Edit…").click()
    page.wait_for_url(f"{router.base}/nodes/DEAD/edit?role=Storage")
    # opened from its card, the node is paused before it can be edited
    expect(page.locator("#edit-pause-note")).to_contain_text("has been paused for editing")
    assert router.get("/api/nodes/DEAD")["paused"] is True
    before = (router.data / "nodes.yml").read_text()
    port = page.get_by_label("Port", exact=True)
    expect(port).not_to_have_value("")
    port.fill("0")
    page.get_by_role("button", name="Save to nodes.yml").click()
    # the API's validation error, next to its field
    expect(page.locator("#e-port")).to_contain_text("must be 1..65535")
    expect(port).to_have_attribute("aria-invalid", "true")
    assert (router.data / "nodes.yml").read_text() == before
    port.fill("11112")
    page.get_by_label("Priority", exact=True).fill("1")
    page.get_by_role("button", name="Save to nodes.yml").click()
    expect(page.locator("#status")).to_contain_text("Saved DEAD to nodes.yml")
    expect(page.locator("#e-port")).to_have_text("")
    after = (router.data / "nodes.yml").read_text()
    assert "Port: 11112" in after and "Priority: 1" in after
    assert "# the destinations of the browser tests" in after  # the operator's comment kept
    node = router.get("/api/nodes/DEAD")
    assert node["port"] == 11112 and node["priority"] == 1
    page.get_by_role("button", name="Resume the node").click()
    expect(page.locator("#edit-pause-note")).to_contain_text("resumed")
    assert router.get("/api/nodes/DEAD")["paused"] is False


def test_no_patient_name_without_login_and_log_out(router: Router, page: Page) -> None:
    router.send("DEAD", 1)
    page.goto(f"{router.base}/queue?dest=DEAD")
    expect(page.locator("#items tr").first).to_contain_text("PID001")
    assert "DOE" not in page.content()
    # a write without a session shows the login instead
    page.goto(f"{router.base}/")
    card(page, "DEAD").get_by_role("button", name=re.compile("^(Pause|Resume)$")).first.click()
    page.wait_for_url(re.compile(r"/login\?next="))
    expect(page.get_by_label("Service password")).to_be_focused()
    page.get_by_label("Service password").fill("browser-password")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: url == f"{router.base}/")
    page.goto(f"{router.base}/queue?dest=DEAD")
    expect(page.locator("#items tr").first.locator("td.patient")).to_contain_text("DOE JANE")
    # Settings: the configuration with secrets redacted, nodes.yml, the filter files' placeholder
    page.get_by_role("link", name="Settings").click()
    expect(page.locator("#nodes-yml")).to_contain_text("AeTitle: STORESCP")
    expect(page.get_by_role("row", name=re.compile(r"^api\.token"))).to_contain_text("<redacted>")
    expect(page.locator("#filter-files")).to_contain_text("No filter files")
    assert "browser-password" not in page.content()
    # Logs: recent records with a level filter
    page.get_by_role("link", name="Logs").click()
    expect(page.locator("#log-lines")).to_contain_text("router ready")
    page.get_by_label("Level at least").select_option("ERROR")
    expect(page.locator("#log-lines")).not_to_contain_text("router ready")
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("link", name="Log in")).to_be_visible()
    page.goto(f"{router.base}/queue?dest=DEAD")
    expect(page.locator("#items tr").first).to_contain_text("PID001")
    assert "DOE" not in page.content()


def test_cross_site_form_post_with_the_session_cookie_is_refused(router: Router, page: Page) -> None:
    log_in(page, router.base)
    assert router.get("/api/service/status")["storageScu"] is True
    port = int(router.base.rsplit(":", 1)[1])
    evil = f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/evil.html"  # same site, other origin
    page.route(evil, lambda route: route.fulfill(content_type="text/html", body=(
        f'<form id="f" method="POST" action="{router.base}/api/service/pause"><input name="x" value="1"></form>'
        '<script>document.getElementById("f").submit()</script>'
    )))
    with page.expect_response(f"{router.base}/api/service/pause") as answer:
        page.goto(evil)
    assert answer.value.status == 403
    assert "cross-site" in answer.value.text()
    assert router.get("/api/service/status")["storageScu"] is True
