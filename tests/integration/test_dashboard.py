"""The dashboard in a real headless browser (the system's chromium driven by Playwright) against a real
`h2t serve` and `h2t worker`: signing in with the key, a run appearing and its curves growing while it
trains, the comparison and reliability views drawn from real runs, a dropped image predicted, the dataset's
long tail, cancelling from the table, the keyboard path, and /docs with no network. Every page must load
without a console error and without a request leaving the server's origin. Each view's screenshot is saved
(to $H2T_SCREENSHOT_DIR when set)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import TINY_DATASET, tiny_run_config, wait_for
from tests.integration.conftest import API_KEY, api_server

pytestmark = pytest.mark.integration

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser() -> Iterator:
    if CHROMIUM is None:
        message = "no chromium on PATH (Debian: apt-get install chromium)"
        if os.environ.get("H2T_REQUIRE_SERVERS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with playwright_api.sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where chromium's sandbox cannot start
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("H2T_SCREENSHOT_DIR") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Watched:
    """A page with what went wrong on it: console errors, uncaught exceptions, requests to other origins."""

    page: object
    origin: str
    errors: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)


def open_page(browser, base_url: str) -> Watched:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    watched = Watched(page, base_url)
    page.on("console", lambda message: message.type == "error" and watched.errors.append(message.text))
    page.on("pageerror", lambda error: watched.errors.append(f"uncaught: {error}"))
    page.on("dialog", lambda dialog: dialog.accept())  # the confirm() before a cancel

    def only_this_origin(route) -> None:  # the offline server: anything else would hang or fail there
        if route.request.url.startswith(base_url) or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            watched.external.append(route.request.url)
            route.abort()

    context.route("**/*", only_this_origin)
    return watched


def sign_in(watched: Watched, key: str = API_KEY) -> None:
    page = watched.page
    page.goto(f"{watched.origin}/")  # redirects to /ui/
    page.wait_for_selector("#api-key")
    assert page.evaluate("document.activeElement.id") == "api-key"  # the key field has the focus
    page.keyboard.type(key)
    page.keyboard.press("Enter")


def digit_png(index: int) -> bytes:
    from sklearn.datasets import load_digits

    image = load_digits().images[index]
    pixels = np.repeat((image / 16 * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((32, 32)).save(buffer, format="PNG")
    return buffer.getvalue()


def chart_marks(page, chart: str, mark: str) -> int:
    return page.locator(f'svg[data-chart="{chart}"] {mark}').count()


def test_the_dashboard_follows_a_run_compares_rho_serves_predictions_and_cancels(
        browser, settings, start_worker, tmp_path, screenshots):
    with api_server(settings, tmp_path / "api.log") as base_url, \
            httpx.Client(base_url=base_url, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        watched = open_page(browser, base_url)
        page = watched.page
        sign_in(watched)
        page.wait_for_selector("table[aria-label=Runs]")
        page.screenshot(path=screenshots / "empty-runs.png")

        dataset = http.post("/v1/datasets", json=TINY_DATASET).json()
        base = http.post("/v1/runs", json={"dataset_id": dataset["id"], "name": "stage 1", "tags": ["ui-test"],
                                           **tiny_run_config(stage1={"epochs": 12})}).json()
        # the queued run appears in the live table (it polls; no reload)
        row = page.locator(f'tr[data-run="{base["id"]}"]')
        row.wait_for(timeout=10_000)
        assert row.locator("[data-status]").inner_text() == "queued"

        # keyboard: Tab from the top of the page to the run's link, Enter opens it
        page.locator("a.brand").focus()
        for _ in range(60):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.dataset.key") == f"open-{base['id']}":
                break
        else:
            raise AssertionError("the run's link is not reachable with Tab")
        # the first event stream is cut, as a restarted server or a proxy's timeout would: the view reconnects
        cut: list[str] = []

        def cut_once(route) -> None:
            if cut:
                route.continue_()
            else:
                cut.append(route.request.url)
                route.abort()

        page.route("**/events", cut_once)
        page.keyboard.press("Enter")
        page.wait_for_selector('svg[data-chart="loss"]')
        assert page.url.endswith(f"#/runs/{base['id']}")

        # its curves grow while it trains: the worker starts only now, with the page already open
        start_worker()
        seen: list[int] = []

        def finished() -> bool:
            seen.append(chart_marks(page, "loss", "circle"))
            return page.locator("h1 [data-status=succeeded]").count() == 1

        wait_for(finished, 180, "the run to succeed on its page", interval=0.25)
        # (polled from here: the page's CSP forbids the eval behind wait_for_function)
        wait_for(lambda: chart_marks(page, "loss", "circle") == 14, 10, "the last epochs on the curve")
        growth = sorted(set(seen) - {0})
        assert len(growth) >= 3, f"the loss curve did not grow live: point counts seen {growth}"
        for chart in ("lr", "accuracy", "ece"):
            assert chart_marks(page, chart, "circle") >= 14
        wait_for(lambda: "epoch" in page.inner_text("#log"), 10, "the run's log")
        page.screenshot(path=screenshots / "run.png", full_page=True)

        # two stage-2 runs on its stage 1, then the comparison against rho
        for rho in (0.0, 0.5):
            http.post("/v1/runs", json={"dataset_id": dataset["id"], "stage1_from": base["id"], "name": f"rho={rho}",
                                        **tiny_run_config(stage2={"rho": rho})}).raise_for_status()
        wait_for(lambda: http.get("/v1/runs", params={"status": "succeeded"}).json()["count"] == 3, 180,
                 "the two stage-2 runs")
        page.goto(f"{base_url}/ui/#/compare?stage1_from={base['id']}")
        page.wait_for_selector('svg[data-chart="groups"]')
        assert page.locator("table[aria-label='Compared runs'] tbody tr").count() == 3
        assert chart_marks(page, "groups", "rect") == 3 * 4  # 3 runs x overall, many, medium, few
        assert chart_marks(page, "rho-accuracy", "circle") == 3 * 4  # rho 0, 0.25, 0.5 x 4 curves
        page.screenshot(path=screenshots / "compare.png", full_page=True)

        # the runs table selects runs to compare
        page.goto(f"{base_url}/ui/#/runs")
        page.wait_for_selector(f'tr[data-run="{base["id"]}"]')
        rows = page.locator("table[aria-label=Runs] tbody tr")
        assert rows.count() == 3
        for i in range(2):
            rows.nth(i).locator("input[type=checkbox]").check()
        page.get_by_role("button", name="Compare selected").click()
        page.wait_for_selector("table[aria-label='Compared runs']")
        assert page.locator("table[aria-label='Compared runs'] tbody tr").count() == 2

        # the model: reliability diagrams per group, and predictions for a dropped image
        page.goto(f"{base_url}/ui/#/models/{base['id']}")
        page.wait_for_selector('svg[data-chart="reliability-overall"]')
        for group in ("overall", "many", "medium", "few"):
            assert chart_marks(page, f"reliability-{group}", "rect") >= 1
        png = digit_png(3)
        page.evaluate("""(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "digit.png", { type: "image/png" }));
            document.getElementById("drop-zone").dispatchEvent(
                new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
        }""", base64.b64encode(png).decode())
        page.wait_for_selector("table[aria-label=Predictions] tbody tr")
        expected = http.post(f"/v1/models/{base['id']}/predict", files={"images": ("digit.png", png, "image/png")},
                             data={"top_k": "3"}).json()["predictions"][0]["predicted"]
        cells = page.locator("table[aria-label=Predictions] tbody tr").first.locator("td")
        assert cells.nth(1).inner_text() == expected["label"]
        assert cells.nth(3).inner_text().strip() == expected["group"]
        page.screenshot(path=screenshots / "model.png", full_page=True)
        with page.expect_download() as download:
            page.get_by_role("button", name="Download ONNX").click()
        onnx_bytes = Path(download.value.path()).read_bytes()
        assert hashlib.sha256(onnx_bytes).hexdigest() == http.get(f"/v1/models/{base['id']}").json()["onnx_sha256"]
        # the same with the file picker (the keyboard's way in)
        page.set_input_files("#images", files=[{"name": "other.png", "mimeType": "image/png", "buffer": digit_png(5)}])
        page.locator("table[aria-label=Predictions] td", has_text="other.png").wait_for()

        # the registry on the models page, and a model opened by name@alias
        http.post("/v1/registry", json={"name": "ui-digits"}).raise_for_status()
        http.post("/v1/registry/ui-digits/versions", json={"model_id": base["id"]}).raise_for_status()
        http.put("/v1/registry/ui-digits/aliases/production", json={"version": 1}).raise_for_status()
        page.goto(f"{base_url}/ui/#/models")
        page.wait_for_selector("table[aria-label=Registry]")
        assert "production → v1" in page.inner_text("table[aria-label=Registry]")
        page.goto(f"{base_url}/ui/#/models/ui-digits@production")
        page.wait_for_selector('svg[data-chart="reliability-overall"]')
        assert page.inner_text("h1") == "Model of stage 1"

        # the dataset: one bar per class, coloured by its group
        page.goto(f"{base_url}/ui/#/datasets/{dataset['id']}")
        page.wait_for_selector('svg[data-chart="class-counts"]')
        bars = page.locator('svg[data-chart="class-counts"] rect[data-group]')
        assert [bars.nth(i).get_attribute("data-group") for i in range(bars.count())] == dataset["groups"]
        page.screenshot(path=screenshots / "dataset.png", full_page=True)

        # cancel from the table: a long run is cancelled between two steps
        long_run = http.post("/v1/runs", json={"dataset_id": dataset["id"], "name": "long",
                                               **tiny_run_config(stage1={"epochs": 400})}).json()
        wait_for(lambda: http.get(f"/v1/runs/{long_run['id']}").json()["status"] == "running", 60, "the long run")
        page.goto(f"{base_url}/ui/#/runs")
        page.locator(f'tr[data-run="{long_run["id"]}"] button.danger').click()
        wait_for(lambda: http.get(f"/v1/runs/{long_run['id']}").json()["status"] == "cancelled", 30,
                 "the cancel sent from the table")
        page.wait_for_selector(f'tr[data-run="{long_run["id"]}"] [data-status=cancelled]', timeout=10_000)
        page.screenshot(path=screenshots / "runs.png", full_page=True)

        assert len(cut) == 1
        # the one console error allowed is the browser's line for the stream cut above
        assert [e for e in watched.errors if "ERR_FAILED" not in e] == [] and len(watched.errors) <= 1
        assert watched.external == []


def test_a_slow_view_never_draws_over_the_one_the_user_moved_to(browser, settings, tmp_path):
    with api_server(settings, tmp_path / "api.log") as base_url, \
            httpx.Client(base_url=base_url, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        dataset = http.post("/v1/datasets", json=TINY_DATASET).json()
        run = http.post("/v1/runs", json={"dataset_id": dataset["id"], "name": "slow to load",
                                          **tiny_run_config()}).json()
        watched = open_page(browser, base_url)
        page = watched.page
        sign_in(watched)
        page.wait_for_selector("table[aria-label=Runs]")

        def slowly(route) -> None:
            page.wait_for_timeout(1500)
            route.continue_()

        page.route(f"**/v1/runs/{run['id']}", slowly)
        page.evaluate(f"location.hash = '#/runs/{run['id']}'")
        page.wait_for_timeout(200)
        page.evaluate("location.hash = '#/datasets'")
        page.wait_for_selector("table[aria-label=Datasets]")
        page.wait_for_timeout(2500)  # the run's answer has long arrived
        assert page.inner_text("h1") == "Datasets"
        assert page.locator('svg[data-chart="loss"]').count() == 0
        assert watched.errors == []


def test_a_wrong_key_is_refused_with_a_message_and_the_right_one_signs_in(browser, settings, tmp_path, screenshots):
    with api_server(settings, tmp_path / "api.log") as base_url:
        watched = open_page(browser, base_url)
        page = watched.page
        sign_in(watched, key="not-the-key")
        page.wait_for_selector("#notice.error")
        assert "refused" in page.inner_text("#notice")
        page.screenshot(path=screenshots / "sign-in.png")
        page.fill("#api-key", API_KEY)
        page.keyboard.press("Enter")
        page.wait_for_selector("table[aria-label=Runs]")
        assert page.inner_text("#notice") == ""
        # the only console error is the browser's own line for the refused request
        assert [e for e in watched.errors if "401" not in e] == []
        assert watched.external == []


def test_the_api_documentation_renders_with_no_network(browser, settings, tmp_path, screenshots):
    with api_server(settings, tmp_path / "api.log") as base_url:
        watched = open_page(browser, base_url)
        watched.page.goto(f"{base_url}/docs")
        watched.page.wait_for_selector(".swagger-ui .info .title", timeout=20_000)
        assert "H2T service" in watched.page.inner_text(".swagger-ui .info .title")
        watched.page.locator(".opblock-tag", has_text="runs").first.wait_for()  # the operations are listed
        watched.page.screenshot(path=screenshots / "docs.png")
        assert watched.external == []
        assert watched.errors == []
