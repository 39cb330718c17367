"""Serving the dashboard: loopback by default, Panel's basic auth when exposed.

The run is fixed when the server starts; a URL can only choose among the run's own heads,
methods and colour modes (viz.data.url_state), never a path."""

from __future__ import annotations

import ipaddress
import secrets
import threading

LOOPBACK = "127.0.0.1"


class ServeError(ValueError):
    """A run that cannot be served (no projections, not a run) or a bad option."""


def is_loopback(address: str) -> bool:
    if address in ("localhost", ""):
        return address == "localhost"
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_run(run_url: str):
    """Open the run and check it has something to show; errors say which command to run."""
    from pipeline.store import StoreError, open_run

    try:
        run = open_run(run_url)
    except (StoreError, FileNotFoundError) as error:
        raise ServeError(str(error)) from None
    if run.projections().empty:
        raise ServeError(f"{run_url} has no projections yet; run: qkatlas reduce {run_url} --method umap,pca")
    return run


def make_server(run_url: str, port: int = 5006, address: str = LOOPBACK, basic_auth: str | None = None,
                show: bool = False, threaded: bool = False, warm: bool = True):
    """A Panel server for the run (not started). `basic_auth`: a password, or a JSON file of
    user -> password, as Panel's `basic_auth`."""
    import panel as pn

    from viz.data import shared_run_data
    from viz.views import app

    run = check_run(run_url)
    data = shared_run_data(run)
    if warm:  # head similarity for the matrix view's ranking, computed once in the background
        threading.Thread(target=data.head_similarity, daemon=True, name="qkatlas-similarity").start()
    origins = [f"{address}:{port}"] + ([f"localhost:{port}", f"127.0.0.1:{port}"] if is_loopback(address) else [])
    extra = {}
    if basic_auth:
        extra = {"basic_auth": basic_auth, "cookie_secret": secrets.token_hex(32)}
    return pn.serve({"/": lambda: app(run)}, port=port, address=address, websocket_origin=origins, show=show,
                    start=False, threaded=threaded, title="qkatlas", **extra)
