"""`qkatlas serve` and `qkatlas bench serve`: the dashboard's commands."""

from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this module's commands to the `qkatlas` command line."""

    @app.command()
    def serve(
        run: str = typer.Argument(..., help="run directory or URL, with projections (`qkatlas reduce`)"),
        port: int = typer.Option(5006, help="port to listen on"),
        address: str = typer.Option("127.0.0.1", help="address to bind; anything but loopback exposes the run"),
        basic_auth: Optional[str] = typer.Option(None, "--basic-auth", envvar="QKATLAS_BASIC_AUTH",
                                                 help="password (or JSON file of user: password) required to log "
                                                      "in; strongly advised with a non-loopback --address"),
        show: bool = typer.Option(False, help="open a browser"),
    ) -> None:
        """Serve the dashboard (matrix, single-head, sequence and image views) over a run."""
        from workflows.progress import console
        from viz.server import ServeError, is_loopback, make_server

        try:
            server = make_server(run, port=port, address=address, basic_auth=basic_auth, show=False)
        except ServeError as error:
            console.print(f"[bold red]error:[/] {error}")
            raise typer.Exit(code=2)
        if not is_loopback(address) and not basic_auth:
            console.print(f"[bold yellow]warning:[/] serving on {address} without --basic-auth: anyone who can reach "
                          "this port sees the run")
        host = "127.0.0.1" if address in ("0.0.0.0", "::") else address
        console.print(f"[bold green]serving[/] {run} at http://{host}:{port}/  (Ctrl+C stops)", highlight=False)
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
        sessions: int = typer.Option(20, help="concurrent browser-less sessions in the load test (max 50)"),
        width: int = typer.Option(700),
        height: int = typer.Option(600),
    ) -> None:
        """Re-rasterizing one head (the dashboard's code path) vs raw datashader on the same data,
        the server's memory, and concurrent sessions on loopback."""
        from viz.bench import bench_serve as run_bench

        run_bench([int(p) for p in points.split(",")], repeats, min(max(sessions, 1), 50), width, height)
