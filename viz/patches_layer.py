"""Image patches as points on the head view of an image run, as AttentionViz draws ViT heads: once
few enough points are in view (the token labels' rule, `viz.tokens_layer`), each point in view is
drawn as the patch its token stands for, a PATCH_PX square of the pixels the model saw (the image
resized to the model's input size and cut into its patch grid), in the colour mode's style:

- "query / key": outlined in the query green or the key pink;
- "query / key (fill)": under a translucent green or pink fill;
- "no outline": the bare patch;
- any other mode: outlined green or pink, under a translucent fill of the point's colour in that
  mode (AttentionViz's colour layer over its patches).

Prefix tokens ([CLS], [DIST]) have no patch: they show their whole image. With a clicked sentence,
the other points' patches fade. One view's patches are composed on the server into one RGBA image
of the plot's size (one element, whatever the number of points); an image is cut once per server
and its patches kept in the run's bounded cache (`RunData.cached`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from viz.palette import KEY_COLOUR, QUERY_COLOUR
from viz.tokens_layer import MAX_POINTS, points_in_view

PATCH_PX = 20
OUTLINE_PX = 2
FILL_ALPHA = 145 / 255  # AttentionViz's colour layer over its image patches
FADED_ALPHA = 0.25  # patches outside the clicked sentence
DEFAULT_PATCH_SIDE = 16  # pixels per patch side where the run does not record the model's input size
RENDERER_NAME = "qk-patches"
NO_OUTLINE, QK_FILL = "no outline", "query / key (fill)"


@dataclass(frozen=True)
class ImageLayout:
    """How an image run's tokens map to pixels: `grid` patches per side, `prefix` tokens before the
    first patch ([CLS], ...), `image_size` pixels per side of the model's input."""

    grid: int
    prefix: int
    image_size: int

    @property
    def side(self) -> int:
        return self.image_size // self.grid


def image_layout(tokens: pd.DataFrame, patch_grid: int | None = None, image_size: int | None = None) -> ImageLayout:
    """The layout of a run's token table (`patch_row` -1 before the patches); `patch_grid` and
    `image_size` as the run's manifest records them (`image_size` None: DEFAULT_PATCH_SIDE a patch)."""
    grid = int(patch_grid) if patch_grid else int(tokens["patch_row"].max()) + 1
    first = tokens["patch_row"].iloc[:int(tokens["seq_len"].iat[0])]
    return ImageLayout(grid, int((first < 0).sum()), int(image_size) if image_size else grid * DEFAULT_PATCH_SIDE)


def run_layout(data) -> ImageLayout:
    """The layout of a `viz.data.RunData` of an image run."""
    model = data.run.manifest.model
    return image_layout(data.tokens, model.patch_grid, getattr(model, "image_size", None))


def sequence_patches(image, layout: ImageLayout) -> np.ndarray:
    """uint8 [grid * grid + 1, side, side, 3]: the image as the model saw it (resized to its input
    size with the bilinear filter ViT image processors use) cut into its patches, row-major
    (row * grid + column), then the whole image shrunk to one patch, for the prefix tokens."""
    from PIL import Image

    grid, side = layout.grid, layout.side
    rgb = image.convert("RGB")
    pixels = np.asarray(rgb.resize((layout.image_size, layout.image_size), Image.BILINEAR))[:grid * side, :grid * side]
    patches = pixels.reshape(grid, side, grid, side, 3).swapaxes(1, 2).reshape(grid * grid, side, side, 3)
    whole = np.asarray(rgb.resize((side, side), Image.BILINEAR))
    return np.concatenate([patches, whole[None]])


def cached_patches(data, layout: ImageLayout):
    """`patches_of(seq_id)` -> `sequence_patches` of that sequence's image, kept in the server's cache."""
    def patches_of(seq_id: int) -> np.ndarray:
        return data.cached("image_patches", (int(seq_id), layout.image_size, layout.grid),
                           lambda: sequence_patches(data.image(int(seq_id)), layout))
    return patches_of


def patch_of(pos: np.ndarray, layout: ImageLayout) -> np.ndarray:
    """Each position's row of `sequence_patches`: its patch, or the whole image for a prefix token."""
    pos = np.asarray(pos, dtype=np.int64)
    return np.where(pos >= layout.prefix, pos - layout.prefix, layout.grid * layout.grid)


def patch_points(coords: np.ndarray, x_range, y_range, max_points: int = MAX_POINTS,
                 most_in_view: int | None = None) -> np.ndarray | None:
    """The points to draw as patches: every point in view when at most `max_points` are, else None.
    `most_in_view` (`viz.raster.HeadPoints.most_in`) spares the scan where it says there are too many."""
    if most_in_view is not None and most_in_view > max_points:
        return None
    in_view = points_in_view(coords, x_range, y_range)
    return in_view if len(in_view) <= max_points else None


def _rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)


