"""qkatlas library: extract per-head queries and keys into a run store, normalize, project.

Nothing here creates a cluster; `workflows/` composes these functions into Dask graphs.
"""
