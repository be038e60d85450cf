"""The Compare and Results tabs as a person uses them: a real Chromium against `python app.py`."""

import os
import re
import shutil

import pytest
from playwright.sync_api import expect

from browser import chromium_page, running_app

pytestmark = pytest.mark.browser


def choose(page, elem_id, option):
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_compare_base_and_an_adapter_side_by_side_then_see_it_in_results(tiny_sd, tiny_lora, tmp_path):
    data = tmp_path / "app-data"
    adapter = data / "runs" / "lora-run" / "adapter"  # where a training run leaves its adapter
    shutil.copytree(tiny_lora, adapter)
    bad = tmp_path / "wrong.jsonl"
    bad.write_text('{"prompt": "a red circle"}\n')
    env = {"WORKBENCH_DATA": str(data), "WORKBENCH_DEFAULT_MODEL": str(tiny_sd)}
    with running_app(env, timeout=300) as url, chromium_page() as page:  # a shared CPU may be slow
        page.goto(url)
        page.get_by_role("tab", name="Compare").click()

        # A prompt file in the wrong format is refused with a message naming the problem.
        page.locator("#compare-upload input[type=file]").set_input_files(str(bad))
        expect(page.locator("#compare-source input[value=File]")).to_be_checked(timeout=30_000)
        page.locator("#compare-button").click()
        expect(page.locator("#compare-status")).to_contain_text('wrong.jsonl, line 1: missing "tag"', timeout=30_000)

        # Base model vs the discovered adapter (listed by where it is in the data folder), on one typed
        # prompt, two seeds, two steps.
        choose(page, "compare-adapter", "runs/lora-run/adapter")
        expect(page.locator("#compare-variants textarea")).to_have_value(f"{adapter}:1", timeout=10_000)
        page.locator("#compare-source").get_by_text("Text").click()
        page.locator("#compare-prompts textarea").fill("a red circle to the left of a blue square")
        steps = page.locator("#compare-steps input[type=number]")
        steps.fill("2")
        steps.press("Enter")
        choose(page, "compare-detector", "shapes")
        page.locator("#compare-button").click()

        expect(page.locator("#compare-status")).to_contain_text("Done: 2 variant(s)", timeout=300_000)
        grid = page.locator("#compare-grid-table")
        expect(grid).to_be_visible()
        headers = grid.locator("thead th")
        expect(headers).to_have_text(["prompt", "base", "lora-run/adapter:1"])
        images = grid.locator("img")
        expect(images).to_have_count(4)  # 1 prompt x 2 seeds x 2 variants
        page.wait_for_function("() => [...document.querySelectorAll('#compare-grid-table img')]"
                               ".every(img => img.naturalWidth > 0)", timeout=30_000)
        captions = grid.locator("figcaption").all_inner_texts()
        assert len(captions) == 4 and all(c == "✓" or c.startswith("✗ ") for c in captions)
        expect(page.locator("#compare-table")).to_contain_text("position")
        screenshot = os.environ.get("WORKBENCH_COMPARE_SCREENSHOT")
        page.screenshot(path=screenshot or str(tmp_path / "compare.png"), full_page=True)

        # The comparison as a shareable page, written into its run folder.
        page.locator("#compare-report").click()
        expect(page.locator("#compare-status")).to_contain_text("Report written", timeout=30_000)
        expect(page.locator("#compare-report-file").get_by_role("link")).to_have_attribute("href", re.compile(r"report\.html$"))
        assert "lora-run/adapter:1" in next((data / "runs").glob("*/report.html")).read_text()

        # Both variants are now in the results history.
        page.goto(url)
        page.get_by_role("tab", name="Results").click()
        table = page.locator("#results-table")
        expect(table).to_contain_text("lora-run/adapter:1", timeout=30_000)
        expect(table).to_contain_text("base")
        page.locator("#results-export").click()
        expect(page.locator("#results-message")).to_contain_text("Exported 2 row(s)", timeout=30_000)
        assert len(list((data / "exports").glob("results-*.csv"))) == 1


def test_the_shapes_model_against_the_shipped_ipr_adapter_on_shapesbench(tmp_path):
    """The issue's picture: base vs assets/adapters/ipr-shapes on ShapesBench prompts of every tag,
    each image with its verdict, and the per-tag table and chart."""
    from workbench.config import ASSETS_DIR

    adapter = ASSETS_DIR / "adapters" / "ipr-shapes"
    env = {"WORKBENCH_DATA": str(tmp_path / "app-data")}  # default model: shapes
    with running_app(env, timeout=300) as url, chromium_page() as page:
        page.goto(url)
        page.get_by_role("tab", name="Compare").click()
        choose(page, "compare-adapter", "shipped · ipr-shapes")
        expect(page.locator("#compare-variants textarea")).to_have_value(f"{adapter}:1", timeout=10_000)
        # Defaults: ShapesBench, every tag, 4 prompts per tag, 2 seeds, the model's 20 steps.
        page.locator("#compare-button").click()

        expect(page.locator("#compare-status")).to_contain_text("Done: 2 variant(s) x 48 image(s)", timeout=300_000)
        grid = page.locator("#compare-grid-table")
        expect(grid.locator("thead th")).to_have_text(["prompt", "base", "ipr-shapes:1"])
        expect(grid.locator("img")).to_have_count(96)
        captions = grid.locator("figcaption").all_inner_texts()
        assert len(captions) == 96 and all(c == "✓" or c.startswith("✗ ") for c in captions)
        assert any(c.startswith("✗ ") for c in captions)  # the base model is far from perfect
        table = page.locator("#compare-table")
        for tag in ("single_object", "two_object", "counting", "colors", "position", "color_attr", "overall"):
            expect(table).to_contain_text(tag)
        expect(page.locator("#compare-bars")).to_be_visible()
        differences = page.locator("#compare-differences")  # the adapter minus the base, with its interval
        expect(differences).to_contain_text("ipr-shapes:1 − base")
        expect(differences).to_contain_text(re.compile(r"overall\s*[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\] p="))
        page.wait_for_function("() => [...document.querySelectorAll('#compare-grid-table img')]"
                               ".every(img => img.naturalWidth > 0)", timeout=30_000)
        print("\n" + table.inner_text())  # the per-tag table, for the record (pytest -s)
        screenshot = os.environ.get("WORKBENCH_COMPARE_SHAPES_SCREENSHOT")
        page.screenshot(path=screenshot or str(tmp_path / "compare-shapes.png"), full_page=True)