def point_style(points: np.ndarray, n_tokens: int, mode: str, colouring=None) -> tuple[np.ndarray, np.ndarray]:
    """(outline [n, 3] float RGB or NaN for none, fill [n, 4] RGB + alpha) of each point in `mode`;
    `colouring` (`viz.data.Colouring` of the mode) gives other modes' fill colours."""
    points = np.asarray(points, dtype=np.int64)
    qk = np.where((points < n_tokens)[:, None], _rgb(QUERY_COLOUR), _rgb(KEY_COLOUR))
    outline = np.full((len(points), 3), np.nan) if mode in (NO_OUTLINE, QK_FILL) else qk
    fill = np.zeros((len(points), 4))
    if mode == QK_FILL:
        fill = np.concatenate([qk, np.full((len(points), 1), FILL_ALPHA)], axis=1)
    elif mode not in ("query / key", NO_OUTLINE) and colouring is not None and len(points):
        colours = np.array([_rgb(c) for c in colouring.point_colours(points)])
        fill = np.concatenate([colours, np.full((len(points), 1), FILL_ALPHA)], axis=1)
    return outline, fill


def styled_tile(patch: np.ndarray, outline: np.ndarray, fill: np.ndarray, alpha: float,
                patch_px: int = PATCH_PX) -> np.ndarray:
    """uint8 [patch_px, patch_px, 4]: a patch ([side, side, 3]) scaled to `patch_px` (nearest, so
    its pixels stay the model's), under `fill`, inside `outline` (NaN: none), at opacity `alpha`."""
    index = np.arange(patch_px) * patch.shape[0] // patch_px
    rgb = patch[index][:, index].astype(np.float64)
    rgb = rgb * (1 - fill[3]) + fill[:3] * fill[3]
    if not np.isnan(outline).any():
        edge = np.zeros((patch_px, patch_px), dtype=bool)
        edge[:OUTLINE_PX], edge[-OUTLINE_PX:], edge[:, :OUTLINE_PX], edge[:, -OUTLINE_PX:] = True, True, True, True
        rgb[edge] = outline
    return np.dstack([np.round(rgb), np.full((patch_px, patch_px), round(255 * alpha))]).astype(np.uint8)


def patches_rgba(coords: np.ndarray, tokens: pd.DataFrame, x_range, y_range, width: int, height: int,
                 patches_of, layout: ImageLayout, mode: str, colouring=None, sentence: np.ndarray | None = None,
                 most_in_view: int | None = None, max_points: int = MAX_POINTS,
                 patch_px: int = PATCH_PX) -> tuple[np.ndarray, int] | None:
    """([height, width, 4] uint8, top row first, transparent where no patch; the patches drawn), or
    None where more than `max_points` points are in view. `coords` is [2 * n_tokens, >= 2] (queries
    first), `tokens` the run's token table, `patches_of(seq_id)` -> `sequence_patches` of its image;
    `sentence`: the clicked sentence's points, drawn last at full strength while the rest fade."""
    points = patch_points(coords, x_range, y_range, max_points, most_in_view)
    if points is None:
        return None
    n = len(tokens)
    alpha = np.ones(len(points))
    if sentence is not None and len(sentence):
        mine = np.isin(points, sentence)
        alpha = np.repeat([FADED_ALPHA, 1.0], [int((~mine).sum()), int(mine.sum())])
        points = np.concatenate([points[~mine], points[mine]])
    canvas = np.zeros((int(height), int(width), 4), dtype=np.uint8)
    if not len(points):
        return canvas, 0
    rows = tokens.iloc[points % n]
    seq_ids, cells = rows["seq_id"].to_numpy(), patch_of(rows["pos"].to_numpy(), layout)
    outline, fill = point_style(points, n, mode, colouring)
    left = np.round((coords[points, 0] - x_range[0]) / max(x_range[1] - x_range[0], 1e-12) * width - patch_px / 2)
    top = np.round((y_range[1] - coords[points, 1]) / max(y_range[1] - y_range[0], 1e-12) * height - patch_px / 2)
    for i in range(len(points)):
        x0, y0 = int(left[i]), int(top[i])
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + patch_px, width), min(y0 + patch_px, height)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        tile = styled_tile(patches_of(seq_ids[i])[cells[i]], outline[i], fill[i], alpha[i], patch_px)
        canvas[cy0:cy1, cx0:cx1] = tile[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return canvas, len(points)


def _named(count: int, mode: str):
    def hook(plot, element):
        """Names the renderer and tags it (patches drawn, mode), for tests and page scripts."""
        renderer = plot.handles["glyph_renderer"]
        renderer.name, renderer.tags = RENDERER_NAME, [count, mode]
    return hook


def patches_element(drawn: tuple[np.ndarray, int] | None, x_range=None, y_range=None, mode: str = ""):
    """hv.RGB of `patches_rgba`'s image over the view's range (one transparent pixel when none)."""
    import holoviews as hv

    rgba, count = drawn if drawn is not None else (np.zeros((1, 1, 4), dtype=np.uint8), 0)
    bounds = (x_range[0], y_range[0], x_range[1], y_range[1]) if x_range is not None else (-0.5, -0.5, 0.5, 0.5)
    return hv.RGB(rgba, bounds=bounds, kdims=["x", "y"]).opts(hooks=[_named(count, mode)])
