"""The product encoder (VLM2Vec style) and its parts, one file each: ``config`` (what a saved encoder is),
``inputs`` (instruction + image(s) + title [+ attributes] as model inputs), ``image_cache`` (a listing's image
work reused), ``pooling`` (last-token state), ``crops`` (MOON's product-region views), ``moe`` (MOON2.0's
modality-aware experts), ``model`` (``ProductEncoder``; ``encode_catalog`` for a whole catalog)::

    from afmrl.encoder import ProductEncoder, encode_catalog
    encoder = ProductEncoder.from_pretrained("outputs/agcl-demo")
    vectors = encode_catalog(encoder, load_catalog("data/catalog", split="test"))   # (N, dim), L2-normalised

Names are imported lazily: ``afmrl.encoder.crops`` does not import torch.
"""

from afmrl._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "EncoderConfig": "afmrl.encoder.config",
        "EncoderLoadError": "afmrl.encoder.config",
        "read_encoder_config": "afmrl.encoder.config",
        "ProductEncoder": "afmrl.encoder.model",
        "encode_catalog": "afmrl.encoder.model",
        "catalog_views": "afmrl.encoder.crops",
        "uses_crops": "afmrl.encoder.crops",
    },
)
