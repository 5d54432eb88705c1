"""issue 23: the dashboard against hostile DICOM values, in headless chromium. A peer sends
instances whose PatientName, PatientID, AccessionNumber, descriptions, a private tag and its
calling AE title are HTML or script; every page that shows them (dashboard, queue, item detail,
logs) must show the text literally and run none of it: checked with the Content-Security-Policy
bypassed (the pages' own escaping alone), and separately that the policy alone refuses an
injected inline script. Also: the login page's redirect target never leaves the site."""

from __future__ import annotations

import urllib.parse
import warnings
from typing import TYPE_CHECKING

import pytest

from tests.helpers.datasets import make_dataset

from .conftest import Router, log_in, needs_browser

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

expect = pytest.importorskip("playwright.sync_api", reason="Playwright: the test extra").expect

pytestmark = [pytest.mark.browser, needs_browser]

HOSTILE_AE = "<svg/onload=x>"  # 14 characters: a valid AE title
NAME = "<script>alert(document.domain)</script>"  # no "=": that separates a PN's groups
PATIENT_ID = '"><svg onload=window.__pwned=2>'
ACCESSION = "<b id=pwn>x</b>"
SERIES = "</td><script>window.__pwned=3</script>"
STUDY = "javascript:window.__pwned=4"
PRIVATE = "<img src=x onerror=window.__pwned=5>"
BIRTH_NAME = "Hostile^birthname"


