"""`qkatlas bench serve`: the dashboard's server-side cost, against raw datashader, in one process.

1. Re-rasterizing one head on zoom/pan: `HeadRaster.element` (the exact call the single-head
   view makes: count_cat + shade + dynspread + hv.RGB) vs raw datashader (`Canvas.points` +
   `shade`) on the same synthetic points and the same sequence of view ranges.
2. Memory: the process's RSS growth for one head's points at the largest size.
3. Load: a server process on 127.0.0.1 over a synthetic run: N concurrent page loads (each
   builds a session and its first tab, the matrix), then a page load while another
   session runs a pathological regex search; the serving path before issue 9 (Python's regex
   on the event loop) is measured in the same run as the baseline. Bounded in time.
"""

from __future__ import annotations

import statistics
import threading
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd

GOAL_RATIO, GOAL_MS = 1.3, 300.0
GOAL_OPEN_P95, GOAL_PAGE_DURING_SEARCH = 3.0, 2.0  # seconds, 20 sessions on 2 cores


def synthetic_coords(n_points: int, seed: int = 0) -> np.ndarray:
    """[n_points, 2] float32: queries and keys in a few dozen gaussian clusters, like a layout."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (40, 2)).astype(np.float32)
    labels = rng.integers(0, len(centres), n_points)
    return (centres[labels] + rng.normal(0, 1, (n_points, 2)).astype(np.float32)).astype(np.float32)


def _ranges(coords: np.ndarray, repeats: int, seed: int = 1):
    """Alternating full views and zoomed-in views (what zooming and panning ask for)."""
    from viz.raster import full_range

    (x0, x1), (y0, y1) = full_range(coords)
    rng = np.random.default_rng(seed)
    views = []
    for i in range(repeats):
        if i % 2 == 0:
            views.append(((x0, x1), (y0, y1)))
        else:
            w, h = (x1 - x0) * rng.uniform(0.1, 0.5), (y1 - y0) * rng.uniform(0.1, 0.5)
            cx, cy = rng.uniform(x0 + w / 2, x1 - w / 2), rng.uniform(y0 + h / 2, y1 - h / 2)
            views.append(((cx - w / 2, cx + w / 2), (cy - h / 2, cy + h / 2)))
    return views


def time_rasterize(n_points: int, repeats: int, width: int, height: int) -> dict:
    import datashader as ds
    import datashader.transfer_functions as tf

    from viz.data import colouring
    from viz.raster import HeadRaster

    coords = synthetic_coords(n_points)
    n_tokens = n_points // 2
    tokens = pd.DataFrame({"pos_norm": np.zeros(n_tokens, np.float32)})
    raster = HeadRaster(coords[:2 * n_tokens], colouring("query / key", tokens))
    frame, key = raster.frame, raster.colouring.colour_key

    def raw(x_range, y_range):
        canvas = ds.Canvas(plot_width=width, plot_height=height, x_range=x_range, y_range=y_range)
        return tf.shade(canvas.points(frame, "x", "y", agg=ds.count_cat("c")), color_key=key, how="eq_hist",
                        min_alpha=80)

    def ours(x_range, y_range):
        return raster.element(x_range, y_range, width, height)

    views = _ranges(coords, repeats)
    raw(*views[0]), ours(*views[0])  # warm-up: numba compilation, first allocation
    timings = {"raw": [], "qkatlas": []}
    for view in views:  # interleaved, same ranges, so drift hits both alike
        for name, function in (("raw", raw), ("qkatlas", ours)):
            began = time.perf_counter()
            function(*view)
            timings[name].append((time.perf_counter() - began) * 1000)
    raw_ms, ours_ms = statistics.median(timings["raw"]), statistics.median(timings["qkatlas"])
    return {"points": len(frame), "raw_ms": raw_ms, "qkatlas_ms": ours_ms, "ratio": ours_ms / raw_ms}


def _median_element_ms(rasters: dict, views: list, width: int, height: int) -> dict[str, float]:
    """Median ms of each raster's `element` over `views`, interleaved so that drift hits all
    alike, after one warm-up view each."""
    for raster in rasters.values():
        raster.element(*views[0], width, height)
    timings: dict[str, list[float]] = {name: [] for name in rasters}
    for view in views:
        for name, raster in rasters.items():
            began = time.perf_counter()
            raster.element(*view, width, height)
            timings[name].append((time.perf_counter() - began) * 1000)
    return {name: statistics.median(values) for name, values in timings.items()}


def time_emphasis(n_points: int, repeats: int, width: int, height: int, share: float = 1 / 11) -> dict:
    """A search's view (`StyledRaster` with hits: the rest faded, hits enlarged and outlined) vs
    the same view without hits, in a 2- and a 16-category mode; the hits are `share` of the points
    (1/11: a common word of the synthetic run). Median ms of each, and their ratio, per mode."""
    from viz.data import colouring
    from viz.emphasis import StyledRaster
    from viz.raster import head_points, point_frame

    coords = synthetic_coords(2 * (n_points // 2))
    tokens = pd.DataFrame({"pos_norm": np.linspace(0, 1, n_points // 2, dtype=np.float32)})
    points = head_points(coords)
    hits = np.flatnonzero(np.random.default_rng(2).random(len(coords)) < share)
    views = _ranges(coords, repeats)
    result = {}
    for mode in ("query / key", "position"):
        scheme = colouring(mode, tokens)
        frame = point_frame(coords, scheme, points)
        rasters = {"plain": StyledRaster(coords, scheme, points=points, frame=frame),
                   "search": StyledRaster(coords, scheme, hits=hits, points=points, frame=frame)}
        medians = _median_element_ms(rasters, views, width, height)
        plain, search = medians["plain"], medians["search"]
        result[mode] = {"categories": len(scheme.colours), "hits": len(hits), "plain_ms": plain,
                        "search_ms": search, "ratio": search / plain}
    return result


def gpu_unavailable() -> str | None:
    """Why the GPU row cannot run here (no CuPy or CUDA device, or no cuDF), or None."""
    from pipeline.arrays import cupy_backend

    reason = cupy_backend.available()
    if reason is None and cupy_backend.frame_module().__name__ != "cudf":
        reason = "cuDF does not import (pip install 'qkatlas[gpu]')"
    return reason


def time_backends(n_points: int, repeats: int, width: int, height: int) -> dict:
    """The head view's raster (`HeadRaster.element`) with its frames in pandas (datashader
    aggregates on the CPU) and in cuDF (on the GPU), same points, same views, interleaved; and
    whether every view's count aggregate is identical on both."""
    import datashader as ds

    from viz.data import colouring
    from viz.raster import HeadRaster, aggregate, head_points, point_frame

    coords = synthetic_coords(2 * (n_points // 2))
    tokens = pd.DataFrame({"pos_norm": np.linspace(0, 1, n_points // 2, dtype=np.float32)})
    mode = colouring("position", tokens)  # 16 categories: the costliest aggregation of the text modes
    rasters = {}
    for name in ("cpu", "gpu"):
        points = head_points(coords, name)
        rasters[name] = HeadRaster(coords, mode, points=points, frame=point_frame(coords, mode, points, name))
    views = _ranges(coords, repeats)
    identical = True
    for x_range, y_range in views:
        canvas = ds.Canvas(plot_width=width, plot_height=height, x_range=x_range, y_range=y_range)
        counts = [aggregate(canvas, rasters[name].frame, ds.count_cat("c")).data for name in ("cpu", "gpu")]
        identical &= bool(np.array_equal(*counts))
    medians = _median_element_ms(rasters, views, width, height)  # each ends on the host: the GPU's work is done
    return {"points": len(rasters["cpu"].frame), "cpu_ms": medians["cpu"], "gpu_ms": medians["gpu"],
            "identical": identical}


def head_memory(n_points: int) -> float:
    """Memory (MB, as numpy/pandas allocate it, traced) for one head of `n_points` held by the server
    (coordinates, categories,
    the lazily built hover index)."""
    import tracemalloc

    from viz.data import colouring
    from viz.raster import HeadRaster

    tracemalloc.start()
    coords = synthetic_coords(n_points)
    tokens = pd.DataFrame({"pos_norm": np.zeros(n_points // 2, np.float32)})
    raster = HeadRaster(coords, colouring("query / key", tokens))
    raster.element(None, None, 700, 600)
    raster.index_raster(None, None, 700, 600)
    held, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del raster, coords
    return held / 2**20


# --- a synthetic run, for the load test --------------------------------------------------

# Words of ten letters and more make Python's backtracking regex engine slow on `((\w+)+)+!`
# (about 14 ms a token at ten letters, growing fourfold per two letters), and a non-ASCII token
# makes pandas use that engine for `\w` rather than pyarrow's RE2, as in real corpora.
SYNTHETIC_WORDS = ["the", "cat", "sat", "on", "a", "mat", ",", ".", "attentions", "transformer", "café"]
PATHOLOGICAL = r"re:((\w+)+)+!"


class SyntheticRun:
    """Just enough of pipeline.store.Run for the dashboard: text tokens, 2 layers x 4 heads,
    synthetic 2-D layouts of `n_tokens` tokens per head."""

    def __init__(self, n_tokens: int = 500_000, seq_len: int = 50, n_layers: int = 2, n_heads: int = 4,
                 words: list[str] = SYNTHETIC_WORDS):
        self.n_tokens, self.n_heads, self.d_head = n_tokens, n_heads, 16
        self.layers, self.n_layers = list(range(n_layers)), n_layers
        self.modality, self.model_id, self.has_values = "text", "synthetic", False
        self.manifest = SimpleNamespace(model=SimpleNamespace(id="synthetic", modality="text", patch_grid=None),
                                        config=SimpleNamespace(data="synthetic"))
        self.dir = SimpleNamespace(url="synthetic://bench", exists=lambda *parts: False)
        n_seq = n_tokens // seq_len
        pos = np.tile(np.arange(seq_len), n_seq)
        word_of = (pos * 7 + np.repeat(np.arange(n_seq), seq_len)) % len(words)
        vocabulary = np.array(words, dtype=object)
        self._tokens = pd.DataFrame({"seq_id": np.repeat(np.arange(n_seq), seq_len), "pos": pos.astype(np.int32),
                                     "token_id": word_of.astype(np.int32), "token": vocabulary[word_of],
                                     "seq_len": np.full(len(pos), seq_len, np.int32),
                                     "pos_norm": (pos / (seq_len - 1)).astype(np.float32),
                                     "is_special": pos == 0, "is_punct": np.isin(vocabulary[word_of], [",", "."])})
        self._sequences = pd.DataFrame({"seq_id": np.arange(n_seq), "n_tokens": seq_len,
                                        "token_offset": np.arange(n_seq) * seq_len, "text": "synthetic"})
        self._coords = {}

    def tokens(self):
        return self._tokens.copy()

    def sequences(self):
        return self._sequences.copy()

    def projections(self):
        return pd.DataFrame([{"method": "umap", "dim": 2, "layer": layer, "head": head} for layer in self.layers
                             for head in range(self.n_heads)])

    def projection(self, method, layer, head, dim=2):
        key = (layer, head)
        if key not in self._coords:
            self._coords[key] = synthetic_coords(2 * self.n_tokens, seed=layer * 100 + head)
        return self._coords[key]

    def queries(self, layer, head):
        return np.random.default_rng(head).normal(size=(self.n_tokens, self.d_head)).astype(np.float32)

    keys = queries

    def vector(self, kind, layer, head, token):
        return np.random.default_rng((head, token)).normal(size=self.d_head).astype(np.float32)

    def attention(self, seq_id, layer, head, weighting="attention"):
        n = int(self._sequences["n_tokens"].iloc[0])
        logits = np.random.default_rng(seq_id * 31 + layer * 7 + head).normal(size=(n, n))
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True)

    def thumbnail_png(self, method, dim, layer, head):
        return None

    def regions(self, method, dim, layer, head):
        return pd.DataFrame(columns=["scale", "x", "y", "label", "n_points"])

    def head_measurements(self):
        return None

    def head_top_sequences(self):
        return None


# --- the load test: a server process, sessions opened against it ---------------------------


def legacy_search_tokens(tokens: pd.DataFrame, query: str, vocabulary=None) -> np.ndarray:
    """The search before issue 9, kept as the baseline: Python's backtracking regex over every
    token, on the event loop."""
    from viz.data import clean_tokens

    query = (query or "").strip()
    if not query:
        return np.zeros(0, dtype=np.int64)
    cleaned = clean_tokens(tokens["token"]).str.lower()
    if query.startswith("re:"):
        mask = cleaned.str.fullmatch(query[3:], case=False)
    else:
        mask = cleaned == query.lower().lstrip("#")
    return np.flatnonzero(mask.to_numpy())


def serve_synthetic(port: int, n_tokens: int, baseline: bool) -> None:
    """Serve a synthetic run on 127.0.0.1:`port` until killed: the current server (`make_server`),
    or with `baseline` the serving path before issue 9 (no thread pool, the legacy search).
    Prints one JSON line per finished search (wall time, count pane) for the load test."""
    import json

    import panel as pn

    import viz.state
    import viz.views
    from viz.data import shared_run_data
    from viz.server import make_server, warm_up
    from viz.views import app

    run = SyntheticRun(n_tokens)
    warm_up(shared_run_data(run))  # what make_server's warm-up thread builds, built before the first session

    def report(dashboard):  # a search answered: found, counted, every view redrawn
        print(json.dumps({"search_done": time.time(), "count": dashboard.count_pane.object}), flush=True)

    class Reporting(viz.views.Dashboard):
        def __init__(self, data, args=None):
            super().__init__(data, args)
            self.state.param.watch(lambda *_: report(self), ["matches", "search_error"], precedence=10)

    viz.views.Dashboard = Reporting
    if baseline:
        viz.state.search_tokens = legacy_search_tokens
        server = pn.serve({"/": lambda: app(run)}, port=port, address="127.0.0.1", show=False, start=False,
                          websocket_origin=[f"127.0.0.1:{port}", f"localhost:{port}"])
    else:
        server = make_server(run, port=port, warm=False)
    server.start()
    server.io_loop.start()


class BenchServer:
    """`serve_synthetic` in a child process: its URL, and the searches it reports."""

    def __init__(self, n_tokens: int, baseline: bool, timeout: float = 300.0):
        import os
        import socket
        import subprocess
        import sys

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/"
        self.searches: list[dict] = []
        self._reported = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workflows.bench.serve", str(port), str(n_tokens),
             "baseline" if baseline else "current"],
            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.time() + timeout
        while page_load(self.url, 60) == float("inf"):  # the first load also warms imports, numba, caches
            if self.process.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the bench server did not start within {timeout:.0f} s")
            time.sleep(0.5)

    def _read(self) -> None:
        import json

        for line in self.process.stdout:
            if line.startswith("{"):
                with self._reported:
                    self.searches.append(json.loads(line))
                    self._reported.notify_all()

    def search_answer(self, sent: float, timeout: float) -> tuple[float, str]:
        """(seconds from `sent` (wall time) until the server finished a search sent then, its
        count pane); (inf, "") past `timeout`."""
        deadline = sent + timeout
        with self._reported:
            while True:
                done = [search for search in self.searches if search["search_done"] >= sent]
                if done:
                    return done[0]["search_done"] - sent, done[0]["count"]
                if time.time() >= deadline:
                    return float("inf"), ""
                self._reported.wait(deadline - time.time())

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(30)


def page_load(url: str, timeout: float) -> float:
    """Seconds to GET the dashboard page: the server builds the session's whole dashboard before
    it answers. `inf` past `timeout`."""
    import urllib.request

    began = time.perf_counter()
    try:
        urllib.request.urlopen(url, timeout=timeout).read()
    except OSError:
        return float("inf")
    return time.perf_counter() - began


def open_sessions(url: str, sessions: int, timeout: float) -> list[float]:
    """Each of `sessions` concurrent page loads' seconds (`inf` past `timeout`)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(sessions) as pool:
        return list(pool.map(lambda _: page_load(url, timeout), range(sessions)))


def send_search(url: str, pattern: str):
    """Open a session (bokeh.client) and type `pattern` into its search box. Returns the session
    and the wall time the pattern was sent."""
    import panel as pn
    from bokeh.client import pull_session

    import viz.views  # noqa: F401  (registers the dashboard's model types, so the client can decode them)

    pn.extension("tabulator", "plotly")
    session = pull_session(url=url)
    box = next(model for model in session.document.models
               if getattr(model, "placeholder", None) == "a token, or re:regex")
    sent = time.time()
    box.value = pattern
    session.force_roundtrip()  # sends the change
    return session, sent


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def load_test(sessions: int, n_tokens: int, baseline: bool, timeout: float = 60.0) -> dict:
    """Against one server process: `sessions` concurrent page loads; then, while one session's
    pathological regex search runs, another page load and the search's own answer time."""
    server = BenchServer(n_tokens, baseline)
    try:
        opened = open_sessions(server.url, sessions, timeout)
        session, sent = send_search(server.url, PATHOLOGICAL)
        time.sleep(0.3)  # the server has taken up the search
        during = page_load(server.url, timeout)
        search, _ = server.search_answer(sent, timeout)
        session.close()
    finally:
        server.stop()
    return {"sessions": opened, "p50": percentile(opened, 0.5), "p95": percentile(opened, 0.95), "max": max(opened),
            "page_during_search": during, "search": search}


def _seconds(value: float, timeout: float) -> str:
    return f"> {timeout:.0f} s" if value == float("inf") else f"{value:.2f} s"


def bench_serve(points: list[int], repeats: int, sessions: int, width: int, height: int,
                n_tokens: int = 500_000, timeout: float = 60.0) -> None:
    import functools
    import os

    import psutil

    from rich.console import Console
    from rich.markup import escape

    say = functools.partial(Console(stderr=True).print, soft_wrap=True, highlight=False)
    say(f"[bold]qkatlas bench serve[/]: {os.cpu_count()} CPUs, raster {width}x{height}, "
        f"median of {repeats} views (full and zoomed, interleaved)")
    say(f"{'points':>12} {'raw datashader':>15} {'qkatlas view':>13} {'ratio':>6}   goal")
    for n in points:
        result = time_rasterize(n, repeats, width, height)
        ok = result["ratio"] <= GOAL_RATIO and (n < 10_000_000 or result["qkatlas_ms"] < GOAL_MS)
        say(f"{result['points']:>12,} {result['raw_ms']:>12.1f} ms {result['qkatlas_ms']:>10.1f} ms "
            f"{result['ratio']:>6.2f}   {'met' if ok else 'MISSED'} (ratio <= {GOAL_RATIO}"
            f"{f', < {GOAL_MS:.0f} ms' if n >= 10_000_000 else ''})")
    largest = max(points)
    for mode, result in time_emphasis(largest, repeats, width, height).items():
        say(f"search view, {largest:,} points, {mode} ({result['categories']} categories), {result['hits']:,} hits: "
            f"{result['search_ms']:.1f} ms vs {result['plain_ms']:.1f} ms without hits, x{result['ratio']:.2f}")
    reason = gpu_unavailable()
    if reason is not None:
        say(f"GPU row: not run here: {escape(reason)}")
    for n in points if reason is None else []:
        result = time_backends(n, repeats, width, height)
        say(f"GPU {result['points']:>8,} points, 16-category view: cuDF frame (datashader on the GPU) "
            f"{result['gpu_ms']:.1f} ms vs pandas (CPU) {result['cpu_ms']:.1f} ms, "
            f"x{result['cpu_ms'] / result['gpu_ms']:.1f}; count aggregates identical in every view: "
            f"{'yes' if result['identical'] else 'NO'}")
    say(f"memory: one head of {largest:,} points holds {head_memory(largest):,.0f} MB in the server "
        f"(RSS now {psutil.Process().memory_info().rss / 2**20:,.0f} MB)")
    say(f"load: a server process over a synthetic run of {n_tokens:,} tokens ({2 * n_tokens:,} points per head); "
        f"{sessions} concurrent page loads, then one page load while another session searches {PATHOLOGICAL} "
        f"(each wait capped at {timeout:.0f} s)")
    say(f"{'server':<34} {'open p50':>9} {'p95':>9} {'max':>9} {'page during search':>19} {'search answered':>16}")
    for name, baseline in (("before (search on the event loop)", True), ("after (RE2, thread pool)", False)):
        figures = load_test(sessions, n_tokens, baseline, timeout)
        say(f"{name:<34} {_seconds(figures['p50'], timeout):>9} {_seconds(figures['p95'], timeout):>9} "
            f"{_seconds(figures['max'], timeout):>9} {_seconds(figures['page_during_search'], timeout):>19} "
            f"{_seconds(figures['search'], timeout):>16}")
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    say(f"goals (after): session open p95 <= {GOAL_OPEN_P95:.0f} s: {verdict(figures['p95'] <= GOAL_OPEN_P95)}; "
        f"page load during a search < {GOAL_PAGE_DURING_SEARCH:.0f} s: "
        f"{verdict(figures['page_during_search'] < GOAL_PAGE_DURING_SEARCH)}")


if __name__ == "__main__":  # python -m workflows.bench.serve PORT N_TOKENS baseline|current: the load test's server
    import sys

    serve_synthetic(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "baseline")
