"""The app as a person uses it: a real Chromium against `python app.py`."""

import os
from pathlib import Path

import pytest
from playwright.sync_api import expect

from browser import chromium_page, running_app

pytestmark = pytest.mark.browser


def test_type_a_prompt_click_generate_and_an_image_appears(tiny_sd, tmp_path):
    data = tmp_path / "app-data"
    env = {"WORKBENCH_DATA": str(data), "WORKBENCH_DEFAULT_MODEL": str(tiny_sd)}
    with running_app(env) as url, chromium_page() as page:
        page.goto(url)
        page.locator("#prompt-box textarea").fill("a red circle above a blue square")
        page.locator("#generate-button").click()
        image = page.locator("#generate-gallery img").first
        image.wait_for(state="visible", timeout=90_000)
        page.wait_for_function(
            "() => document.querySelector('#generate-gallery img').naturalWidth > 0", timeout=30_000)
        assert "image(s)" in page.locator("#generate-status").inner_text()
        screenshot = os.environ.get("WORKBENCH_SCREENSHOT")
        page.screenshot(path=screenshot or str(tmp_path / "generate.png"), full_page=True)

        # The images are on disk in the data folder, with their parameters embedded.
        pngs = list((data / "runs").rglob("*.png"))
        assert len(pngs) == 4
        from workbench.generation import read_png_metadata
        assert read_png_metadata(pngs[0])["prompt"] == "a red circle above a blue square"

        # The Runs tab lists the finished job.
        page.get_by_role("tab", name="Runs").click()
        table = page.locator("#runs-table")
        expect(table).to_contain_text("generate", timeout=20_000)
        expect(table).to_contain_text("done")

        # The Inspect tab offers the same images to pick, and a pick brings its prompt along.
        page.get_by_role("tab", name="Inspect & Relabel").click()
        page.get_by_text("Or pick an image generated earlier").click()
        expect(page.locator("#inspect-saved-gallery img")).to_have_count(4, timeout=20_000)
        page.locator("#inspect-saved-gallery img").first.click()
        expect(page.locator("#inspect-prompt textarea")).to_have_value("a red circle above a blue square",
                                                                        timeout=20_000)
        expect(page.locator("#inspect-status")).to_contain_text("Picked")
        # A small image fills the input box instead of showing at its own size: its drawn pixels (what
        # differs from the box's corner) span more than twice its own width on the screen.
        shown = page.locator("#inspect-image img").first
        shown.wait_for(state="visible", timeout=20_000)
        assert drawn_width(shown.screenshot()) > 2 * shown.evaluate("img => img.naturalWidth")

        # A refused generation, then an upload that is no image: the tab says so, the typed prompt stays
        # editable, and no traceback reaches the log.
        page.locator("#inspect-prompt textarea").fill("")
        page.locator("#inspect-generate").click()
        expect(page.locator("#inspect-status")).to_contain_text("Cannot generate", timeout=20_000)
        broken = tmp_path / "broken.png"
        broken.write_text("not an image")  # Gradio itself cannot open it
        page.locator("#inspect-image button[aria-label='Remove Image']").click()
        page.locator("#inspect-image input[type=file]").set_input_files(str(broken))
        expect(page.locator("#inspect-status")).to_contain_text("Cannot read the upload", timeout=20_000)
        page.locator("#inspect-prompt textarea").fill("a red circle", timeout=5_000)
        assert "Traceback" not in (data / "app.log").read_text()


def drawn_width(png: bytes) -> int:
    """Width in screen pixels of what is drawn across the middle row of an element's screenshot (pixels
    unlike the row's first; the middle row, since labels can overlap the element's top)."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    row = pixels[pixels.shape[0] // 2]
    columns = np.flatnonzero(np.abs(row - row[0]).max(axis=1) > 30)
    return int(columns[-1] - columns[0] + 1) if columns.size else 0


def test_a_missing_model_shows_a_clear_message_in_the_page(tmp_path):
    env = {"WORKBENCH_DATA": str(tmp_path / "d"), "WORKBENCH_DEFAULT_MODEL": "sdxl"}
    with running_app(env) as url, chromium_page() as page:
        page.goto(url)
        page.locator("#prompt-box textarea").fill("a cat")
        page.locator("#generate-button").click()
        status = page.locator("#generate-status")
        status.get_by_text("hf download stabilityai/stable-diffusion-xl-base-1.0").wait_for(timeout=60_000)


def test_settings_whose_blank_means_the_default_start_blank(tmp_path):
    """A blank minimum confidence means the detector's own (0.9 for shapes) and a blank reward weight
    means "balance the gradients"; a 0 shown there would train on every unsure sample, or refuse ReFL."""
    env = {"WORKBENCH_DATA": str(tmp_path / "d"), "WORKBENCH_DEFAULT_MODEL": "sdxl"}
    with running_app(env) as url, chromium_page() as page:
        page.goto(url)
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#ipr-min-confidence input")).to_have_value("", timeout=20_000)
        page.get_by_role("tab", name="RealignDiff: ReFL (coarse stage)").click()
        expect(page.locator("#refl-reward-weight input")).to_have_value("", timeout=20_000)
        expect(page.locator("#refl-guidance input")).to_have_value("")


def test_the_app_serves_its_data_folder_but_not_its_database_nor_files_outside(tmp_path):
    import urllib.error
    import urllib.request

    data = tmp_path / "d"
    (data / "runs" / "r1").mkdir(parents=True)
    (data / "runs" / "r1" / "a.png").write_bytes(b"\x89PNG not really")
    (data / "weights" / "sam").mkdir(parents=True)
    (data / "weights" / "sam" / "sam.pth").write_bytes(b"weights")
    (tmp_path / "outside.txt").write_text("secret")

    def status(url):
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    with running_app({"WORKBENCH_DATA": str(data)}) as url:
        assert (data / "workbench.db").is_file()
        assert status(f"{url}gradio_api/file={data / 'runs' / 'r1' / 'a.png'}") == 200
        # Reading the database through the server would drop the app's SQLite locks (jobs then get lost).
        for path in (data / "workbench.db", data / "workbench.db-wal", data / "weights" / "sam" / "sam.pth",
                     tmp_path / "outside.txt", "/etc/passwd"):
            assert status(f"{url}gradio_api/file={path}") == 403, path
