"""Marks on an image run's sequence view (`viz.sequence_view.image_heatmap`): arrows from the
clicked query's patch to the patches it attends to most (for a clicked key, from the patches
whose queries attend to it most), width and opacity by weight, a ring where the patch attends to
itself, and the [CLS] indicator below the image: a labelled pie of how much of the clicked
query's attention goes to the prefix tokens ([CLS], and [DIST] where the model has one), or, for
a clicked key, how much the prefix queries give it. The prefix tokens have no patch; arrows from
or to a clicked prefix token start or end at the indicator."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from viz.palette import KEY_COLOUR, QUERY_COLOUR

TOP_LINKS = 4
PREFIX_CELL = -1  # the prefix tokens' place: the indicator below the image
HALO = (20, 20, 20)


def strip_height(size: int) -> int:
    """Pixels below the image for the [CLS] indicator, in a `size` square picture."""
    return max(16, size // 7)


def top_links(weights: np.ndarray, grid: int, prefix: int, selected_patch: int | None, kind: str,
              k: int = TOP_LINKS) -> list[tuple[int, int, float]]:
    """The clicked token's `k` strongest links to patches, strongest first, as (from cell, to cell,
    weight): a cell is a patch (row * grid + column) or PREFIX_CELL. `weights` is the clicked
    query's attention over every key (kind "query": links from it), or every query's attention to
    the clicked key (kind "key": links to it); `selected_patch` the clicked token's patch, None for
    a prefix token. A link from a patch to itself is its self-attention."""
    patch_weights = np.asarray(weights, dtype=np.float64)[prefix:prefix + grid * grid]
    order = np.argsort(-patch_weights, kind="stable")[:k]
    me = PREFIX_CELL if selected_patch is None else int(selected_patch)
    return [(me, int(c), float(patch_weights[c])) if kind == "query" else (int(c), me, float(patch_weights[c]))
            for c in order if patch_weights[c] > 0]


def prefix_share(weights: np.ndarray, prefix: int) -> float:
    """The prefix tokens' part of `weights` (a query's attention: its share on [CLS] and the other
    prefix tokens; a key's column: what the prefix queries give it)."""
    return float(np.sum(np.asarray(weights, dtype=np.float64)[:prefix]))


def _rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def draw_links(picture: Image.Image, links: list[tuple[int, int, float]], grid: int, box: tuple[float, float, float],
               prefix_centre: tuple[float, float], colour: str) -> Image.Image:
    """`picture` with `links` drawn over the image at `box` (left, top, side): arrows from cell to
    cell (a dark halo under each), width and opacity relative to the strongest link, and a ring
    for a self-link; PREFIX_CELL is at `prefix_centre`."""
    if not links:
        return picture
    left, top, side = box
    step = side / grid

    def centre(cell: int) -> np.ndarray:
        if cell == PREFIX_CELL:
            return np.asarray(prefix_centre, dtype=np.float64)
        row, col = divmod(cell, grid)
        return np.array([left + (col + 0.5) * step, top + (row + 0.5) * step])

    overlay = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    strongest = max(w for _, _, w in links)
    rgb = _rgb(colour)
    for source, target, weight in reversed(links):  # the strongest drawn last, on top
        strength = weight / max(strongest, 1e-12)
        width, alpha = 1.5 + 3.5 * strength, int(255 * (0.35 + 0.65 * strength))
        a, b = centre(source), centre(target)
        if source == target:
            r = step * 0.3
            for fill, w in ((HALO, width + 2), (rgb, width)):
                draw.ellipse([*(a - r), *(a + r)], outline=fill + (alpha,), width=max(1, round(w)))
            continue
        direction = (b - a) / max(np.linalg.norm(b - a), 1e-9)
        head = min(4 + 2.5 * width, 0.45 * np.linalg.norm(b - a))
        tip = b - direction * min(step * 0.2, 0.2 * np.linalg.norm(b - a))
        base = tip - direction * head
        normal = np.array([-direction[1], direction[0]]) * head * 0.55
        triangle = [tuple(tip), tuple(base + normal), tuple(base - normal)]
        for fill, w in ((HALO, width + 2), (rgb, width)):
            draw.line([tuple(a), tuple(base)], fill=fill + (alpha,), width=max(1, round(w)))
        draw.polygon(triangle, fill=rgb + (alpha,), outline=HALO + (alpha,))
    return Image.alpha_composite(picture.convert("RGBA"), overlay).convert("RGB")


def draw_prefix_indicator(picture: Image.Image, share: float, kind: str, prefix: int, centre: tuple[float, float],
                          radius: float, colour: str) -> None:
    """The [CLS] indicator, in place: a pie of `share` at `centre` and its label to the right."""
    draw = ImageDraw.Draw(picture)
    x, y = centre
    ring = [x - radius, y - radius, x + radius, y + radius]
    draw.ellipse(ring, fill=(235, 235, 235), outline=HALO, width=1)
    if share > 0:
        draw.pieslice(ring, -90, -90 + 360 * min(share, 1.0), fill=_rgb(colour), outline=HALO)
    name = "[CLS]" if prefix == 1 else "prefix"
    text = f"{name}: {share:.0%} of its attention" if kind == "query" else f"{name} query: {share:.0%} to this key"
    draw.text((x + radius + 6, y), text, fill=HALO, anchor="lm", font=_font(max(8, round(radius * 0.9))))


def draw_image_marks(picture: Image.Image, weights: np.ndarray, grid: int, prefix: int, selected_patch: int | None,
                     kind: str, box: tuple[float, float, float], k: int = TOP_LINKS) -> Image.Image:
    """`picture` (the image at `box`: left, top, side; the strip below it free) with the clicked
    token's strongest links and the [CLS] indicator in the strip."""
    left, top, side = box
    strip = picture.size[1] - (top + side)
    radius = max(4.0, strip * 0.36)
    centre = (left + radius + 2, top + side + strip / 2)
    colour = QUERY_COLOUR if kind == "query" else KEY_COLOUR
    draw_prefix_indicator(picture, prefix_share(weights, prefix), kind, prefix, centre, radius, colour)
    return draw_links(picture, top_links(weights, grid, prefix, selected_patch, kind, k), grid, box, centre, colour)
