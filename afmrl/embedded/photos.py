"""Product photos of the synthetic catalog, drawn with PIL from a product's true attributes.

A photo shows what a shopper's camera would: the category as the silhouette, ``color`` as the body,
``secondary_color`` as the pattern and a thin trim, ``pattern`` as the texture and ``logo`` as a small mark
in a contrasting ink; brand and size are not drawn (they live only in text). Each photo varies the
object's position and scale, the background tone and the pixel noise, from the ``rng`` it is given, so the
catalog stays byte-identical per seed. ``place_on_clutter`` puts a photo into a scene of coloured shapes
(MOON's product-region crops, ``afmrl.encoder.crops``).

    import numpy as np
    from afmrl.embedded.photos import render_product_image
    photo = render_product_image({"category": "mug", "color": "red", "secondary_color": "blue",
                                  "pattern": "striped", "logo": "star"}, np.random.default_rng(0))
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PALETTE = {
    "red": (200, 30, 35),
    "blue": (35, 70, 190),
    "green": (35, 150, 60),
    "yellow": (235, 200, 30),
    "black": (25, 25, 25),
    "white": (245, 245, 240),
    "orange": (240, 125, 20),
    "purple": (125, 50, 160),
}

_SUPERSAMPLE = 2  # drawn at twice the size, then downsampled: smooth edges


def _shape_mask(category: str, box: tuple[float, float, float, float], canvas: int) -> Image.Image:
    """A white-on-black mask of the product silhouette inside ``box`` (x0, y0, x1, y1)."""
    mask = Image.new("L", (canvas, canvas), 0)
    d = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0

    def p(fx, fy):
        return (x0 + fx * w, y0 + fy * h)

    if category == "t-shirt":
        d.polygon(
            [
                p(0.3, 0),
                p(0.7, 0),
                p(1, 0.2),
                p(0.85, 0.4),
                p(0.78, 0.32),
                p(0.78, 1),
                p(0.22, 1),
                p(0.22, 0.32),
                p(0.15, 0.4),
                p(0, 0.2),
            ],
            fill=255,
        )
    elif category == "mug":
        d.rectangle([p(0.1, 0.1), p(0.72, 1)], fill=255)
        d.ellipse([p(0.6, 0.3), p(1, 0.75)], outline=255, width=max(2, int(w * 0.08)))
    elif category == "bag":
        d.rectangle([p(0, 0.35), p(1, 1)], fill=255)
        d.arc([p(0.25, 0), p(0.75, 0.7)], 180, 360, fill=255, width=max(2, int(w * 0.07)))
    elif category == "bottle":
        d.rectangle([p(0.38, 0), p(0.62, 0.2)], fill=255)
        d.polygon([p(0.38, 0.2), p(0.62, 0.2), p(0.8, 0.35), p(0.2, 0.35)], fill=255)
        d.rectangle([p(0.2, 0.35), p(0.8, 1)], fill=255)
    elif category == "cap":
        d.pieslice([p(0.05, 0.15), p(0.85, 1.2)], 180, 360, fill=255)
        d.rectangle([p(0.45, 0.62), p(1, 0.75)], fill=255)
    elif category == "phone case":
        d.rounded_rectangle([p(0.2, 0), p(0.8, 1)], radius=w * 0.1, fill=255)
    else:
        raise ValueError(f"unknown category {category!r}")
    return mask


def _equal_ink_layer(pattern: str, color, box, canvas: int, base, period: float) -> Image.Image:
    """The texture with the same mean colour for every pattern: half ``color``, half ``base`` over the product. Where a
    pattern's marks cover c of the box, a pattern with c > 1/2 draws its marks in a blend (1/(2c) of ``color``), one
    with c < 1/2 tints the gaps, and ``solid`` is the even blend: what sets patterns apart is their detail alone, so a
    view too coarse to resolve it sees one colour."""
    marks = _pattern_layer(pattern, (255, 255, 255), box, canvas, (0, 0, 0), period)
    inside = np.asarray(marks, dtype=np.float32)[..., 0] > 127
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    region = inside[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)]
    c = float(region.mean()) if region.size else 0.0
    on, off = (0.5 / c, 0.0) if c >= 0.5 else (1.0, (0.5 - c) / (1.0 - c))
    weight = np.where(inside, on, off)[..., None]
    base_rgb, color_rgb = np.asarray(base, dtype=np.float32), np.asarray(color, dtype=np.float32)
    pixels = base_rgb + weight * (color_rgb - base_rgb)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _pattern_layer(pattern: str, color, box, canvas: int, base, period: float = 0.2) -> Image.Image:
    layer = Image.new("RGB", (canvas, canvas), base)
    d = ImageDraw.Draw(layer)
    x0, y0, x1, y1 = box
    step = max(4, int((x1 - x0) * period)) if period != 0.2 else max(4, int((x1 - x0) / 5))  # 0.2: the bytes of old
    if pattern == "striped":
        for y in range(int(y0), int(y1), step):
            d.rectangle([x0, y, x1, y + step // 2], fill=color)
    elif pattern == "dotted":
        r = step / 4
        for y in range(int(y0) + step // 2, int(y1), step):
            for x in range(int(x0) + step // 2, int(x1), step):
                d.ellipse([x - r, y - r, x + r, y + r], fill=color)
    elif pattern == "checked":
        for i, y in enumerate(range(int(y0), int(y1), step)):
            for j, x in enumerate(range(int(x0), int(x1), step)):
                if (i + j) % 2 == 0:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=color)
    elif pattern == "zigzag":
        for y in range(int(y0), int(y1), step):
            pts = [(x0 + k * step / 2, y + (step / 2 if k % 2 else 0)) for k in range(int(2 * (x1 - x0) / step) + 2)]
            d.line(pts, fill=color, width=max(2, step // 4))
    return layer


def _draw_logo(d: ImageDraw.ImageDraw, logo: str, center, radius: float, color) -> None:
    cx, cy = center
    r = radius
    if logo == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            ang = np.pi / 2 + k * np.pi / 5
            pts.append((cx + rr * np.cos(ang), cy - rr * np.sin(ang)))
        d.polygon(pts, fill=color)
    elif logo == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif logo == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=color)
    elif logo == "cross":
        t = r * 0.35
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=color)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=color)


def _logo_mask(logo: str, center, radius: float, canvas: int) -> np.ndarray:
    mask = Image.new("L", (canvas, canvas), 0)
    _draw_logo(ImageDraw.Draw(mask), logo, center, radius, 255)
    return np.asarray(mask, dtype=np.float32) / 255.0


def render_product_image(
    attrs: dict,
    rng: np.random.Generator,
    size: int = 64,
    *,
    logo_scale: float = 0.13,
    pattern_period: float = 0.2,
    equal_ink: bool = False,
    equal_ink_keys: tuple[str, ...] = ("pattern", "logo"),
) -> Image.Image:
    """Render one photo of a product from its true attributes, with per-photo variation. ``logo_scale`` (the mark's
    radius) and ``pattern_period`` (the texture's step) are fractions of the product's size: smaller values draw
    details that a coarse view (few image tokens) blurs and a fine one resolves. ``equal_ink`` gives every pattern
    the same mean colour and every logo shape the same amount of ink (a larger shape drawn fainter), so that only
    the detail tells values apart: otherwise each value has its own ink, which survives any downsampling (the fair
    test's third pilot); ``equal_ink_keys`` names which of the two it evens out. Off leaves every photo
    byte-identical."""
    canvas = size * _SUPERSAMPLE
    tone = int(rng.integers(185, 246))
    tint = rng.integers(-12, 13, size=3)
    background = tuple(int(np.clip(tone + t, 0, 255)) for t in tint)
    scale = rng.uniform(0.62, 0.88) * canvas
    cx = canvas / 2 + rng.uniform(-0.1, 0.1) * canvas
    cy = canvas / 2 + rng.uniform(-0.1, 0.1) * canvas
    box = (cx - scale / 2, cy - scale / 2, cx + scale / 2, cy + scale / 2)
    noise_sigma = rng.uniform(0.0, 8.0)

    body = PALETTE[attrs["color"]]
    accent = PALETTE[attrs["secondary_color"]]
    layer = _equal_ink_layer if equal_ink and "pattern" in equal_ink_keys else _pattern_layer
    product = layer(attrs["pattern"], accent, box, canvas, body, pattern_period)
    mask = _shape_mask(attrs["category"], box, canvas)
    image = Image.new("RGB", (canvas, canvas), background)
    image.paste(product, (0, 0), mask)
    draw = ImageDraw.Draw(image)
    # A thin trim in the secondary colour makes it visible even on solid products.
    edge = mask.point(lambda v: 255 if v > 0 else 0)
    trim = Image.new("RGB", (canvas, canvas), accent)
    inner = _shape_mask(attrs["category"], tuple(np.array(box) + np.array([3, 3, -3, -3]) * _SUPERSAMPLE), canvas)
    ring = Image.fromarray(((np.asarray(edge) > 0) & (np.asarray(inner) == 0)).astype(np.uint8) * 255)
    image.paste(trim, (0, 0), ring)
    if attrs["logo"] != "none":
        luminance = 0.3 * body[0] + 0.59 * body[1] + 0.11 * body[2]
        ink = (20, 20, 20) if luminance > 140 else (245, 245, 245)
        logo_center = (cx, cy + 0.12 * scale)
        if (
            equal_ink and "logo" in equal_ink_keys
        ):  # every shape the star's ink: the faintest shape at full strength, larger ones fainter
            mask = _logo_mask(attrs["logo"], logo_center, logo_scale * scale, canvas)
            star = _logo_mask("star", logo_center, logo_scale * scale, canvas).sum()
            alpha = mask * min(1.0, float(star) / max(float(mask.sum()), 1e-6))
            pixels = np.asarray(image, dtype=np.float32)
            pixels = pixels + alpha[..., None] * (np.asarray(ink, dtype=np.float32) - pixels)
            image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
        else:
            _draw_logo(draw, attrs["logo"], logo_center, logo_scale * scale, ink)

    image = image.resize((size, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, noise_sigma, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def place_on_clutter(product: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, list[int]]:
    """``product`` shrunk to 42-58% of its side and pasted at a random spot of a same-size scene of
    coloured shapes (palette colours: they compete with the product's own); returns (scene, box)."""
    size = product.width
    tone = int(rng.integers(150, 230))
    scene = Image.new("RGB", (size, size), (tone, tone, tone))
    draw = ImageDraw.Draw(scene)
    colors = list(PALETTE.values())
    for _ in range(int(rng.integers(5, 10))):
        x0, y0 = (float(v) for v in rng.uniform(-0.2, 0.9, 2) * size)
        w, h = (float(v) for v in rng.uniform(0.1, 0.45, 2) * size)
        fill = colors[int(rng.integers(len(colors)))]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=fill)
    side = max(8, round(size * rng.uniform(0.42, 0.58)))
    ox, oy = (int(v) for v in rng.integers(0, size - side + 1, 2))
    scene.paste(product.resize((side, side), Image.Resampling.LANCZOS), (ox, oy))
    return scene, [ox, oy, ox + side, oy + side]
