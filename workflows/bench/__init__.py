"""Benchmarks (`qkatlas bench ...`), one module each; every one prints its figures as ratios
against a baseline measured in the same run."""
