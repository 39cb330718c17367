"""`qkatlas serve`: the dashboard over one run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from workflows.cli.app import app
from workflows.progress import console


@app.command()
def serve(
    run: list[str] = typer.Argument(..., help="runs (directories or URLs, with projections) or folders of runs; "
                                         "several get a run picker, and ?run=NAME picks one by its folder name"),
    port: int = typer.Option(5006, help="port to listen on (1-65535)"),
    address: str = typer.Option("127.0.0.1", help="address to bind; anything but loopback exposes the run"),
    basic_auth: Optional[str] = typer.Option(
        None, "--basic-auth", envvar="QKATLAS_BASIC_AUTH", show_envvar=True,
        help="a JSON file of {user: password}, or a password for --auth-user; prefer the file or the "
             "environment variable (a password on the command line shows in `ps`)"),
    auth_user: str = typer.Option("qkatlas", envvar="QKATLAS_AUTH_USER",
                                  help="user name that goes with a --basic-auth password"),
    tls_cert: Optional[Path] = typer.Option(None, help="PEM certificate: serve HTTPS (with --tls-key)"),
    tls_key: Optional[Path] = typer.Option(None, help="PEM private key of --tls-cert"),
    show: bool = typer.Option(False, help="open a browser"),
) -> None:
    """Serve the dashboard (matrix, single-head, sequence and image views) over one run, or over
    several with a run picker (`qkatlas serve runs/nightly-*` or `qkatlas serve runs/`)."""
    from rich.markup import escape

    from pipeline.arrays import backend
    from viz.server import exposure_warnings, make_server  # panel, bokeh: imported when used

    tls = tls_cert is not None or tls_key is not None
    server = make_server(run, port=port, address=address, basic_auth=basic_auth, auth_user=auth_user,
                         tls_cert=str(tls_cert) if tls_cert else None, tls_key=str(tls_key) if tls_key else None)
    for warning in exposure_warnings(address, auth=bool(basic_auth), tls=tls):
        console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True, highlight=False)
    host = "127.0.0.1" if address in ("0.0.0.0", "::") else address
    scheme = "https" if tls else "http"
    served = ", ".join(run)
    console.print(f"[bold green]serving[/] {served} at {scheme}://{host}:{port}/  (Ctrl+C stops)", highlight=False)
    arrays = backend()
    on = "the GPU (cuDF frames)" if arrays.frames.__name__ == "cudf" else \
        f"the CPU ({arrays.why_not_gpu or 'cuDF does not import'})"
    console.print(f"points aggregated by datashader on {escape(on)}", soft_wrap=True, highlight=False)
    server.start()
    if show:
        server.show("/")
    try:
        server.io_loop.start()
    except KeyboardInterrupt:
        server.stop()
