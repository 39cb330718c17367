"""Orchestration: the `qkatlas` command line, benchmarks, and (later) Dask graphs over `pipeline/`."""
