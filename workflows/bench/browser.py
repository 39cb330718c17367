"""`qkatlas bench browser`: the dashboard's interactions at corpus scale, driven in Chromium.

A server process (`make_server`) over a synthetic run of N points per head (`workflows.bench.serve.SyntheticRun`,
its layouts written once to .npy files and memory-mapped, as a store's arrays would be read) or
over a real run, is driven by Playwright in Debian's Chromium, as tests/test_browser*.py do:
opening a head, changing the colour mode, zooming, zooming in until token labels appear, searching,
hovering, clicking (the sequence view and the attention lines) and the semantic zoom from the
matrix into a head. Each
interaction's latency is measured server-side: the server process records (`install_timing`)
when each Bokeh message arrives, when each reply frame is written out and when each view
callback starts and ends, and an interaction counts from its first message to the end of its
last reply or callback (browser rendering is not counted). Opening a
head is a page load that opens on it: the HTTP GET that builds the session plus the pull of its
document. The server's resident memory is read before any session, with one session on the
head and with 20.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

CHROMIUM = os.environ.get("QKATLAS_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-quic", "--disable-sync"]
GOALS = {"open head": 2.0, "colour": 0.3, "zoom": 0.3, "labels": 0.3, "search": 0.3, "hover": 0.15, "click": 0.15,
         "semantic zoom": 0.3}
LABELS = """() => {
  for (const doc of window.Bokeh.documents)
    for (const model of doc.all_models)
      if (model.name === 'qk-token-labels' && model.visible) return (model.data_source.data.text || []).length;
  return 0;
}"""
# what the matrix's wheel handler sends once zoomed past the threshold (`viz.matrix_view.SEMANTIC_ZOOM_JS`)
SEMANTIC_ZOOM = """([x, y]) => {
  for (const doc of window.Bokeh.documents)
    for (const model of doc.all_models)
      if (model.name === 'qk-matrix-zoom') { model.data = {x: [x], y: [y]}; return true; }
  return false;
}"""
QUIET = 0.6  # seconds without a reply after which an interaction is over


# --- the server side ------------------------------------------------------------------------


def install_timing(path: str) -> None:
    """Append one JSON line to `path` per Bokeh message handled (kind "in": arrival and end of
    its handling), per reply frame written to a socket (kind "out") and per page GET (kind "get")."""
    from bokeh.server.protocol_handler import ProtocolHandler
    from bokeh.server.views.ws import WSHandler
    from panel.io.server import DocHandler

    handle, lock = open(path, "a", buffering=1), threading.Lock()

    def record(**event) -> None:
        with lock:
            handle.write(json.dumps(event) + "\n")

    handle_message, write, get = ProtocolHandler.handle, WSHandler.write_message, DocHandler.get

    async def timed_handle(self, message, connection):
        began = time.time()
        try:
            return await handle_message(self, message, connection)
        finally:
            record(kind="in", type=message.msgtype, t=began, done=time.time())

    async def timed_write(self, message, binary=False, locked=True):  # every reply; Panel writes some directly
        result = await write(self, message, binary, locked)
        record(kind="out", t=time.time())
        return result

    async def timed_get(self, *args, **kwargs):
        began = time.time()
        try:
            return await get(self, *args, **kwargs)
        finally:
            record(kind="get", t=began, done=time.time())

    ProtocolHandler.handle, WSHandler.write_message, DocHandler.get = timed_handle, timed_write, timed_get
    time_view_callbacks(record)


def time_view_callbacks(record) -> None:
    """Record a "span" (start, end) for each call of the callbacks that answer an interaction:
    the replies HoloViews builds from stream events do not all pass through Bokeh's socket path
    while a callback runs, so the callbacks themselves are timed too."""
    import functools

    from viz.head_view import HeadView
    from viz.state import DashboardState

    def timed(cls, name):
        original = getattr(cls, name)

        @functools.wraps(original)  # keeps param.depends' record on the function
        def wrapper(*args, **kwargs):
            began = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                record(kind="span", name=name, t=began, done=time.time())
        setattr(cls, name, wrapper)

    for name in ("load", "_raster_element", "_region_labels", "_token_labels", "_marks", "_on_pointer", "_on_tap",
                 "_on_select", "_veil", "_hover_mark"):
        timed(HeadView, name)
    for name in ("_find", "_forget_clicks"):
        timed(DashboardState, name)
    from bokeh.document.models import DocumentModelManager
    from holoviews.plotting.plot import Plot

    timed(Plot, "refresh")  # HoloViews redrawing a plot after a stream event, outside the view callbacks
    timed(DocumentModelManager, "recompute")


class MappedSyntheticRun:
    """`workflows.bench.serve.SyntheticRun` whose layouts are .npy files in `folder`, memory-mapped on read."""

    def __new__(cls, n_tokens: int, folder: str):
        from workflows.bench.serve import SyntheticRun, synthetic_coords

        run = SyntheticRun(n_tokens)
        for layer in run.layers:
            for head in range(run.n_heads):
                path = Path(folder) / f"L{layer}H{head}-{n_tokens}.npy"
                if not path.exists():
                    np.save(path, synthetic_coords(2 * n_tokens, seed=layer * 100 + head))
        run.projection = lambda method, layer, head, dim=2: np.load(Path(folder) / f"L{layer}H{head}-{n_tokens}.npy",
                                                                    mmap_mode="r")
        return run


def serve(port: int, source: str, timings: str) -> None:
    """Serve `source` (a run's path, or "synthetic:N_TOKENS:FOLDER") on 127.0.0.1:`port` until killed."""
    from pipeline.store import open_run
    from viz.data import shared_run_data
    from viz.server import make_server

    install_timing(timings)
    if source.startswith("synthetic:"):
        _, n_tokens, folder = source.split(":", 2)
        run = MappedSyntheticRun(int(n_tokens), folder)
    else:
        run = open_run(source)
    from viz.server import warm_up

    warm_up(shared_run_data(run))  # what a server builds at start, here before the first page, not beside it
    server = make_server(run, port=port, warm=False)
    print("ready", flush=True)
    server.start()
    server.io_loop.start()


# --- the browser side -----------------------------------------------------------------------


class Timings:
    """The server's timing lines, read as they are written."""

    def __init__(self, path: str):
        self.path, self.events, self._offset = path, [], 0

    def read(self) -> list[dict]:
        with open(self.path) as handle:
            handle.seek(self._offset)
            text = handle.read()
        complete = text[:text.rfind("\n") + 1]
        self._offset += len(complete.encode())
        self.events += [json.loads(line) for line in complete.splitlines() if line]
        return self.events

    def settle(self, since: float, timeout: float = 30.0) -> tuple[float, float] | None:
        """(span, busy) of the interaction begun after `since`: seconds from the first message
        that arrived to the last reply written before the server went quiet, and of those the
        seconds the server was working (handling a message or running a callback or a plot
        refresh), not waiting for the browser's next message; None if nothing was answered
        within `timeout`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            time.sleep(0.1)
            events = [e for e in self.read() if e["t"] >= since]
            first = min((e["t"] for e in events if e["kind"] == "in" and e["type"] == "PATCH-DOC"), default=None)
            ends = [e.get("done", e["t"]) for e in events if e["kind"] in ("out", "span") and first is not None
                    and e["t"] >= first]
            last = max([e.get("done", e["t"]) for e in events], default=since)
            if ends and time.time() - last > QUIET:
                work = sorted((e["t"], e["done"]) for e in events if e["kind"] in ("in", "span") and e["t"] >= first)
                return max(ends) - first, _covered(work)
        return None

    def page(self, since: float) -> float:
        """Seconds the server spent on a page load after `since`: its GET and its document pull."""
        events = [e for e in self.read() if e["t"] >= since]
        get = sum(e["done"] - e["t"] for e in events if e["kind"] == "get")
        pull = sum(e["done"] - e["t"] for e in events if e["kind"] == "in" and e["type"] == "PULL-DOC-REQ")
        return get + pull


class Server:
    def __init__(self, source: str, workdir: Path):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.timings_path = str(workdir / f"timings-{self.port}.jsonl")
        Path(self.timings_path).write_text("")
        self.process = subprocess.Popen([sys.executable, "-m", "workflows.bench.browser", str(self.port), source,
                                         self.timings_path], env=dict(os.environ, OMP_NUM_THREADS="1"),
                                        stdout=subprocess.PIPE, text=True,
                                        stderr=open(workdir / f"server-{self.port}.log", "w"))
        for line in self.process.stdout:
            if line.startswith("ready"):
                break
        else:
            raise RuntimeError(f"the bench server for {source} exited before it was ready")
        self.timings = Timings(self.timings_path)

    def url(self, query: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{query}"

    def rss(self) -> float:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(30)


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of sorted (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in intervals:
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def percentiles(values: list[float]) -> tuple[float, float, int]:
    from workflows.bench.serve import percentile

    values = [v for v in values if v is not None]
    return (percentile(values, 0.5), percentile(values, 0.95), len(values)) if values else (float("nan"),) * 2 + (0,)


def _select(page, has_text: str):
    return page.locator("select").filter(has_text=has_text).first


def drive(server: Server, page, head_query: str, heads: list[str], words: list[str], colours: list[str],
          repeats: int) -> dict[str, list[tuple]]:
    """Every interaction `repeats` times in one browser page; server-side (span, busy) seconds of each."""
    rng = np.random.default_rng(0)
    seconds: dict[str, list[tuple]] = {name: [] for name in GOALS}  # (span, busy) per repeat

    def timed(name: str, action) -> None:
        since = time.time()
        action()
        seconds[name].append(server.timings.settle(since) or (None, None))

    for query in heads[:repeats] if len(heads) > 1 else [head_query] * repeats:
        since = time.time()
        page.goto(server.url(query), wait_until="networkidle", timeout=300_000)
        page.locator(".qk-head-plot").first.wait_for(state="visible", timeout=300_000)
        page.wait_for_timeout(int(QUIET * 1000) + 200)
        seconds["open head"].append((server.timings.page(since),) * 2)
    plot = page.locator(".qk-head-plot").first
    box = plot.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for i in range(repeats):
        timed("colour", lambda i=i: _select(page, "token length").select_option(colours[i % len(colours)]))
    for i in range(repeats):
        page.mouse.move(cx + rng.uniform(-100, 100), cy + rng.uniform(-100, 100))
        server.timings.settle(time.time(), timeout=2)
        timed("zoom", lambda i=i: page.mouse.wheel(0, -200 if i % 2 == 0 else 200))
    for _ in range(repeats):  # zoomed in until few points are in view: each gets its token
        page.locator(".qk-reset-zoom button").first.click()
        server.timings.settle(time.time(), timeout=10)
        page.mouse.move(cx + rng.uniform(-60, 60), cy + rng.uniform(-60, 60))
        for _ in range(16):  # 0.8 of the range a step, far enough that labels are a few steps away
            page.mouse.wheel(0, -120)
        server.timings.settle(time.time(), timeout=10)
        for _ in range(10):  # the zoom in which they appear is the one timed
            timed("labels", lambda: [page.mouse.wheel(0, -120) for _ in range(3)])
            if page.evaluate(LABELS) > 0:
                break
            seconds["labels"].pop()
    page.locator(".qk-reset-zoom button").first.click()
    server.timings.settle(time.time(), timeout=10)
    search = page.locator("input[placeholder='a token, or re:regex']").first
    for i in range(repeats):
        timed("search", lambda i=i: (search.fill(words[i % len(words)]), search.press("Enter")))
    timed("search", lambda: (search.fill(""), search.press("Enter")))
    seconds["search"].pop()
    for _ in range(repeats):
        x, y = cx + rng.uniform(-150, 150), cy + rng.uniform(-150, 150)
        timed("hover", lambda x=x, y=y: page.mouse.move(x, y))
    for _ in range(repeats):
        x, y = cx + rng.uniform(-150, 150), cy + rng.uniform(-150, 150)
        page.mouse.move(x, y)
        server.timings.settle(time.time(), timeout=2)
        timed("click", lambda x=x, y=y: page.mouse.click(x, y))
    matrix = page.locator(".qk-matrix").first
    for i in range(repeats):  # the matrix zoomed into a head: the request its wheel handler sends, answered
        page.locator(".qk-all-heads button").first.click()
        matrix.wait_for(state="visible", timeout=300_000)
        server.timings.settle(time.time(), timeout=5)  # the matrix is drawn by now: a quiet moment
        cell = (i % 4 + 0.5, (i // 4) % 2 + 0.5)
        timed("semantic zoom", lambda cell=cell: page.evaluate(SEMANTIC_ZOOM, list(cell)))
    return seconds


def memory(server: Server, head_query: str, sessions: int) -> dict[str, float]:
    """The server's RSS (MB) before any session, with one session on the head and with `sessions`
    (page loads that build each session's whole dashboard; Bokeh keeps them for 15 s)."""
    before, since = server.rss(), time.time()
    urllib.request.urlopen(server.url(head_query), timeout=600).read()
    one, first_open = server.rss(), server.timings.page(since)
    for _ in range(sessions - 1):
        urllib.request.urlopen(server.url(head_query), timeout=600).read()
    many = server.rss()
    return {"before": before, "one": one, "many": many, "per_session": (many - one) / max(sessions - 1, 1),
            "first_open": first_open}


def bench_case(name: str, source: str, head_query: str, heads: list[str], words: list[str], repeats: int,
               sessions: int, workdir: Path, browser, say) -> None:
    server = Server(source, workdir)
    try:
        rss = memory(server, head_query, sessions)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        seconds = drive(server, page, head_query, heads, words, ["position", "query / key", "position mod 5",
                                                                  "token length"], repeats)
        page.close()
    finally:
        server.stop()
    say(f"[bold]{name}[/]: the server's first page on the head (reads it, builds its shared frames) "
        f"{rss['first_open']:.2f} s")
    say("  (busy: the server's own work on the interaction; span: from its first message to its last reply,\n"
        "   including waits for the browser's next message; the goal is judged on busy)")
    for interaction, goal in GOALS.items():
        span50, span95, _ = percentiles([span for span, _ in seconds[interaction]])
        p50, p95, n = percentiles([busy for _, busy in seconds[interaction]])
        say(f"  {interaction:<13} busy p50 {p50 * 1000:>6.0f} ms  p95 {p95 * 1000:>6.0f} ms   span p50 "
            f"{span50 * 1000:>6.0f} p95 {span95 * 1000:>6.0f} ms  (n={n})  goal p95 <= {goal * 1000:.0f} ms: "
            f"{'met' if p95 <= goal else 'MISSED'}")
    say(f"  RSS: {rss['before']:,.0f} MB before any session; {rss['one']:,.0f} MB with 1 session on the head "
        f"(+{rss['one'] - rss['before']:,.0f} MB: the head and one session); {rss['many']:,.0f} MB with {sessions} "
        f"(+{rss['per_session']:,.1f} MB a session)")


def bench_browser(points: list[int], real_run: str | None = None, real_head: tuple[str, int, int] = ("pca", 2, 3),
                  words: list[str] | None = None, repeats: int = 8, sessions: int = 20,
                  workdir: str | None = None) -> None:
    """Latency p50/p95 of each interaction and the server's RSS, for synthetic heads of each of
    `points` and for `real_run`'s head (method, layer, head) when given."""
    import functools
    import tempfile

    from playwright.sync_api import sync_playwright
    from rich.console import Console

    say = functools.partial(Console(stderr=True).print, soft_wrap=True, highlight=False)
    folder = Path(workdir or tempfile.mkdtemp(prefix="qkatlas-browser-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    say(f"[bold]qkatlas bench browser[/]: {os.cpu_count()} CPUs; server-side seconds per interaction, "
        f"{repeats} of each; RSS with 1 and {sessions} sessions")
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=ARGS)
        try:
            for n in points:
                heads = [f"?layer={layer}&head={head}" for layer in (0, 1) for head in range(4)]
                bench_case(f"synthetic head, {n:,} points", f"synthetic:{n // 2}:{folder}", heads[0], heads,
                           words or ["the", "attentions", "café", "at*", "re:t.*"], repeats, sessions, folder,
                           browser, say)
            if real_run:
                method, layer, head = real_head
                query = f"?method={method}&layer={layer}&head={head}"
                bench_case(f"{real_run} layer {layer} head {head} ({method})", real_run, query, [query],
                           words or ["the", "of", "un*", "and", "re:[0-9]+"], repeats, sessions, folder, browser, say)
        finally:
            browser.close()


if __name__ == "__main__":  # python -m workflows.bench.browser PORT SOURCE TIMINGS: the benchmark's server
    serve(int(sys.argv[1]), sys.argv[2], sys.argv[3])
