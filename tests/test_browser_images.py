"""Real-browser test of AttentionViz's image features (issue 12, item 8): `qkatlas serve` over a
tiny ViT run in a subprocess, Chromium driven by Playwright (see tests/test_browser.py). Zooming into
a head draws its points as image patches (read from the renderer `viz.patches_layer` names and seen
in screenshots), the two image colour modes restyle them, and a clicked patch's sequence view shows
its arrows and [CLS] indicator: the very picture `image_heatmap` draws from the store."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from test_browser import browser, click_until, new_page, pixels, serve, shot, stop, text_of  # noqa: F401
from test_browser_parity import wait_until

from viz import image_arrows, patches_layer
from viz.data import KEY_COLOUR, MODE_DESCRIPTIONS, QUERY_COLOUR

pytestmark = pytest.mark.timeout(300)
HEAD = "?layer=1&head=0&method=pca&dim=2"
N_IMAGES = 24  # 24 x 17 tokens: 816 points, more than the patches' threshold at full view

PATCHES = """(name) => {
  for (const doc of (window.Bokeh && window.Bokeh.documents) || [])
    for (const model of doc.all_models)
      if (model.name === name) return Array.from(model.tags);
  return null;
}"""


@pytest.fixture(scope="module")
def many_image_run(tiny_models, tmp_path_factory) -> str:
    """The tiny ViT over N_IMAGES images, each a two-colour gradient with a square in the middle
    (patches that tell apart in a screenshot); PCA 2-D of every head."""
    from PIL import Image

    from pipeline.config import ExtractConfig, ReduceConfig
    from pipeline.extract import extract
    from pipeline.reduce.project import reduce_run

    root = tmp_path_factory.mktemp("many-images")
    rng = np.random.default_rng(3)
    x = np.linspace(0, 1, 40)[None, :, None]
    for index in range(N_IMAGES):
        folder = root / "abc"[index % 3]
        folder.mkdir(exist_ok=True)
        left, right, square = rng.integers(0, 256, (3, 3))
        picture = np.broadcast_to(left * (1 - x) + right * x, (40, 40, 3)).copy()
        picture[12:28, 12:28] = square
        Image.fromarray(picture.astype(np.uint8)).save(folder / f"{index}.png")
    out = str(tmp_path_factory.mktemp("viz-run") / "images")
    extract(ExtractConfig(model=tiny_models["vit"], data=str(root), out=out, batch_size=8))
    reduce_run(out, ReduceConfig(methods=["pca"], dims=[2]))
    return out


def patches(page) -> tuple[int, str]:
    """(patches drawn, the colour mode they were drawn in)."""
    tags = page.evaluate(PATCHES, patches_layer.RENDERER_NAME) or [0, ""]
    return int(tags[0]), str(tags[1])


def colour_count(image: np.ndarray, colour: str, tolerance: int = 12) -> int:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image - rgb).sum(axis=-1) < tolerance).sum())


def outline_pixels(image: np.ndarray) -> int:
    return colour_count(image, QUERY_COLOUR) + colour_count(image, KEY_COLOUR)


def choose_mode(page, plot, mode: str, name: str) -> np.ndarray:
    page.locator("select").filter(has_text="patch row").first.select_option(mode)
    legend = page.locator(".qk-legend").first
    assert wait_until(page, lambda: MODE_DESCRIPTIONS[mode] in text_of(legend))
    assert wait_until(page, lambda: patches(page)[1] == mode and patches(page)[0] > 0), patches(page)
    page.wait_for_timeout(1200)
    return pixels(shot(page, name, plot))


def test_patches_modes_arrows_and_cls_indicator(browser, many_image_run):  # noqa: F811
    from PIL import Image

    from pipeline.store import open_run
    from viz.data import RunData
    from viz.sequence_view import image_heatmap

    data = RunData(open_run(many_image_run))
    layout = patches_layer.run_layout(data)
    process, url = serve(many_image_run)
    try:
        page, errors = new_page(browser)
        page.goto(url + HEAD, wait_until="networkidle")
        plot = page.locator(".qk-head-plot").first
        plot.wait_for(state="visible", timeout=60_000)
        assert wait_until(page, lambda: patches(page)[1] == "query / key")
        assert patches(page)[0] == 0  # every point in view: dots, no patches
        page.wait_for_timeout(1000)
        dots = pixels(shot(page, "images-01-dots", plot))

        box = plot.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for _ in range(30):  # the wheel zooms in about the pointer, a small step at a time
            page.mouse.wheel(0, -100)
            page.wait_for_timeout(700)
            if patches(page)[0]:
                break
        assert wait_until(page, lambda: patches(page)[0] > 0), "no patches after zooming in"
        assert patches(page)[0] <= patches_layer.MAX_POINTS
        page.wait_for_timeout(1500)
        outlined = pixels(shot(page, "images-02-patches-query-key", plot))
        frame_px = patches_layer.PATCH_PX ** 2 - (patches_layer.PATCH_PX - 2 * patches_layer.OUTLINE_PX) ** 2
        assert outline_pixels(outlined) > 0.3 * frame_px * patches(page)[0]  # green and pink frames
        assert np.abs(outlined - dots).sum(axis=-1).astype(bool).sum() > 10_000

        filled = choose_mode(page, plot, "query / key (fill)", "images-03-patches-fill")
        bare = choose_mode(page, plot, "no outline", "images-04-patches-no-outline")
        assert outline_pixels(bare) < 0.3 * outline_pixels(outlined)  # the frames are gone
        assert np.abs(filled - bare).sum(axis=-1).astype(bool).sum() > 2000  # the fill tints every patch

        info = page.locator(".qk-sequence-info").first
        view = page.locator(".qk-image-view img").first
        opened = lambda: view.count() > 0 and view.is_visible() and "in sequence" in text_of(info)  # noqa: E731
        assert click_until(page, plot, opened)
        page.wait_for_timeout(1500)
        clicked = re.search(r"\((query|key), position (\d+) of \d+\) in sequence (\d+)", text_of(info))
        kind, pos, seq_id = clicked.group(1), int(clicked.group(2)), int(clicked.group(3))
        shot(page, "images-05-clicked", plot)
        shown = pixels(shot(page, "images-06-arrows-and-cls", view))

        # the page shows exactly the picture drawn from the store for this click
        source = view.get_attribute("src")
        png = base64.b64decode(source.split(",", 1)[1])
        picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)
        attention = data.attention(seq_id, 1, 0)
        weights = attention[pos] if kind == "query" else attention[:, pos]
        patch = pos - layout.prefix if pos >= layout.prefix else None
        expected = image_heatmap(data.image(seq_id), weights, layout.grid, layout.prefix, patch, kind=kind)
        assert np.array_equal(picture, np.asarray(Image.open(io.BytesIO(expected)).convert("RGB"), dtype=int))
        # arrows over the image and the [CLS] pie in the strip below it, in the clicked kind's colour
        colour = QUERY_COLOUR if kind == "query" else KEY_COLOUR
        side = picture.shape[0] - image_arrows.strip_height(picture.shape[0])
        share = image_arrows.prefix_share(weights, layout.prefix)
        assert share == pytest.approx(attention[pos, 0] if kind == "query" else attention[0, pos])
        assert colour_count(picture[:side], colour, 20) > 20
        assert share < 0.005 or colour_count(picture[side:], colour, 20) > 0
        assert shown.shape[0] > 200
        assert not [e for e in errors if "error" in e.lower() or "undefined" in e.lower()], errors
    finally:
        stop(process)
