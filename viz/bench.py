"""`qkatlas bench serve`: the dashboard's server-side cost, against raw datashader, in one process.

1. Re-rasterizing one head on zoom/pan: `HeadRaster.element` (the exact call the single-head
   view makes: count_cat + shade + dynspread + hv.RGB) vs raw datashader (`Canvas.points` +
   `shade`) on the same synthetic points and the same sequence of view ranges.
2. Memory: the process's RSS growth for one head's points at the largest size.
3. Load: a Panel server on 127.0.0.1 over a synthetic run, N concurrent sessions opened with
   bokeh.client (each runs the whole app: matrix, head raster, similarity); bounded in count
   and time, stops by itself.
"""

from __future__ import annotations

import statistics
import threading
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd

GOAL_RATIO, GOAL_MS = 1.3, 300.0


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


def head_memory(n_points: int) -> float:
    """Memory (MB, as numpy/pandas allocate it, traced) for one head of `n_points` held by the server (coordinates, categories,
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


class SyntheticRun:
    """Just enough of pipeline.store.Run for the dashboard: text tokens, 2 layers x 4 heads,
    synthetic 2-D layouts of `n_tokens` tokens per head."""

    def __init__(self, n_tokens: int = 500_000, seq_len: int = 50, n_layers: int = 2, n_heads: int = 4):
        self.n_tokens, self.n_heads, self.d_head = n_tokens, n_heads, 16
        self.layers, self.n_layers = list(range(n_layers)), n_layers
        self.modality = "text"
        self.manifest = {"model": {"id": "synthetic", "modality": "text"}, "config": {"data": "synthetic"}}
        self.dir = SimpleNamespace(url="synthetic://bench", exists=lambda *parts: False)
        n_seq = n_tokens // seq_len
        pos = np.tile(np.arange(seq_len), n_seq)
        words = np.array(["the", "cat", "sat", "on", "a", "mat", ",", "."])
        self._tokens = pd.DataFrame({"seq_id": np.repeat(np.arange(n_seq), seq_len), "pos": pos.astype(np.int32),
                                     "token_id": (pos % 8).astype(np.int32), "token": words[pos % 8],
                                     "seq_len": np.full(len(pos), seq_len, np.int32),
                                     "pos_norm": (pos / (seq_len - 1)).astype(np.float32),
                                     "is_special": pos == 0, "is_punct": pos % 8 >= 6})
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

    def attention(self, seq_id, layer, head):
        n = int(self._sequences["n_tokens"].iloc[0])
        logits = np.random.default_rng(seq_id * 31 + layer * 7 + head).normal(size=(n, n))
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True)


def load_test(sessions: int, n_tokens: int, time_limit: float = 180.0) -> dict:
    """`sessions` concurrent sessions against a loopback server; each opens the whole app."""
    import socket

    import panel as pn
    from bokeh.client import pull_session

    from viz.data import shared_run_data
    from viz.views import app

    run = SyntheticRun(n_tokens)
    shared_run_data(run).head_similarity()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = pn.serve({"/": lambda: app(run)}, port=port, address="127.0.0.1", show=False,
                      threaded=True, websocket_origin=[f"127.0.0.1:{port}", f"localhost:{port}"])  # starts a thread
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 30
    import urllib.request

    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=10).read()
            break
        except OSError:
            time.sleep(0.3)
    latencies, errors = [], []
    lock = threading.Lock()

    def one_session():
        began = time.perf_counter()
        try:
            with pull_session(url=url) as session:
                if not session.document.roots:
                    raise RuntimeError("empty document")
            with lock:
                latencies.append(time.perf_counter() - began)
        except Exception as error:  # counted and reported, never hidden
            with lock:
                errors.append(f"{type(error).__name__}: {error}")

    began = time.perf_counter()
    threads = [threading.Thread(target=one_session, daemon=True) for _ in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(time_limit - (time.perf_counter() - began), 0.1))
    unfinished = sum(thread.is_alive() for thread in threads)
    elapsed = time.perf_counter() - began
    server.stop()
    return {"sessions": sessions, "ok": len(latencies), "errors": errors, "unfinished": unfinished,
            "seconds": elapsed, "p50": statistics.median(latencies) if latencies else float("nan"),
            "max": max(latencies) if latencies else float("nan")}


def bench_serve(points: list[int], repeats: int, sessions: int, width: int, height: int) -> None:
    import os

    import psutil

    from workflows.progress import console

    console.print(f"[bold]qkatlas bench serve[/]: {os.cpu_count()} CPUs, raster {width}x{height}, "
                  f"median of {repeats} views (full and zoomed, interleaved)")
    console.print(f"{'points':>12} {'raw datashader':>15} {'qkatlas view':>13} {'ratio':>6}   goal")
    for n in points:
        result = time_rasterize(n, repeats, width, height)
        ok = result["ratio"] <= GOAL_RATIO and (n < 10_000_000 or result["qkatlas_ms"] < GOAL_MS)
        console.print(f"{result['points']:>12,} {result['raw_ms']:>12.1f} ms {result['qkatlas_ms']:>10.1f} ms "
                      f"{result['ratio']:>6.2f}   {'met' if ok else 'MISSED'} (ratio <= {GOAL_RATIO}"
                      f"{f', < {GOAL_MS:.0f} ms' if n >= 10_000_000 else ''})")
    largest = max(points)
    console.print(f"memory: one head of {largest:,} points holds {head_memory(largest):,.0f} MB in the server "
                  f"(RSS now {psutil.Process().memory_info().rss / 2**20:,.0f} MB)")
    result = load_test(sessions, n_tokens=500_000)
    console.print(f"load: {result['sessions']} concurrent sessions on 127.0.0.1 (synthetic run, 1 M points per head): "
                  f"{result['ok']} ok, {len(result['errors'])} errors, {result['unfinished']} unfinished in "
                  f"{result['seconds']:.1f} s; session open p50 {result['p50']:.2f} s, max {result['max']:.2f} s; "
                  f"server RSS {psutil.Process().memory_info().rss / 2**20:,.0f} MB")
    for error in result["errors"][:5]:
        console.print(f"  [red]error:[/] {error}")
