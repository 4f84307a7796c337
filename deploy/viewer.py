"""A page to look at what an index answers: a listing's attributes, its top-k with photos and verdicts, its group.

``recipes/app.py`` serves it (Gradio, the ML ecosystem's page convention). Pick an indexed or catalog listing by id,
or upload a photo and a title: the page shows the attributes the index's generator writes for it, the top-k
listings with their photos, scores and the "same product" verdict (the calibrated threshold of the query's
category, the global one otherwise), and the match group (``ProductIndex.match``; for an upload, the group it
would join through its best match). A bad query (an unknown id, a file that is not an image, nothing at all) is a
message on the page, and the server keeps serving. ``MatchViewer`` is the page without the page, for tests and
services.

    viewer = MatchViewer(ProductIndex.load("outputs/index"), load_catalog("data/catalog"))
    answer = viewer.for_listing("L000123")   # {"attributes", "results": [{..., "same_product"}], "group": [...]}
    build_page(viewer).launch()
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from deploy.calibration import threshold_of

__all__ = ["MatchViewer", "QueryError", "build_page"]


class QueryError(ValueError):
    """A query the page cannot answer; its message is shown on the page."""


class MatchViewer:
    def __init__(self, index, catalog=None, *, k: int = 10, match_k: int = 10):
        self.index, self.catalog, self.k, self.match_k = index, catalog, int(k), int(match_k)
        self.row_of = {} if catalog is None else {str(x): i for i, x in enumerate(catalog["listing_id"])}
        self.indexed = dict(zip(index.gallery.listing_ids, range(index.gallery.size), strict=True))
        self.threshold = index.config.get("threshold")
        self._group_of = None

    # ------------------------------------------------------------------ what the page shows
    @property
    def calibrated(self) -> bool:
        return threshold_of(self.threshold) is not None

    def categories(self) -> list[str]:
        return sorted({c for c in self.index.meta["category"] if c})

    def groups(self) -> dict[str, list[str]]:
        """listing id -> the listings of its match group (computed once, on the first question that needs it)."""
        if self._group_of is None:
            self._group_of = {}
            if self.calibrated:
                match = self.index.match(k=self.match_k)
                members: dict[int, list[str]] = {}
                for lid, label in zip(match["listing_ids"], match["labels"].tolist(), strict=True):
                    members.setdefault(label, []).append(lid)
                for group in members.values():
                    for lid in group:
                        self._group_of[lid] = group
        return self._group_of

    def photo(self, listing_id: str):
        """The listing's (first) photo from the catalog, or None."""
        row = self.row_of.get(str(listing_id))
        if row is None:
            return None
        listing = self.catalog[row]
        image = listing.get("image")
        if image is None and listing.get("images"):
            image = listing["images"][0]
        return image

    def _category(self, listing_id: str) -> str | None:
        if listing_id in self.indexed:
            return self.index.meta["category"][self.indexed[listing_id]]
        if listing_id in self.row_of and "category" in self.catalog.column_names:
            return self.catalog[self.row_of[listing_id]]["category"]
        return None

    def _verdicts(self, answer: dict, category: str | None) -> dict:
        limit = threshold_of(self.threshold, category)
        for r in answer["results"]:
            r["same_product"] = None if limit is None else bool(r["score"] >= limit)
        answer["threshold"] = limit
        return answer

    # ------------------------------------------------------------------ queries
    def for_listing(self, listing_id: str | None) -> dict:
        """The answer for a listing of the index (its stored vector) or of the catalog (annotated and embedded now)."""
        listing_id = (listing_id or "").strip()
        if not listing_id:
            raise QueryError("empty query: type a listing id, or upload a photo and a title")
        if listing_id in self.indexed:
            answer = self.index.search_indexed([listing_id], k=self.k)[0]
            group = self.groups().get(listing_id, [])
        elif listing_id in self.row_of:
            answer = self.index.search(self.catalog.select([self.row_of[listing_id]]), k=self.k)[0]
            group = []
        else:
            raise QueryError(f"unknown listing id {listing_id!r}: it is neither in the index nor in the catalog")
        answer = self._verdicts(answer, self._category(listing_id))
        answer["group"], answer["photo"] = group, self.photo(listing_id)
        return answer

    def for_upload(self, image_path: str | None, title: str | None, category: str | None = None) -> dict:
        """The answer for a new listing: a photo (a file path) and a title; its group is the one its best match
        belongs to when that match passes the threshold."""
        from datasets import Dataset, Features, Image, Value
        from PIL import Image as PILImage

        title = (title or "").strip()
        if not image_path:
            raise QueryError("empty query: upload a photo (with its title), or type a listing id")
        try:
            with PILImage.open(image_path) as opened:
                image = opened.convert("RGB")
        except Exception as err:  # PIL raises several kinds for a file that is not an image
            name = Path(str(image_path)).name
            raise QueryError(f"the uploaded file {name!r} is not an image ({type(err).__name__})") from None
        columns = {"listing_id": ["upload"], "product_id": [""], "title": [title], "image": [image],
                   "category": [category or None]}  # fmt: skip
        features = {name: Value("string") for name in columns} | {"image": Image()}
        stored = self.index.config.get("generator") is None and self.index.config.get("attribute_column")
        if stored:  # the index reads the catalog's stored attributes: an upload has none
            columns[stored], features[stored] = [None], Value("string")
        listing = Dataset.from_dict(columns, features=Features(features))
        answer = self.index.search(listing, k=self.k)[0]
        answer = self._verdicts(answer, category or None)
        best = answer["results"][0] if answer["results"] else None
        answer["group"] = self.groups().get(best["listing_id"], []) if best and best["same_product"] else []
        answer["photo"] = image
        return answer


