"""`qkatlas serve` and `qkatlas bench serve`: the dashboard's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this module's commands to the `qkatlas` command line."""

    @app.command()
    def serve(
        run: str = typer.Argument(..., help="run directory or URL, with projections (`qkatlas reduce`)"),
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
        """Serve the dashboard (matrix, single-head, sequence and image views) over a run."""
        from viz.server import exposure_warnings, make_server
        from workflows.progress import console

        tls = tls_cert is not None or tls_key is not None
        server = make_server(run, port=port, address=address, basic_auth=basic_auth, auth_user=auth_user,
                             tls_cert=str(tls_cert) if tls_cert else None, tls_key=str(tls_key) if tls_key else None)
        for warning in exposure_warnings(address, auth=bool(basic_auth), tls=tls):
            console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True, highlight=False)
        host = "127.0.0.1" if address in ("0.0.0.0", "::") else address
        scheme = "https" if tls else "http"
        console.print(f"[bold green]serving[/] {run} at {scheme}://{host}:{port}/  (Ctrl+C stops)", highlight=False)
        server.start()
        if show:
            server.show("/")
        try:
            server.io_loop.start()
        except KeyboardInterrupt:
            server.stop()

    @bench_app.command("serve")
    def bench_serve(
        points: str = typer.Option("1000000,10000000", help="points per head to rasterize (comma list)"),
        repeats: int = typer.Option(7, help="timed re-rasterizations per size (median reported)"),
        sessions: int = typer.Option(20, help="concurrent sessions in the load test (max 50)"),
        tokens: int = typer.Option(500_000, help="tokens of the load test's synthetic run (2 points each per head)"),
        width: int = typer.Option(700),
        height: int = typer.Option(600),
    ) -> None:
        """Re-rasterizing one head (the dashboard's code path) vs raw datashader on the same data,
        the server's memory, and concurrent sessions against a server process, with the old
        serving path (search with Python's regex on the event loop) as the baseline."""
        from viz.bench import bench_serve as run_bench

        run_bench([int(p) for p in points.split(",")], repeats, min(max(sessions, 1), 50), width, height, tokens)
