"""Orchestration over `pipeline/`: the Dask graph of `qkatlas run`, clusters, run status, groups
of runs, the command line (`workflows.cli`) and the benchmarks (`workflows.bench`)."""