def _send_hostile(router: Router, called_ae: str) -> str:
    """One hostile instance from the calling AE `HOSTILE_AE`, then an abort (logged with the
    calling AE at INFO). Returns its SOP Instance UID."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    with warnings.catch_warnings():  # pydicom warns of values it finds odd: sending them is the point
        warnings.simplefilter("ignore")
        ds = make_dataset(rows=8, columns=8, patient_name=NAME, patient_id=PATIENT_ID, accession=ACCESSION)
        ds.SeriesDescription = SERIES
        ds.StudyDescription = STUDY
        ds.add_new(0x00090010, "LO", "EVIL")
        ds.add_new(0x00091001, "LO", PRIVATE)
        ds.add_new(0x00101005, "CS", BIRTH_NAME)  # a name under a VR it does not fit
    ae = AE(ae_title=HOSTILE_AE)
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", router.scp_port, ae_title=called_ae)
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assert status.Status == 0x0000, status
    assoc.abort()
    return str(ds.SOPInstanceUID)


@pytest.fixture(scope="module")
def hostile_item(router: Router) -> int:
    router.post("/api/nodes/DEAD/pause")  # the item stays queued, in view
    uid = _send_hostile(router, "DEAD")
    (item,) = router.get("/api/queue/items", search=uid.lower())["items"]
    return int(item["id"])


def _no_script_ran(page: Page) -> None:
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#pwn, main svg, main img, main script").count() == 0


def test_hostile_values_show_as_text_and_run_nothing(router: Router, browser: Browser, hostile_item: int) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True)
    context.set_default_timeout(20_000)
    dialogs: list[str] = []
    try:
        page = context.new_page()
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        log_in(page, router.base)  # logged in: the names are shown too
        page.goto(f"{router.base}/queue?dest=DEAD")
        row = page.locator(f'#items tr[data-item="{hostile_item}"]')
        expect(row.locator("td.patient")).to_have_text(f"{NAME} ({PATIENT_ID})")
        expect(row).to_contain_text(ACCESSION)
        expect(row).to_contain_text(HOSTILE_AE)
        _no_script_ran(page)
        page.goto(f"{router.base}/queue/{hostile_item}")
        tags = page.locator("#tags")
        for text in (NAME, PATIENT_ID, ACCESSION, SERIES, STUDY, PRIVATE):
            expect(tags).to_contain_text(text)
        expect(page.locator("#item-fields")).to_contain_text(HOSTILE_AE)
        _no_script_ran(page)
        page.goto(f"{router.base}/logs")
        expect(page.locator("#log-lines")).to_contain_text(f"DICOM association from {HOSTILE_AE} aborted")
        _no_script_ran(page)
        page.goto(f"{router.base}/")
        expect(page.locator('article[data-node="DEAD|Storage"]')).to_be_visible()
        _no_script_ran(page)
        assert dialogs == []
    finally:
        context.close()


def test_the_policy_alone_refuses_an_injected_inline_script(router: Router, page: Page) -> None:
    """Were a value ever written into the page as HTML, the Content-Security-Policy would still
    refuse its inline handler and its inline script."""
    page.goto(f"{router.base}/")
    ran = page.evaluate("""() => new Promise((resolve) => {
        const box = document.createElement("div");
        box.innerHTML = '<img src="/no-such-image" onerror="window.__pwned = 1">';
        const script = document.createElement("script");
        script.textContent = "window.__pwned = 2";
        document.body.append(box, script);
        // registered after the inline handler: it runs after it, had the handler been allowed
        box.firstChild.addEventListener("error", () => resolve(window.__pwned === undefined ? null : window.__pwned));
    })""")
    assert ran is None


def test_no_patient_name_in_the_logs_page_or_without_login(router: Router, page: Page, hostile_item: int) -> None:
    """Without a session neither the queue, the item's tags (private ones included) nor the logs
    show the hostile instance's names, also one sent under a VR it does not fit (pydicom quotes
    such a value when it checks one: reading the header for the index and the detail must not)."""
    router.get(f"/api/queue/items/{hostile_item}")  # read with the token: the header is parsed
    for path in ("/queue?dest=DEAD", f"/queue/{hostile_item}", "/logs"):
        page.goto(router.base + path)
        page.wait_for_load_state("networkidle")
        html = page.content()
        assert "alert(document.domain)" not in html and "__pwned=5" not in html, path
        assert "birthname" not in html, path
    assert not any("birthname" in line for line in router.lines)  # nor the log itself
    page.goto(f"{router.base}/queue/{hostile_item}")
    expect(page.locator("#tags")).to_contain_text(PATIENT_ID)  # the identity is shown
    assert page.evaluate("window.__pwned") is None


@pytest.mark.parametrize("target", ["/\t/evil.example/", "/\n/evil.example/", "/\\evil.example", "//evil.example",
                                    "https://evil.example/", "javascript:alert(1)"])
def test_login_returns_only_to_this_site(router: Router, page: Page, target: str) -> None:
    """The page's own check (were the server's ever to let a target through), then the whole
    login: whatever `next` says, the browser lands on this site."""
    page.goto(f"{router.base}/login")
    assert page.evaluate("(t) => safeNext(t)", target) == "/"
    assert page.evaluate("(t) => safeNext(t)", "/queue?state=failed#x") == "/queue?state=failed#x"
    page.goto(f"{router.base}/login?next={urllib.parse.quote(target, safe='')}")
    page.get_by_label("Service password").fill("browser-password")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: url == f"{router.base}/")


def test_a_page_of_another_origin_cannot_pause_a_node_through_the_edit_page(router: Router, page: Page) -> None:
    """A page of another program on this machine is the same site: the session cookie goes along
    when it sends the browser to a node's edit page, directly or through the login's next. The
    edit page pauses the node as it opens only when opened from the node's card; otherwise the
    node is paused when the edit is saved."""
    port = int(router.base.rsplit(":", 1)[1])
    evil = f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/evil.html"  # same site, other origin
    edit = f"{router.base}/nodes/STORESCP/edit?role=Storage"
    trampoline = f"{router.base}/login?next={urllib.parse.quote('/nodes/STORESCP/edit?role=Storage', safe='')}"
    page.route(evil, lambda route: route.fulfill(content_type="text/html", body=(
        f'<a id="go" href="{trampoline}">x</a><script>document.getElementById("go").click()</script>'
    )))
    page.goto(evil)  # through the login: the operator logs in, the page goes on to `edit`
    page.get_by_label("Service password").fill("browser-password")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(edit)
    expect(page.locator("#edit-pause-note")).to_contain_text("not paused yet")
    assert router.get("/api/nodes/STORESCP")["paused"] is False
    page.route(evil, lambda route: route.fulfill(content_type="text/html", body=(
        f'<a id="go" href="{edit}">x</a><script>document.getElementById("go").click()</script>'
    )))
    page.goto(evil)  # directly, logged in
    page.wait_for_url(edit)
    expect(page.locator("#edit-pause-note")).to_contain_text("not paused yet")
    assert router.get("/api/nodes/STORESCP")["paused"] is False
    # saving pauses it first, then saves
    page.get_by_label("Priority").fill("1")
    page.get_by_role("button", name="Save to nodes.yml").click()
    expect(page.locator("#status")).to_contain_text("Saved STORESCP")
    assert router.get("/api/nodes/STORESCP")["paused"] is True
    router.post("/api/nodes/STORESCP/resume")


def test_a_cookie_tossed_by_another_local_page_does_not_log_the_operator_out(router: Router, page: Page) -> None:
    """Cookies do not keep to a port: a page of another program on this machine sets its own
    capacitor_session for /api, which the browser sends before the operator's. The dashboard
    still works with the operator's session."""
    log_in(page, router.base)
    port = int(router.base.rsplit(":", 1)[1])
    evil = f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/evil.html"  # same host, other port
    page.route(evil, lambda route: route.fulfill(content_type="text/html", body=(
        '<script>document.cookie = "capacitor_session=tossed; Path=/api"</script><p id="done">set</p>'
    )))
    page.goto(evil)
    expect(page.locator("#done")).to_be_visible()
    held = [c["value"] for c in page.context.cookies(router.base + "/api/nodes") if c["name"] == "capacitor_session"]
    assert len(held) == 2 and "tossed" in held  # the browser sends both to the API
    page.goto(f"{router.base}/")
    assert router.get("/api/nodes/STORESCP")["paused"] is False
    page.locator('article[data-node="STORESCP|Storage"]').get_by_role("button", name="Pause", exact=True).click()
    expect(page.locator("#status")).to_contain_text("Pause STORESCP: done")
    assert router.get("/api/nodes/STORESCP")["paused"] is True
    router.post("/api/nodes/STORESCP/resume")
