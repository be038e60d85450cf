"""The Review tab as a person uses it: a real Chromium against `python app.py` on a fake IPR run."""

import pytest
from playwright.sync_api import expect

from browser import chromium_page, running_app
from test_reviews import FAKE_SAMPLES, make_fake_run

pytestmark = pytest.mark.browser

SAMPLE = FAKE_SAMPLES[1][0]  # "a blue square" whose image shows a green square


def open_run(page, url):
    page.goto(url)
    page.get_by_role("tab", name="Review").click()
    page.locator("#review-run input").click()
    page.get_by_role("option", name="ipr-test").click()
    expect(page.locator("#review-table")).to_contain_text(SAMPLE, timeout=30_000)


def test_select_a_sample_edit_its_prompt_and_the_edit_survives_a_reload(tmp_path):
    data = tmp_path / "app-data"
    make_fake_run(data / "runs")
    with running_app({"WORKBENCH_DATA": str(data)}) as url, chromium_page() as page:
        open_run(page, url)
        # Every row shows its image as a thumbnail, served from the run's folder.
        page.wait_for_function("() => { const images = [...document.querySelectorAll('#review-table img')];"
                               " return new Set(images.map(i => i.src)).size === 4"
                               " && images.every(i => i.complete && i.naturalWidth > 0); }", timeout=30_000)
        page.locator("#review-table").get_by_text(SAMPLE).click()
        prompt = page.locator("#review-prompt textarea")
        expect(prompt).to_have_value("a green square", timeout=30_000)
        # The selected sample's image is shown with its detection labelled.
        expect(page.locator("#review-image")).to_contain_text("green square 0.98")

        prompt.fill("a small green square")
        page.locator("#review-save-edit").click()
        expect(page.locator("#review-message")).to_contain_text("Saved the edit", timeout=30_000)

        # Written to the app's database at once: another process sees it.
        from workbench.reviews import ReviewStore

        store = ReviewStore(data / "workbench.db")
        review = store.get_all("ipr-test")[SAMPLE]
        store.close()
        assert (review.status, review.prompt) == ("edited", "a small green square")

        # A fresh page shows the sample as edited, with the edit.
        open_run(page, url)
        row = page.locator("#review-table").get_by_role("row").filter(has_text=SAMPLE)
        expect(row).to_contain_text("edited")
        expect(row).to_contain_text("a small green square")

        # Text typed but not saved is not silently lost when another sample is chosen.
        page.locator("#review-table").get_by_text(SAMPLE).click()
        expect(prompt).to_have_value("a small green square", timeout=30_000)
        prompt.fill("a tiny green square")
        page.locator("#review-table").get_by_text(FAKE_SAMPLES[2][0]).click()
        expect(page.locator("#review-message")).to_contain_text(f"Your edit of {SAMPLE} was not saved",
                                                                timeout=30_000)
        expect(page.locator("#review-message")).to_contain_text("a tiny green square")

        page.locator("#review-export").click()
        expect(page.locator("#review-message")).to_contain_text("Exported 3 image(s)", timeout=30_000)
        assert (data / "runs" / "ipr-test" / "export" / "metadata.jsonl").is_file()
