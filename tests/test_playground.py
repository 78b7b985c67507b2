"""The playground page end to end: Playwright drives Debian's headless Chromium against a live
server on loopback. Type a prompt and a preference, press Generate, and wait for the base and
personalized outputs and the reward-colored token view; or run A/B for a user and teach the
profile by preferring one answer. The screenshot is saved to ``out/playground.png``
(``$PADLM_SCREENSHOT`` overrides the path).
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from padlm import Personalizer
from padlm.profiles.service import ProfileService
from padlm.profiles.store import open_store
from padlm.server.app import ServerThread, create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(os.environ.get("PADLM_SCREENSHOT",
                                 Path(__file__).resolve().parents[1] / "out" / "playground.png"))


@contextlib.contextmanager
def playground(engine: Personalizer, profiles: ProfileService | None = None):
    """A live server for ``engine`` (keeping ``profiles``, if given) and a Chromium page on its
    playground, allowed to reach loopback only; yields (page, app) and checks the page's own
    errors."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "run scripts/install-system-deps.sh to install chromium"
    app = create_app(engine, max_batch_size=4, max_queue=8, profiles=profiles)
    with ServerThread(app) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            outside: list[str] = []

            def loopback_only(route):
                host = urlparse(route.request.url).hostname
                if host in ("127.0.0.1", "localhost"):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", loopback_only)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url + "/")
            yield page, app
        finally:
            browser.close()
    assert not errors, errors
    assert not outside, f"the page reached beyond loopback: {outside}"
    assert app.state.service.worker.live_rows == 0


def wait_for_both_panes(page) -> None:
    from playwright.sync_api import expect

    for pane in ("base", "personalized"):
        expect(page.locator(f"#{pane}-status")).to_have_attribute(
            "data-state", "done", timeout=180_000)
        assert page.locator(f"#{pane}-output").inner_text().strip()


@pytest.mark.slow
def test_playground_streams_both_outputs_and_the_token_view(default_lm):
    from playwright.sync_api import expect

    engine = Personalizer(default_lm, persrm="default")  # the shipped PersRM when there is one
    with playground(engine) as (page, app):
        expect(page.locator("#presets .chip")).to_have_count(9)  # P-Soups + PAD presets
        page.fill("#prompt", "Explain how a rainbow forms.")
        page.locator("#presets .chip", has_text="P1A").click()
        page.locator("#preference").press("End")
        page.locator("#preference").type("+P2A")
        expect(page.locator("#presets .chip[aria-pressed=true]")).to_have_count(2)
        page.select_option("#strategy", "pad")
        expect(page.locator("#mix-field")).to_be_hidden()
        page.fill("#weight", "1.0")
        page.fill("#max-tokens", "12")
        page.click("#generate")
        wait_for_both_panes(page)
        tokens = page.locator("#token-view span")
        assert 1 <= tokens.count() <= 12
        rewards = tokens.evaluate_all("spans => spans.map(s => s.dataset.reward)")
        assert all(r != "" and abs(float(r)) < 1e3 for r in rewards)
        joined = "".join(tokens.all_inner_texts())
        assert joined.strip() and joined.strip()[:5] in page.locator(
            "#personalized-output").inner_text()
        assert all(tokens.evaluate_all("spans => spans.map(s => !!s.style.background)"))
        assert "tokens/s" in page.locator("#personalized-status").inner_text()
        expect(page.locator("#mix-section")).to_be_hidden()  # no experts, no weight bar
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000


@pytest.mark.slow
def test_playground_mix_shows_each_tokens_expert_weights(default_lm):
    """Strategy mix with uniform weights over three experts: one stacked column per token,
    its three segments summing to one, and a legend naming the experts."""
    from playwright.sync_api import expect

    with playground(Personalizer(default_lm, persrm="identity")) as (page, _):
        page.fill("#prompt", "Explain how a rainbow forms.")
        page.fill("#preference", "P1A+P2B+P3A")
        page.select_option("#strategy", "mix")
        expect(page.locator("#mix-field")).to_be_visible()
        page.select_option("#mix", "uniform")
        page.fill("#max-tokens", "8")
        page.click("#generate")
        wait_for_both_panes(page)
        expect(page.locator("#mix-section")).to_be_visible()
        columns = page.locator("#mix-bar .column")
        assert columns.count() == page.locator("#token-view span").count() >= 1
        weights = columns.evaluate_all(
            "cols => cols.map(c => [...c.children].map(s => Number(s.dataset.weight)))")
        assert all(len(w) == 3 and abs(sum(w) - 1) < 1e-4 and max(w) - min(w) < 1e-4
                   for w in weights)
        assert page.locator("#mix-legend").inner_text().split() == ["P1A", "P2B", "P3A"]
        page.screenshot(path=str(SCREENSHOT.with_name("playground-mix.png")), full_page=True)


def profile_rows(page) -> dict[str, float]:
    """P(side A) per axis as the table holds it, checked against what it shows (the three
    digits the server reports)."""
    rows = page.locator("#ab-profile tbody tr").evaluate_all(
        "rows => rows.map(r => [r.dataset.axis, r.dataset.pSideA, "
        "r.querySelector('[data-role=p-side-a]').textContent])")
    assert all(float(p) == float(shown) for _, p, shown in rows), rows
    return {axis: float(p) for axis, p, _ in rows}


