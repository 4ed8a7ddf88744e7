"""The atlas in a real browser: Debian's Chromium driven by Playwright, served on 127.0.0.1.

Playwright's own browser download cannot work offline, so the test drives the Chromium of
Debian's ``chromium`` package (``.ci/run`` installs it). Without it (or without Playwright) this
module is skipped on a developer's machine, but fails under ``CI=true``: CI must not pass without
having looked at the pages in a browser.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from convscope.atlas import AtlasSettings, build_atlas
from convscope.atlas.stages import ActivationsStage, FeaturesStage
from convscope.distributed import LocalExecutor
from convscope.serve import start_server

CHROMIUM = "/usr/bin/chromium"
# A closed network: no background services, updates, sync or QUIC probes that would fail noisily.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def missing_browser() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not Path(CHROMIUM).exists():
        return (f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install -y chromium); "
                ".ci/run does this in CI")
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is missing: pip install -e '.[test]'"
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="module", autouse=True)
def _browser_available():
    """Runs before the module's other fixtures, so nothing is built for a test that cannot run."""
    why = missing_browser()
    if why and in_ci():
        pytest.fail(f"CI=true but the browser test cannot run: {why}", pytrace=False)
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def served_atlas(default_model, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("browser-atlas")
    settings = AtlasSettings(layers="blocks.1.0.bn2,blocks.2.0.bn2,blocks.5.0.bn3", channels_per_layer=3, steps=8,
                             feature_size=48, top=3)
    build_atlas(default_model, {k: photos[k] for k in ("chelsea", "coffee")}, out, settings, progress=False)
    server = start_server(out, port=0)
    yield out, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.problems = []
    page.on("console", lambda msg: page.problems.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error" else None)
    page.on("pageerror", lambda err: page.problems.append(f"page error: {err}"))
    # A request cancelled because the test navigated away (net::ERR_ABORTED) is not a failure.
    page.on("requestfailed", lambda req: page.problems.append(f"request failed: {req.url} {req.failure}")
            if "ERR_ABORTED" not in (req.failure or "") else None)
    page.on("response", lambda res: page.problems.append(f"HTTP {res.status}: {res.url}") if res.status >= 400 else None)
    yield page
    context.close()


def assert_images_loaded(page) -> int:
    """Load every (lazy) picture of the page and assert that each decoded to a real image."""
    page.evaluate("() => document.querySelectorAll('img[loading=lazy]').forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete)", timeout=20_000)
    broken = page.evaluate("() => Array.from(document.images).filter(i => !(i.naturalWidth > 0)).map(i => i.src)")
    assert broken == []
    count = page.evaluate("() => document.images.length")
    assert count > 0
    return count


def test_click_through_keys_and_search(served_atlas, page):
    out, base = served_atlas
    page.goto(base + "index.html")
    assert "efficientnet_lite0" in page.title()
    assert_images_loaded(page)

    page.click("table.layers a >> nth=0")                                  # model page -> first layer
    page.wait_for_url(base + "L/blocks.1.0.bn2/index.html")
    assert_images_loaded(page)
    page.click('a.tile[data-channel="0"]')                                 # layer page -> channel
    page.wait_for_url(base + "L/blocks.1.0.bn2/0.html")
    assert_images_loaded(page)

    page.keyboard.press("ArrowRight")
    page.wait_for_url(base + "L/blocks.1.0.bn2/1.html")
    page.keyboard.press("ArrowRight")
    page.wait_for_url(base + "L/blocks.1.0.bn2/2.html")
    page.keyboard.press("ArrowLeft")
    page.wait_for_url(base + "L/blocks.1.0.bn2/1.html")
    assert_images_loaded(page)

    # a picture opens at full resolution in the viewer; Escape closes it
    page.click("figure.overlay a.zoom >> nth=0")
    page.wait_for_function("() => { const i = document.querySelector('#lightbox img'); "
                           "return i && i.complete && i.naturalWidth > 0; }")
    page.keyboard.press("Escape")
    assert page.is_hidden("#lightbox")

    page.fill("#search-input", "blocks.5.0.bn3:2")                         # search: layer:channel
    page.press("#search-input", "Enter")
    page.wait_for_url(base + "L/blocks.5.0.bn3/2.html")
    assert_images_loaded(page)
    page.fill("#search-input", "blocks.2.0.bn2")                           # search: a layer
    page.press("#search-input", "Enter")
    page.wait_for_url(base + "L/blocks.2.0.bn2/index.html")
    page.keyboard.press("ArrowLeft")                                        # layer pages page through layers
    page.wait_for_url(base + "L/blocks.1.0.bn2/index.html")

    page.fill("#search-input", "blocks.2.0.bn2:100")                       # a channel without a page
    page.press("#search-input", "Enter")
    assert "no page" in page.text_content("#search-message")
    page.fill("#search-input", "no_such_layer")
    page.press("#search-input", "Enter")
    assert "no layer named" in page.text_content("#search-message")
    assert page.url == base + "L/blocks.1.0.bn2/index.html"

    page.goto(base + "L/blocks.2.0.bn2/1.html")
    assert_images_loaded(page)
    shot = out / "channel-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert page.problems == []


def test_opens_from_disk_without_a_server(served_atlas, page):
    out, _ = served_atlas
    page.goto((out / "L" / "blocks.2.0.bn2" / "0.html").resolve().as_uri())
    assert_images_loaded(page)
    assert page.evaluate("() => window.ATLAS_INDEX.layers.length") == 3
    page.keyboard.press("ArrowRight")
    page.wait_for_url("**/L/blocks.2.0.bn2/1.html")
    page.fill("#search-input", "blocks.1.0.bn2")
    page.press("#search-input", "Enter")
    page.wait_for_url("**/L/blocks.1.0.bn2/index.html")
    assert_images_loaded(page)
    assert page.problems == []


class _NoiseExecutor(LocalExecutor):
    """Seeded noise for each unit's optimization: the real features stage (chunks, records, sprite
    sheets) and pages, without 1,304 feature visualizations."""

    def map(self, loaded, work, units, shared=None):
        for unit in units:
            rng = np.random.default_rng(unit.channels[0])
            images = rng.integers(0, 255, (len(unit.channels), 32, 32, 3), dtype=np.uint8)
            records = [{"channel": c, "objective": float(c % 97), "start": 0.0, "ratio": 1.5, "photo_best": 1.0,
                        "dead": c % 50 == 7} for c in unit.channels]
            yield unit, (images, records, "noise")


@pytest.fixture(scope="module")
def wide_atlas(default_model, photos, tmp_path_factory):
    """The default model's head (1,280 channels) and a 24-channel layer, every channel, real pages."""
    out = tmp_path_factory.mktemp("wide-atlas")
    settings = AtlasSettings(layers="blocks.1.1.bn3,bn2", skip=("scan", "deconv"))
    build_atlas(default_model, {"chelsea": photos["chelsea"]}, out, settings, progress=False,
                stages=[ActivationsStage(), FeaturesStage()], executor=_NoiseExecutor())
    server = start_server(out, port=0)
    yield out, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


# Requests a layer page of any width may make before its first screen is complete: the page, its
# stylesheet and two scripts, and one sprite sheet per 256 channels (5 for 1,280), nothing per channel.
FIRST_SCREEN_REQUESTS = 10


def test_a_layer_of_1280_channels_loads_in_a_few_requests(wide_atlas, page):
    out, base = wide_atlas
    requests = []
    page.on("request", lambda req: requests.append(req.url))
    page.goto(base + "L/bn2/index.html", wait_until="networkidle")
    assert page.locator("a.tile").count() == 1280 and page.locator("table.channels tbody tr").count() == 1280
    sprites = [url for url in requests if "/sprite" in url]
    assert len(sprites) == 5, requests
    assert len(requests) <= FIRST_SCREEN_REQUESTS, requests
    # the first tile shows its cut of the first sprite sheet, on the first screen
    box = page.locator('a.tile[data-channel="0"] span.sprite').bounding_box()
    assert box["width"] == 64 and box["y"] + box["height"] < 900
    assert "sprite3.webp" in page.eval_on_selector('a.tile[data-channel="1000"] span.sprite',
                                                   "e => getComputedStyle(e).backgroundImage")
    assert page.eval_on_selector('a.tile[data-channel="1000"] span.sprite',
                                 "e => getComputedStyle(e).backgroundPosition") == "-512px -896px"

    page.click("table.channels th:has-text('Objective')")          # sort by objective, highest first
    page.click("table.channels th:has-text('Objective')")
    first = page.eval_on_selector_all("table.channels tbody tr td:first-child",
                                      "cells => cells.slice(0, 3).map(c => +c.dataset.value)")
    assert first == [96, 193, 290]                                   # objective c % 97 = 96, ties by channel

    page.fill("#search-input", "bn2:1234")                            # a channel deep in the list
    page.press("#search-input", "Enter")
    page.wait_for_url(base + "L/bn2/1234.html")
    assert_images_loaded(page)
    assert page.problems == []
