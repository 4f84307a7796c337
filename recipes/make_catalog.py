"""Write the embedded synthetic fine-grained catalog.

    python recipes/make_catalog.py --output_dir data/catalog --num_products 600 --seed 0

Every flag is a field of `afmrl.embedded.synthetic_catalog.SyntheticCatalogConfig` (see `--help`);
the same flags always give byte-identical files.
"""

from transformers import HfArgumentParser

from afmrl.embedded.synthetic_catalog import SyntheticCatalogConfig, make_synthetic_catalog


def main(argv=None):
    parser = HfArgumentParser(SyntheticCatalogConfig)
    try:
        (config,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # raised by SyntheticCatalogConfig.__post_init__
        parser.error(str(err))
    out = make_synthetic_catalog(config=config)
    n = sum(1 for _ in open(out / "catalog.jsonl", encoding="utf-8"))
    print(f"wrote {n} listings of {config.num_products} products to {out / 'catalog.jsonl'}")


if __name__ == "__main__":
    main()