def _or_blank(image):
    return np.full((64, 64, 3), 220, dtype=np.uint8) if image is None else image


def _cards(viewer: MatchViewer, answer: dict) -> list:
    cards = []
    for rank, r in enumerate(answer["results"], 1):
        verdict = {True: "same product", False: "different", None: "not calibrated"}[r["same_product"]]
        cards.append(
            (_or_blank(viewer.photo(r["listing_id"])), f"#{rank} {r['listing_id']} · {r['score']:.3f} · {verdict}")
        )
    return cards


def _table(answer: dict) -> list[list]:
    verdict = {True: "same product", False: "different", None: "-"}
    return [[rank, r["listing_id"], r["product_id"], r["score"], verdict[r["same_product"]]]
            for rank, r in enumerate(answer["results"], 1)]  # fmt: skip


def build_page(viewer: MatchViewer):
    """The Gradio page over ``viewer`` (``gradio.Blocks``; call ``.launch()``)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network unless asked for
    import gradio as gr

    threshold = viewer.threshold or {}
    about = (f"{viewer.index.gallery.size} indexed listings · top {viewer.k} · "
             + (f"same product at score ≥ {threshold['score']:.3f} (per category where calibrated)"
                if viewer.calibrated else "no calibrated threshold: no verdicts, no groups"))  # fmt: skip
    columns = ["rank", "listing_id", "product_id", "score", "verdict"]

    def show(answer: dict, query: str):
        group = answer["group"]
        group_cards = [(_or_blank(viewer.photo(x)), x) for x in group]
        status = f"**{query}** · {len(answer['results'])} results"
        if len(group) > 1:
            group_text = (
                f"match group of {len(group)} listings: {', '.join(group[:20])}{' …' if len(group) > 20 else ''}"
            )
        else:
            group_text = "no match group: no other listing passes the same-product threshold (or none was calibrated)"
        return (status, answer["photo"], answer["attributes"] or "(no attributes)", _cards(viewer, answer),
                _table(answer), group_text, group_cards)  # fmt: skip

    def failed(err: Exception):
        return (f"**error:** {err}", None, "", [], [], "", [])

    def by_listing(listing_id):
        try:
            return show(viewer.for_listing(listing_id), f"listing {str(listing_id).strip()}")
        except QueryError as err:
            return failed(err)

    def by_upload(file, title, category):
        try:
            return show(viewer.for_upload(file, title, None if category in (None, "", "any") else category), "upload")
        except QueryError as err:
            return failed(err)

    with gr.Blocks(title="AFMRL matches", analytics_enabled=False) as page:
        gr.Markdown(f"## Which listings are the same product?\n{about}")
        with gr.Row():
            with gr.Column():
                listing_id = gr.Textbox(label="Listing id", placeholder=next(iter(viewer.indexed), ""),
                                        elem_id="listing-id")  # fmt: skip
                find = gr.Button("Find matches", elem_id="find-listing")
            with gr.Column():
                photo = gr.File(label="Or upload a photo", type="filepath", elem_id="upload-photo")
                title = gr.Textbox(label="Its title", elem_id="upload-title")
                category = gr.Dropdown(["any", *viewer.categories()], value="any", label="Its category")
                find_upload = gr.Button("Find matches for the upload", elem_id="find-upload")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            query_photo = gr.Image(label="Query", interactive=False, height=160, scale=1, elem_id="query-photo")
            attributes = gr.Textbox(label="Generated attributes", interactive=False, scale=4, elem_id="attributes")
        results = gr.Gallery(label="Top matches", columns=5, height="auto", elem_id="results")
        table = gr.Dataframe(headers=columns, label="Scores and verdicts", interactive=False, elem_id="table")
        group_text = gr.Markdown(elem_id="group")
        group = gr.Gallery(label="Match group", columns=8, height=220, elem_id="group-photos")
        outputs = [status, query_photo, attributes, results, table, group_text, group]
        find.click(by_listing, [listing_id], outputs)
        listing_id.submit(by_listing, [listing_id], outputs)
        find_upload.click(by_upload, [photo, title, category], outputs)
    return page