def run_ab(page) -> None:
    """One A/B round, waited for until both answers are on screen and choosable."""
    from playwright.sync_api import expect

    page.click("#ab-run")
    expect(page.locator("#ab-status")).to_have_attribute("data-state", "ready", timeout=180_000)
    for i in (0, 1):
        assert page.locator(f"#ab-output-{i}").inner_text().strip()
        expect(page.locator(f"#ab-prefer-{i}")).to_be_enabled()


@pytest.mark.slow
def test_playground_ab_learns_the_users_profile(default_lm, tmp_path):
    """The whole loop a user sees: A/B answers for a fresh profile, a choice that moves the
    weights on screen and in the store alike (the page renders what /v1/feedback answered,
    so GET /v1/profiles must agree), a second round, then forgetting. The shipped PersRM
    makes the two sides' answers differ, which a choice needs to teach anything. A server
    without profiles refuses explore with a 400 the page shows, not a silent blank."""
    from playwright.sync_api import expect

    engine = Personalizer(default_lm, persrm="default")
    user = "playground-user"
    profiles = ProfileService(open_store(f"sqlite:///{tmp_path / 'p.db'}"))
    with playground(engine, profiles) as (page, _):
        expect(page.locator("#ab-user")).to_have_value(user)
        expect(page.locator("#ab-profile tbody tr")).to_have_count(3)  # the fresh profile
        expect(page.locator("#ab-choices")).to_have_text("0")
        assert set(profile_rows(page).values()) == {0.5}
        page.fill("#prompt", "Explain how a rainbow forms.")
        page.fill("#max-tokens", "12")
        run_ab(page)
        # a fresh profile is unsure of every axis: the two answers differ on all three
        assert page.locator("#ab-side-0").inner_text() == \
            "(P1A: simple · P2A: concise · P3A: friendly)"
        assert page.locator("#ab-side-1").inner_text() == \
            "(P1B: expert · P2B: detailed · P3B: unfriendly)"
        page.get_by_role("button", name="Prefer B").click()
        expect(page.locator("#ab-choices")).to_have_text("1")
        expect(page.locator("#ab-status")).to_have_attribute("data-state", "learned")
        expect(page.locator("#ab-prefer-0")).to_be_disabled()  # one choice per pair
        shown = profile_rows(page)
        assert any(p != 0.5 for p in shown.values()), shown
        assert shown["P1"] < 0.5  # B was the expert side
        assert page.locator("#ab-preference").inner_text() != "no preference yet"
        url = page.url.rstrip("/") + f"/v1/profiles/{user}"
        with urllib.request.urlopen(url) as response:
            stored = json.load(response)
        assert stored["version"] == 1 and stored["choices"] == 1
        assert {axis: state["p_side_a"] for axis, state in stored["axes"].items()} == shown
        assert page.locator("#ab-preference").inner_text() == stored["preference"]
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT.with_name("playground-ab.png")), full_page=True)

        run_ab(page)
        page.get_by_role("button", name="Prefer A").click()
        expect(page.locator("#ab-choices")).to_have_text("2")
        expect(page.locator("#ab-version")).to_have_text("2")

        page.click("#ab-forget")
        expect(page.locator("#ab-status")).to_have_attribute("data-state", "forgotten")
        expect(page.locator("#ab-choices")).to_have_text("0")

    with playground(engine) as (page, _):
        expect(page.locator("#ab-status")).to_contain_text("keeps no profiles")
        page.fill("#prompt", "Explain how a rainbow forms.")
        page.fill("#max-tokens", "12")
        page.click("#ab-run")
        status = page.locator("#ab-status")
        expect(status).to_have_attribute("data-state", "error")
        expect(status).to_have_class("status error")
        expect(status).to_contain_text("400")
        expect(status).to_contain_text("needs a server with profiles")
        expect(page.locator("#ab-prefer-1")).to_be_disabled()


def test_playground_ab_names_free_text_sides(tiny_engine, tmp_path):
    """A server learning free-text axes too (--profile-axes): the table has a row per axis
    and each answer names its free-text sides by their own names."""
    from playwright.sync_api import expect

    from padlm.profiles.features import parse_axes

    profiles = ProfileService(open_store(f"sqlite:///{tmp_path / 'p.db'}"),
                              axes=parse_axes("P1,P2,P3,format,energy"))
    with playground(tiny_engine, profiles) as (page, _):
        expect(page.locator("#ab-profile tbody tr")).to_have_count(5)
        page.fill("#prompt", "Say hi.")
        page.fill("#max-tokens", "4")
        page.click("#ab-run")  # the tiny random model may answer blanks: only the labels count
        expect(page.locator("#ab-status")).to_have_attribute("data-state", "ready",
                                                             timeout=60_000)
        assert page.locator("#ab-side-0").inner_text() == \
            "(P1A: simple · P2A: concise · P3A: friendly · bullets · enthusiastic)"
        assert page.locator("#ab-side-1").inner_text() == \
            "(P1B: expert · P2B: detailed · P3B: unfriendly · prose · calm)"
