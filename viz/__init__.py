"""The qkatlas dashboard: Panel + HoloViews + datashader over one run.

    import viz
    viz.app("runs/demo")          # a Panel object: display it in Jupyter, or .servable()

`qkatlas serve RUN` serves the same app (see viz.server)."""

from __future__ import annotations


def app(run, args: dict | None = None):
    """The dashboard over `run` (a path, URL or opened Run) as a Panel object."""
    from viz.views import app as make_app

    return make_app(run, args)


__all__ = ["app"]
