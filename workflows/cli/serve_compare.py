"""`qkatlas serve-compare`: the compare view over a group of runs."""

from __future__ import annotations

import typer

from workflows.cli.app import app
from workflows.progress import console


@app.command("serve-compare")
def serve_compare(
    group: str = typer.Argument(..., help="group directory made by `qkatlas compare-run`"),
    port: int = typer.Option(5007, help="port to listen on"),
    address: str = typer.Option("127.0.0.1", help="address to bind (loopback unless you mean to expose it)"),
) -> None:
    """Serve the compare view: two members side by side on one head (linked search and selection),
    a slider over the members that animates a head's aligned layout, and head measurements as
    trajectories over training steps."""
    from viz.compare_view import make_compare_server  # panel, bokeh: imported when used
    from viz.server import exposure_warnings

    server = make_compare_server(group, port=port, address=address)
    for warning in exposure_warnings(address, auth=False, tls=False):
        console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True, highlight=False)
    console.print(f"[bold green]serving[/] {group} at http://{address}:{port}/  (Ctrl+C stops)", highlight=False)
    server.start()
    try:
        server.io_loop.start()
    except KeyboardInterrupt:
        server.stop()
