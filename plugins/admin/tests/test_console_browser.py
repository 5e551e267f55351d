"""The web console in a real browser (Debian's chromium through Playwright)
against a real `dbevents run`: sign in, filter to failed events, redeliver one
and see it delivered, a payload with markup shown as text, the live tail, and
no access without the token. With DBEVENTS_SCREENSHOTS=1 the pages are saved
as docs/console-*.png."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from plugins.admin.tests.support import TOKEN, XSS, Admin

CHROMIUM = Path("/usr/bin/chromium")
DOCS = Path(__file__).resolve().parents[3] / "docs"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install chromium"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it (.ci/run): a missing one is a failure
        pytest.skip(message)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


def shot(page: Page, name: str) -> None:
    if os.environ.get("DBEVENTS_SCREENSHOTS"):
        page.screenshot(path=str(DOCS / f"console-{name}.png"), full_page=True)


def test_console_redeliver_escaping_tail_and_sign_in(admin: Admin, browser: Browser) -> None:
    admin.sql(f"INSERT INTO items VALUES (1, 'one'), (2, $${XSS}$$), (3, 'three')")
    admin.wait_until("failed", lambda: len(admin.events("status=failed")) == 3)
    xss_id = admin.events("docId=2")[0]["id"]
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[Any] = []
    page.on("pageerror", lambda error: errors.append(error))

    # Without the token: every page sends the browser to sign in; the API refuses.
    page.goto(admin.base + "/events?status=failed")
    assert page.url.endswith("/login")
    assert page.request.get(admin.base + "/api/events").status == 401
    page.fill("input[name=token]", "not-the-token-at-all")
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_have_text("That is not the admin token.")
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Triggers")
    row = page.locator("table.triggers tbody tr").first
    expect(row).to_contain_text("items")
    expect(row.locator("td.num").nth(3)).to_have_text("3")  # failed
    shot(page, "triggers")

    # The failed events, filtered with the form.
    page.click("header nav a[href='/events']")
    page.select_option("select[name=status]", "failed")
    page.fill("input[name=table]", "items")
    page.click("form.filters button[type=submit]")
    assert "status=failed" in page.url
    expect(page.locator("table.events tbody tr")).to_have_count(3)
    shot(page, "events")

    # A row holding markup shows as text and runs nothing.
    page.goto(f"{admin.base}/events/{xss_id}")
    expect(page.locator("pre.payload")).to_contain_text("<script>window.__xss = 1</script>")
    expect(page.locator("pre.sent")).to_contain_text('onerror=')
    assert page.evaluate("window.__xss") is None
    assert page.locator("main img").count() == 0
    shot(page, "event")

    # Redeliver from the failed list; the page follows the event to delivered.
    admin.receiver.script("/hook", 200)
    page.goto(admin.base + "/events?status=failed")
    page.click(f'button[data-redeliver="{xss_id}"]')
    expect(page.locator(f'td[data-status-of="{xss_id}"]')).to_have_text(
        "delivered", timeout=60_000)
    assert [e["status"] for e in admin.events("docId=2")] == ["delivered"]

    # The live tail shows deliveries as they happen.
    page.goto(admin.base + "/tail")
    expect(page.locator("#tail tr").first).to_be_visible()
    expect(page.locator("#tail td.status.delivered")).to_have_count(1)
    assert page.evaluate("window.__xss") is None
    shot(page, "tail")

    # Signing out ends the session.
    page.click("header .logout button")
    assert page.url.endswith("/login")
    assert page.request.get(admin.base + "/api/events").status == 401
    assert errors == []
