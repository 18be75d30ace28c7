"""The operator console in a real headless browser (Debian's Chromium driven by Playwright)
against the real server with an admin key: it loads, lists the adapters, streams a playground
answer from two models side by side, changes a canary weight with the admin key and is refused
without it, and fits a phone-sized screen.

Set ``LORASWAP_CONSOLE_SHOTS=docs`` to write the screenshots the README shows.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import BASE_MODEL, ROOT_KEY, SHIPPED

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
        "--disable-background-networking", "--disable-component-update"]  # fmt: skip
DEMO = "console-demo"


def admin(server, method: str, path: str, **kwargs) -> dict:
    resp = httpx.request(method, server.url + path, timeout=120,
                         headers={"Authorization": f"Bearer {ROOT_KEY}"}, **kwargs)  # fmt: skip
    assert resp.status_code < 300, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def console(tenanted):
    """The keyed server with a two-version adapter (for the canary) and some traffic."""
    for version, source in (("v1", SHIPPED / "uppercase"), ("v2", SHIPPED / "json")):
        admin(tenanted, "POST", "/admin/adapters", json={"name": DEMO, "source": str(source),
              "version": version, "promote": version == "v1"})  # fmt: skip
    admin(tenanted, "PUT", f"/admin/adapters/{DEMO}/alias",
          json={"version": "v1", "shadow_version": "v2", "shadow_rate": 1.0})  # fmt: skip
    for text in ("Name a fruit.", "Say hello."):
        admin(tenanted, "POST", "/v1/chat/completions", json={"model": DEMO, "max_tokens": 12,
              "temperature": 0, "messages": [{"role": "user", "content": text}]})  # fmt: skip
    deadline = time.monotonic() + 120
    while not admin(tenanted, "GET", f"/admin/comparisons?adapter={DEMO}")["data"]:
        assert time.monotonic() < deadline, "the shadow answers were not stored"
        time.sleep(0.5)
    yield tenanted
    admin(tenanted, "DELETE", f"/admin/adapters/{DEMO}")


def shots() -> Path | None:
    where = os.environ.get("LORASWAP_CONSOLE_SHOTS")
    return Path(where) if where else None


def test_console_lists_streams_and_guards_admin_actions(browser, console, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{console.url}/console")
    assert page.title() == "loraswap console"
    expect(page.locator("#status")).to_contain_text("missing or invalid API key")  # keys are on

    page.fill("#api-key", ROOT_KEY)
    page.click("#save-key")
    for name in ("uppercase", "json", DEMO):  # the shipped adapters and the test's
        expect(page.locator(f"#adapters [data-adapter='{name}']")).to_be_visible()
    card = page.locator(f"#adapters [data-adapter='{DEMO}']")
    expect(card.locator("tr[data-version='v1']")).to_contain_text("engine")  # it served traffic
    expect(page.locator(f"#traffic tr[data-traffic-model='{DEMO}@v1']")).to_be_visible()
    expect(page.locator(f"#comparisons [data-comparison='{DEMO}']")).to_be_visible()
    expect(page.locator("#server")).to_contain_text(BASE_MODEL)
    if shots():
        page.locator("#adapters-section").screenshot(path=str(shots() / "console-adapters.png"))
        for section in ("traffic", "comparisons"):
            page.locator(f"#{section}-section").screenshot(
                path=str(shots() / f"console-{section}.png")
            )

    # the canary weight: refused without the admin key (the page's key dropped, as by another
    # tab), changed with it
    page.evaluate("sessionStorage.removeItem('loraswap.key')")
    card.locator("[data-role=canary-version]").select_option("v2")
    card.locator("[data-role=canary-weight]").fill("0.25")
    card.locator("[data-action=set-canary]").click()
    expect(page.locator("#status")).to_contain_text("missing or invalid API key")
    assert admin(console, "GET", f"/admin/adapters/{DEMO}")["alias"]["canary_weight"] == 0
    page.fill("#api-key", ROOT_KEY)
    page.click("#save-key")
    expect(card.locator("[data-action=set-canary]")).to_be_visible()
    card.locator("[data-role=canary-version]").select_option("v2")
    card.locator("[data-role=canary-weight]").fill("0.25")
    card.locator("[data-action=set-canary]").click()
    expect(page.locator("#status")).to_contain_text(f"set-canary {DEMO}: ok")
    alias = admin(console, "GET", f"/admin/adapters/{DEMO}")["alias"]
    assert (alias["canary_version"], alias["canary_weight"]) == ("v2", 0.25)
    assert alias["shadow_version"] == "v2"  # the other settings kept
    audit = admin(console, "GET", f"/admin/audit?adapter={DEMO}")["data"][0]
    assert audit["action"] == "alias" and audit["actor"] == "admin"

    # the playground: one prompt, two models streamed side by side
    prompt, tokens = "Name a fruit.", 12
    page.fill("#pg-prompt", prompt)
    page.fill("#pg-max-tokens", str(tokens))
    page.locator(f"#pg-models input[value='{BASE_MODEL}']").check()
    page.locator("#pg-models input[value='uppercase']").check()
    page.click("#pg-run")
    columns = {m: page.locator(f".pg-column[data-model='{m}']") for m in (BASE_MODEL, "uppercase")}
    for column in columns.values():
        expect(column).to_have_attribute("data-state", "done", timeout=120_000)
    for model, column in columns.items():  # each column holds what that model answers alone
        body = {
            "model": model,
            "max_tokens": tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": prompt}],
        }
        alone = admin(console, "POST", "/generate", json=body)
        assert column.locator(".pg-output").inner_text().strip() == alone["text"].strip()
    if shots():
        page.locator("#playground-section").screenshot(path=str(shots() / "console-playground.png"))
    page.screenshot(path=str(tmp_path / "desktop.png"), full_page=True)

    # a phone-sized screen: one column, nothing wider than the screen
    phone = browser.new_page(viewport={"width": 375, "height": 740}, device_scale_factor=2)
    phone.goto(f"{console.url}/console")
    phone.fill("#api-key", ROOT_KEY)
    phone.click("#save-key")
    phone_card = phone.locator(f"#adapters [data-adapter='{DEMO}']")
    expect(phone_card).to_be_visible()
    expect(phone.locator("#status")).to_have_text("ok")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 375
    phone_card.screenshot(path=str((shots() or tmp_path) / "console-phone.png"))
    assert errors == [], errors
