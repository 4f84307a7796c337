"""The page to look at matches (deploy/viewer.py, recipes/app.py): the viewer answers as the index does, bad
queries are messages, and in a real browser (Playwright driving the distribution's Chromium) the page shows the
attributes, photos, scores, verdicts and the group, survives bad input, and leaves a screenshot in test-artifacts/."""

import os
import shutil
import socket
from pathlib import Path

import pytest

from afmrl.catalog import load_catalog
from deploy import ProductIndex
from deploy.calibration import threshold_of
from deploy.viewer import MatchViewer, QueryError

pytestmark = pytest.mark.usefixtures("one_thread")
ARTIFACTS = Path(os.environ.get("AFMRL_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
INSTALL_CHROMIUM = "apt-get update -qq && apt-get install -y -qq chromium"  # README.md, the browser block


@pytest.fixture(scope="module")
def index_dir(small_catalog_dir, tiny_encoder_dir, tmp_path_factory):
    test = load_catalog(small_catalog_dir, split="test")
    index = ProductIndex.build(test, str(tiny_encoder_dir), attribute_column="attributes", batch_size=16)
    index.config["catalog"] = str(small_catalog_dir)
    index.calibrate(test, k=5, target_precision=0.3, batch_size=16)
    out = tmp_path_factory.mktemp("app-index") / "index"
    index.save(out)
    return out


@pytest.fixture(scope="module")
def viewer(index_dir, small_catalog_dir):
    return MatchViewer(ProductIndex.load(index_dir), load_catalog(small_catalog_dir), k=5, match_k=5)


def test_the_viewer_answers_as_the_index_and_its_groups(viewer, small_catalog_dir):
    index, listing_id = viewer.index, viewer.index.gallery.listing_ids[3]
    answer = viewer.for_listing(f"  {listing_id} ")
    again = index.search(load_catalog(small_catalog_dir, split="test").filter(lambda r: r["listing_id"] == listing_id),
                         k=5)[0]  # fmt: skip
    assert [r["listing_id"] for r in answer["results"]] == [r["listing_id"] for r in again["results"]]
    assert answer["attributes"] == again["attributes"] and answer["photo"] is not None
    limit = threshold_of(index.config["threshold"], index.meta["category"][3])
    assert all(r["same_product"] == (r["score"] >= limit) for r in answer["results"])
    match = index.match(k=5)
    label = match["labels"][match["listing_ids"].index(listing_id)]
    assert sorted(answer["group"]) == sorted(x for x, g in zip(match["listing_ids"], match["labels"], strict=True)
                                             if g == label)  # fmt: skip
    train = next(x for x, s in zip(viewer.catalog["listing_id"], viewer.catalog["split"], strict=True) if s != "test")
    assert len(viewer.for_listing(train)["results"]) == 5  # in the catalog, not in the index: embedded now


def test_an_upload_is_answered_and_bad_queries_are_messages(viewer, tmp_path):
    photo = tmp_path / "photo.png"
    viewer.catalog[0]["image"].save(photo)
    answer = viewer.for_upload(str(photo), viewer.catalog[0]["title"])
    assert len(answer["results"]) == 5 and answer["attributes"] is None
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    for query, fragment in [(lambda: viewer.for_listing(""), "empty query"),
                            (lambda: viewer.for_listing("L999999"), "unknown listing id 'L999999'"),
                            (lambda: viewer.for_upload(str(notes), "x"), "'notes.txt' is not an image"),
                            (lambda: viewer.for_upload(None, "a title"), "empty query")]:  # fmt: skip
        with pytest.raises(QueryError, match=fragment):
            query()


def test_app_flags_are_one_error_line(load_recipe, index_dir, tmp_path, capsys):
    recipe = load_recipe("app")
    other = tmp_path / "other"
    from afmrl.embedded import make_synthetic_catalog

    make_synthetic_catalog(other, num_products=6, seed=5)
    (tmp_path / "catalog.jsonl").write_text('{"listing_id": "A", "product_id": "P"}\n')
    cases = [(["--index", str(tmp_path / "nowhere")], "not a product index"),
             (["--index", str(index_dir), "--top_k", "0"], "--top_k"),
             (["--index", str(index_dir), "--port", "70000"], "--port"),
             (["--index", str(index_dir), "--catalog", str(other)], "none of the indexed listings")]  # fmt: skip
    for argv, fragment in cases:
        with pytest.raises(SystemExit) as info:
            recipe.cli(argv)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert info.value.code == 2 and len(errors) == 1 and fragment in errors[0], err


def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)


@pytest.fixture(scope="module")
def served(load_recipe, index_dir):
    if chromium() is None:
        pytest.skip(f"the browser test needs Chromium from the distribution: {INSTALL_CHROMIUM}")
    pytest.importorskip("playwright")
    args = load_recipe("app").AppArguments(index=str(index_dir), top_k=5, match_k=5)
    page = load_recipe("app").main(args, launch=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    page.close()


def test_the_page_in_a_real_browser(served, viewer, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    listing_id = next(x for x, group in viewer.groups().items() if len(group) > 1)  # one with a group to show
    want = viewer.for_listing(listing_id)
    photo, notes = tmp_path / "photo.png", tmp_path / "notes.txt"
    viewer.catalog[0]["image"].save(photo)
    notes.write_text("not a photo")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        outside = []
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(served) else None)
        page.goto(served)
        status = page.locator("#status")

        def ask(listing):
            page.locator("#listing-id textarea, #listing-id input").first.fill(listing)
            page.locator("#find-listing").click()

        ask(listing_id)
        expect(status).to_contain_text(f"listing {listing_id} · 5 results", timeout=60_000)
        expect(page.locator("#attributes textarea")).to_have_value(want["attributes"])
        expect(page.locator("#results img")).to_have_count(5)
        for r in want["results"]:
            verdict = "same product" if r["same_product"] else "different"
            expect(page.locator("#results")).to_contain_text(f"{r['listing_id']} · {r['score']:.3f} · {verdict}")
        expect(page.locator("#group")).to_contain_text(f"match group of {len(want['group'])} listings")
        expect(page.locator("#group-photos img")).to_have_count(len(want["group"]))
        page.screenshot(path=str(ARTIFACTS / "app_listing.png"), full_page=True)

        for bad, message in [("L999999", "unknown listing id"), ("", "empty query")]:
            ask(bad)
            expect(status).to_contain_text(message, timeout=30_000)
        page.locator("#upload-photo input[type=file]").set_input_files(str(notes))
        page.locator("#find-upload").click()
        expect(status).to_contain_text("'notes.txt' is not an image", timeout=30_000)

        page.locator(
            "#upload-photo button[aria-label*='Clear' i], #upload-photo button[title*='Clear' i]"
        ).first.click()
        page.locator("#upload-photo input[type=file]").set_input_files(str(photo))
        page.locator("#upload-title textarea, #upload-title input").first.fill(viewer.catalog[0]["title"])
        page.locator("#find-upload").click()
        expect(status).to_contain_text("upload · 5 results", timeout=60_000)  # still serving after bad input
        expect(page.locator("#results img")).to_have_count(5)
        page.screenshot(path=str(ARTIFACTS / "app_upload.png"), full_page=True)
        browser.close()
    assert outside == [], outside  # the page loads nothing from the network
