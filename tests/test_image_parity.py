"""AttentionViz's image features (issue 12, item 8): an image run's points drawn as their image
patches once few are in view (`viz.patches_layer`), the image colour modes "query / key (fill)"
and "no outline", and the sequence view's arrows and [CLS] indicator (`viz.image_arrows`)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from viz_fixtures import image_run  # noqa: F401  (fixture)

from viz import image_arrows, patches_layer
from viz.data import KEY_COLOUR, MODE_DESCRIPTIONS, QUERY_COLOUR, colour_modes, colouring
from viz.patches_layer import ImageLayout

LAYER, HEAD = 1, 0


def rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])


@pytest.fixture(scope="module")
def data(image_run):  # noqa: F811
    from pipeline.store import open_run
    from viz.data import RunData

    return RunData(open_run(image_run))


@pytest.fixture(scope="module")
def dashboard(data):
    import holoviews as hv

    from viz.views import Dashboard

    hv.extension("bokeh", logo=False)
    return Dashboard(data, {"layer": str(LAYER), "head": str(HEAD)})


# --- synthetic points: 2 sequences of 1 prefix token and a 2 x 2 patch grid -------------------

LAYOUT = ImageLayout(grid=2, prefix=1, image_size=8)
N = 10  # tokens


def synthetic_tokens() -> pd.DataFrame:
    pos = np.tile(np.arange(5), 2)
    return pd.DataFrame({"seq_id": np.repeat([0, 1], 5), "pos": pos, "seq_len": 5,
                         "patch_row": np.where(pos > 0, (pos - 1) // 2, -1)})


def synthetic_patches(seq_id: int) -> np.ndarray:
    """[5, 4, 4, 3]: patch p of sequence s is one flat grey level, 10 * (5 * s + p + 1)."""
    levels = 10 * (5 * seq_id + np.arange(5) + 1)
    return np.broadcast_to(levels[:, None, None, None], (5, 4, 4, 3)).astype(np.uint8)


def spread_coords(n_points: int) -> np.ndarray:
    """Points on a grid far enough apart (in a 400 px view of [0, 1]) that no two patches overlap."""
    side = int(np.ceil(np.sqrt(n_points)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), axis=-1).reshape(-1, 2)[:n_points]
    return (0.05 + 0.9 * grid / max(side - 1, 1)).astype(np.float32)


def centre_pixel(canvas: np.ndarray, coords: np.ndarray, point: int) -> np.ndarray:
    height, width = canvas.shape[:2]
    col = int(coords[point, 0] * width)
    row = int((1 - coords[point, 1]) * height)
    return canvas[row, col]


def draw(coords, mode="query / key", **options):
    return patches_layer.patches_rgba(coords, synthetic_tokens(), (0.0, 1.0), (0.0, 1.0), 400, 400,
                                      synthetic_patches, LAYOUT, mode, **options)


def test_patches_appear_only_under_the_point_threshold():
    coords = spread_coords(2 * N)
    assert draw(coords, max_points=2 * N - 1) is None  # every point in view: too many
    assert draw(coords, most_in_view=10**6) is None  # the cheap bound says too many: no scan
    canvas, count = draw(coords, max_points=2 * N)
    assert count == 2 * N and canvas.shape == (400, 400, 4)
    tokens = synthetic_tokens()
    for point in range(2 * N):  # each point shows its own patch (a prefix token: its whole image)
        row = tokens.iloc[point % N]
        cell = row["pos"] - 1 if row["pos"] > 0 else 4
        assert centre_pixel(canvas, coords, point)[0] == synthetic_patches(row["seq_id"])[cell, 0, 0, 0]
        assert centre_pixel(canvas, coords, point)[3] == 255
    # a zoomed-in view: only the points in it are drawn, and the rest of the canvas stays transparent
    canvas, count = patches_layer.patches_rgba(coords, tokens, (0.0, 0.5), (0.0, 0.5), 400, 400, synthetic_patches,
                                               LAYOUT, "query / key", max_points=2 * N)
    inside = patches_layer.points_in_view(coords, (0.0, 0.5), (0.0, 0.5))
    assert count == len(inside) and 0 < count < 2 * N
    assert (canvas[..., 3] > 0).sum() <= count * patches_layer.PATCH_PX ** 2


def test_image_colour_modes_style_the_patches():
    coords = spread_coords(2 * N)
    query, key = 3, N + 3  # the same token's query and key
    px, edge = patches_layer.PATCH_PX, patches_layer.OUTLINE_PX

    def tile(mode, point, colouring_=None):
        canvas, _ = draw(coords, mode, colouring=colouring_)
        height, width = canvas.shape[:2]
        left = int(round(coords[point, 0] * width - px / 2))
        top = int(round((1 - coords[point, 1]) * height - px / 2))
        return canvas[top:top + px, left:left + px, :3].astype(int)

    level = synthetic_patches(0)[2, 0, 0, 0]  # token 3 of sequence 0 is patch 2
    outlined, bare = tile("query / key", query), tile("no outline", query)
    assert (outlined[0, 0] == rgb(QUERY_COLOUR)).all() and (tile("query / key", key)[0, 0] == rgb(KEY_COLOUR)).all()
    assert (outlined[px // 2, px // 2] == level).all()
    assert (bare == level).all()  # no outline: the patch alone, edge to edge
    filled = tile("query / key (fill)", key)
    expected = np.round(level * (1 - patches_layer.FILL_ALPHA) + rgb(KEY_COLOUR) * patches_layer.FILL_ALPHA)
    assert (filled == expected).all()  # a translucent pink fill over the whole patch, no outline
    # another mode: its colour as the fill, inside the query / key outline
    modes = pd.DataFrame({"token_len": np.ones(N), "seq_len": 5, "pos_norm": np.linspace(0, 1, N)})
    by_position = colouring("position", modes)
    positioned = tile("position", query, by_position)
    mode_colour = rgb(by_position.point_colours(np.array([query]))[0])
    assert (positioned[0, 0] == rgb(QUERY_COLOUR)).all()
    assert (positioned[px // 2, px // 2] == np.round(level * (1 - patches_layer.FILL_ALPHA)
                                                     + mode_colour * patches_layer.FILL_ALPHA)).all()
    assert (positioned[edge:-edge, edge:-edge] != outlined[edge:-edge, edge:-edge]).any()


def test_a_clicked_sentence_keeps_its_patches_and_fades_the_rest():
    coords = spread_coords(2 * N)
    sentence = np.array([0, 1, 2, 3, 4, N, N + 1, N + 2, N + 3, N + 4])  # sequence 0's queries and keys
    canvas, count = draw(coords, sentence=sentence)
    assert count == 2 * N
    for point in range(2 * N):
        alpha = centre_pixel(canvas, coords, point)[3]
        assert alpha == (255 if point in sentence else round(255 * patches_layer.FADED_ALPHA))


def test_the_two_image_modes_colour_points_by_query_and_key():
    modes = colour_modes("image")
    assert {"query / key (fill)", "no outline"} <= set(modes) and "no outline" not in colour_modes("text")
    tokens = pd.DataFrame({"pos": np.arange(4), "pos_norm": np.linspace(0, 1, 4)})
    qk = colouring("query / key", tokens)
    for mode in ("query / key (fill)", "no outline"):
        assert MODE_DESCRIPTIONS[mode]
        other = colouring(mode, tokens)
        assert np.array_equal(other.codes, qk.codes) and other.colours == qk.colours


# --- the run's own images --------------------------------------------------------------------


def test_patches_are_the_pixels_the_model_saw(data, tiny_models):
    from transformers import AutoConfig, AutoImageProcessor

    config = AutoConfig.from_pretrained(tiny_models["vit"])
    layout = patches_layer.run_layout(data)  # the extraction records the model's input size
    assert layout == patches_layer.image_layout(data.tokens, data.run.manifest.model.patch_grid, config.image_size)
    assert (layout.grid, layout.prefix, layout.side) == (config.image_size // config.patch_size, 1, config.patch_size)
    processor = AutoImageProcessor.from_pretrained(tiny_models["vit"])  # the extraction's own processor
    for seq_id in data.sequences["seq_id"].to_numpy()[:3]:
        image = data.image(int(seq_id))
        values = processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        seen = (values * np.asarray(processor.image_std) + np.asarray(processor.image_mean)) * 255
        patches = patches_layer.sequence_patches(image, layout)
        rows = data.sequence_tokens(int(seq_id))
        for row in rows.itertuples():
            if row.pos < layout.prefix:
                continue
            cell = patches_layer.patch_of(np.array([row.pos]), layout)[0]
            top, left = row.patch_row * layout.side, row.patch_col * layout.side
            expected = seen[top:top + layout.side, left:left + layout.side]
            assert np.abs(patches[cell].astype(np.float64) - expected).max() <= 0.51, (seq_id, row.pos)
    patches_of = patches_layer.cached_patches(data, layout)
    first = int(data.sequences["seq_id"].iat[0])
    assert patches_of(first) is patches_of(first)  # cut once per server; the cache is bounded
    assert data._caches["image_patches"].maxsize > 0


def test_the_head_view_draws_patches_in_the_chosen_mode(dashboard):
    view, state = dashboard.head, dashboard.state
    state.layer, state.head = LAYER, HEAD
    assert view.image_layout is not None and not view.show_tokens  # token labels off over patches
    points = 2 * dashboard.data.n
    assert points <= patches_layer.MAX_POINTS  # the tiny run: every point fits, at full view

    def shown() -> np.ndarray:
        element = view._patches()
        return np.dstack([element.dimension_values(d, flat=False) for d in ("R", "G", "B", "A")]).astype(int)

    def framed(rgba) -> int:
        return sum(int((np.abs(rgba[..., :3] - rgb(c)).sum(axis=-1) == 0).sum()) for c in (QUERY_COLOUR, KEY_COLOUR))

    state.colour = "query / key"
    outlined = shown()
    assert (outlined[..., 3] > 0).sum() > points * 50  # a patch for (nearly) every point, overlaps aside
    state.colour = "no outline"
    bare = shown()
    assert np.array_equal(bare[..., 3] > 0, outlined[..., 3] > 0)  # the same patches, in the same places
    assert framed(outlined) > points * 40 and framed(bare) < 0.1 * framed(outlined)
    state.colour = "query / key"


# --- the sequence view's arrows and [CLS] indicator -------------------------------------------


def test_arrows_go_to_the_top_patches_and_the_cls_share_is_the_first_column(data):
    layout = patches_layer.run_layout(data)
    seq_id = int(data.sequences["seq_id"].iat[1])
    attention = data.attention(seq_id, LAYER, HEAD)
    cells = layout.grid * layout.grid
    for pos in (layout.prefix + 5, 0):  # a patch's query, the [CLS] query
        row = attention[pos]
        patch = pos - layout.prefix if pos >= layout.prefix else None
        links = image_arrows.top_links(row, layout.grid, layout.prefix, patch, "query", k=4)
        top = np.argsort(-row[layout.prefix:layout.prefix + cells])[:4]
        assert [to for _, to, _ in links] == list(top)
        assert all(source == (image_arrows.PREFIX_CELL if patch is None else patch) for source, _, _ in links)
        assert np.allclose([w for _, _, w in links], row[layout.prefix + top])
        assert image_arrows.prefix_share(row, layout.prefix) == pytest.approx(attention[pos, 0])
    key = layout.prefix + 2  # a clicked key: links from the queries that attend to it most
    column = attention[:, key]
    links = image_arrows.top_links(column, layout.grid, layout.prefix, key - layout.prefix, "key", k=3)
    assert [source for source, _, _ in links] == list(np.argsort(-column[layout.prefix:])[:3])
    assert {to for _, to, _ in links} == {key - layout.prefix}
    assert image_arrows.prefix_share(column, layout.prefix) == pytest.approx(attention[0, key])


def test_the_image_shows_arrows_and_the_cls_indicator(data):
    from PIL import Image

    from viz.sequence_view import image_heatmap

    layout = patches_layer.run_layout(data)
    seq_id = int(data.sequences["seq_id"].iat[0])
    image = data.image(seq_id)
    size, grid, prefix = 320, layout.grid, layout.prefix
    strip = image_arrows.strip_height(size)
    side = size - strip
    row = np.zeros(prefix + grid * grid)
    row[0], row[prefix + 0], row[prefix + grid * grid - 1] = 0.5, 0.25, 0.25  # [CLS] 50 %, two patches
    selected = grid + 1

    def picture(kind="query", weights=row, patch=selected):
        return np.asarray(Image.open(io.BytesIO(image_heatmap(image, weights, grid, prefix, patch, size, kind))),
                          dtype=int)

    marked = picture()
    assert marked.shape == (size, size, 3)
    step = side / grid
    left = strip // 2

    def near(colour, x, y, r=4):
        patch = marked[int(y) - r:int(y) + r + 1, int(x) - r:int(x) + r + 1]
        return bool((np.abs(patch - rgb(colour)).sum(axis=-1) < 30).any())

    # arrows end at the two attended patches' centres (top left, bottom right), from the selected one
    for cell in (0, grid * grid - 1):
        r, c = divmod(cell, grid)
        toward = np.array([left + (c + 0.5) * step, (r + 0.5) * step])
        start = np.array([left + (selected % grid + 0.5) * step, (selected // grid + 0.5) * step])
        assert near(QUERY_COLOUR, *(start + 0.6 * (toward - start)))
    # no arrow to a patch given nothing (the top right one)
    assert not near(QUERY_COLOUR, left + (grid - 0.5) * step, 0.5 * step, r=2)
    # the [CLS] indicator below the image: a half-filled pie in the query colour, on white
    indicator = marked[side:]
    green = (np.abs(indicator - rgb(QUERY_COLOUR)).sum(axis=-1) < 30).sum()
    radius = strip * 0.36
    assert 0.3 * np.pi * radius ** 2 < green < 0.7 * np.pi * radius ** 2
    assert (indicator[:, -20:] == 255).all()  # the label ends before the strip does
    less = row.copy()
    less[0], less[prefix + 1] = 0.1, 0.4
    green_less = (np.abs(picture(weights=less)[side:] - rgb(QUERY_COLOUR)).sum(axis=-1) < 30).sum()
    assert green_less < 0.5 * green  # the pie follows the share
    keyed = picture("key")  # a clicked key: the indicator and arrows in the key colour
    assert (np.abs(keyed[side:] - rgb(KEY_COLOUR)).sum(axis=-1) < 30).sum() > 0.3 * np.pi * radius ** 2


def test_arrow_width_and_opacity_follow_the_weight():
    from PIL import Image

    white = Image.new("RGB", (200, 100), "white")
    links = [(0, 1, 0.8), (8, 9, 0.2)]  # a 4 x 4 grid over the picture's left square: two horizontal arrows
    drawn = np.asarray(image_arrows.draw_links(white, links, 4, (0, 0, 100), (150, 50), QUERY_COLOUR), dtype=int)
    strong, weak = drawn[12, 15:30], drawn[62, 15:30]  # rows through each arrow's shaft (cell centres 12.5, 62.5)
    assert (np.abs(strong - rgb(QUERY_COLOUR)).sum(axis=-1) < 10).any()  # the strongest: opaque
    assert not (np.abs(weak - rgb(QUERY_COLOUR)).sum(axis=-1) < 10).any()  # the weaker: translucent
    thickness = lambda x: int((np.abs(drawn[:, x] - 255).sum(axis=-1) > 30).sum())  # noqa: E731
    assert thickness(20) > 0
    column = drawn[:, 20]
    strong_px = int((np.abs(column[:40] - 255).sum(axis=-1) > 30).sum())
    weak_px = int((np.abs(column[50:] - 255).sum(axis=-1) > 30).sum())
    assert strong_px > weak_px > 0  # wider for more weight
