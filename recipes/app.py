"""Deployment, step 4: a local page to look at the matches of an index (Gradio).

    python recipes/app.py --index outputs/index --catalog outputs/embedded/catalog-600-seed0-val0.3
    python recipes/app.py --index outputs/index --catalog data/catalog --port 8080 --host 0.0.0.0

Pick a listing by id, or upload a photo and a title: the page shows the attributes the index's generator writes,
the top-k listings with their photos, scores and the same-product verdict (the calibrated threshold), and the match
group (``deploy.viewer``). ``--catalog`` supplies the photos (default: the catalog the index was built from). The
index and catalog are checked before the server starts (bad input is one ``error:`` line, exit code 2); a bad query
on the page is a message there, and the server keeps serving.
"""

import sys
from dataclasses import dataclass, field

from afmrl.catalog.load import load_catalog
from afmrl.cli import run_cli
from afmrl.embedded import resolve_catalog
from deploy import ProductIndex
from deploy.viewer import MatchViewer, build_page


@dataclass
class AppArguments:
    index: str = field(metadata={"help": "An index directory written by recipes/index_catalog.py."})
    catalog: str | None = field(
        default=None,
        metadata={"help": "The catalog with the listings' photos (directory, saved dataset, hub id, 'embedded'); "
                  "default: the one the index was built from."},
    )  # fmt: skip
    top_k: int = field(default=10, metadata={"help": "Results shown per query."})
    match_k: int = field(default=10, metadata={"help": "Neighbours per listing when the match groups are formed."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to serve on (0.0.0.0: the whole network)."})
    port: int = field(default=7860, metadata={"help": "Port to serve on."})
    cache_dir: str = field(default="outputs/embedded", metadata={"help": "Where 'embedded' catalogs are built."})

    def __post_init__(self):
        if self.top_k < 1 or self.match_k < 1:
            raise ValueError(f"--top_k and --match_k must be >= 1, got {self.top_k} and {self.match_k}")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be a port number (1-65535), got {self.port}")


def main(args: AppArguments, launch: bool = True):
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError('the page needs gradio: pip install -e ".[app]"') from None
    index = ProductIndex.load(args.index)
    source = args.catalog or index.config.get("catalog")
    if source is None:
        raise ValueError("--catalog is needed: the index does not say which catalog it was built from")
    catalog = load_catalog(resolve_catalog(source, args.cache_dir))
    known = set(catalog["listing_id"])
    missing = sum(lid not in known for lid in index.gallery.listing_ids[:1000])
    if missing == min(1000, index.gallery.size):
        raise ValueError(f"--catalog {source!r} holds none of the indexed listings: it is not the index's catalog")
    viewer = MatchViewer(index, catalog, k=args.top_k, match_k=args.match_k)
    page = build_page(viewer)
    if launch:
        print(
            f"[app] {index.gallery.size} indexed listings; serving on http://{args.host}:{args.port}", file=sys.stderr
        )
        page.launch(server_name=args.host, server_port=args.port)
    return page


def cli(argv=None):
    return run_cli(AppArguments, main, argv)


if __name__ == "__main__":
    cli(sys.argv[1:])
