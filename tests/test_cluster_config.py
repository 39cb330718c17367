"""The `cluster:` section: validation with messages naming the key, LocalCluster defaults that
never oversubscribe, and the cuda / jobqueue / scheduler code paths up to their packages."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import (ConfigError, CudaClusterConfig, JobQueueClusterConfig, LocalClusterConfig,
                             SchedulerClusterConfig, load_config, validate)

EXTRACT = {"model": "demo:minilm", "data": "demo:wiki", "out": "runs/x"}


def cluster_of(section):
    return validate({"extract": EXTRACT, "cluster": section}).cluster


def error_of(section) -> str:
    with pytest.raises(ConfigError) as caught:
        validate({"extract": EXTRACT, "cluster": section})
    return str(caught.value)


def test_default_and_shorthands():
    assert isinstance(validate({"extract": EXTRACT}).cluster, LocalClusterConfig)
    assert isinstance(cluster_of("local"), LocalClusterConfig)
    assert isinstance(cluster_of("cuda"), CudaClusterConfig)
    scheduler = cluster_of({"address": "tcp://10.0.0.5:8786"})
    assert isinstance(scheduler, SchedulerClusterConfig) and scheduler.address == "tcp://10.0.0.5:8786"
    slurm = cluster_of({"kind": "slurm", "cores": 8, "memory": "32GB", "jobs": 4, "queue": "gpu",
                        "job_extra_directives": ["--gres=gpu:1"]})
    assert isinstance(slurm, JobQueueClusterConfig) and slurm.jobs == 4
    assert cluster_of({"kind": "cuda", "devices": "0,2"}).devices == [0, 2]


@pytest.mark.parametrize("section, expected", [
    ({"kind": "local", "queue": "gpu"}, "unknown key 'cluster.local.queue'"),
    ({"kind": "local", "n_workers": 0}, "cluster.local.n_workers"),
    ({"kind": "mesos"}, "'mesos'"),
    ("kubernetes", "cluster must be one of local, cuda, scheduler, slurm, pbs"),
    ({"address": "10.0.0.5:8786"}, "cluster.scheduler.address"),
    ({"address": "tcp://host"}, "tcp://HOST:PORT"),
    ({"kind": "scheduler"}, "cluster.scheduler.address: Field required"),
    ({"kind": "slurm", "memory": "4GB"}, "cluster.slurm.cores: Field required"),
    ({"kind": "pbs", "cores": 4}, "cluster.pbs.memory: Field required"),
    ({"kind": "pbs", "cores": 4, "memory": "8GB", "walltime": "2h"}, "cluster.pbs.walltime"),
    ({"kind": "slurm", "cores": 6, "memory": "8GB", "processes": 4}, "multiple of processes"),
    ({"kind": "cuda", "n_workers": 2}, "unknown key 'cluster.cuda.n_workers'"),
    ({"kind": "cuda", "devices": "0,x"}, "cluster.cuda.devices"),
])
def test_bad_sections_name_the_key(section, expected):
    assert expected in error_of(section)


def test_workflow_section_validated():
    with pytest.raises(ConfigError, match="unknown key 'workflow.shard'"):
        validate({"extract": EXTRACT, "workflow": {"shard": 4}})
    with pytest.raises(ConfigError, match="workflow.shards"):
        validate({"extract": EXTRACT, "workflow": {"shards": 0}})


@pytest.mark.parametrize("cores, workers, threads, expected", [
    (2, None, None, (2, 1)),   # this machine: 2 workers x 1 thread
    (16, None, None, (8, 2)),  # at most 8 workers (each holds a model), the cores shared out
    (2, 1, None, (1, 2)),
    (8, None, 4, (2, 4)),
    (4, 3, None, (3, 1)),
])
def test_local_defaults_never_oversubscribe(cores, workers, threads, expected):
    from workflows.cluster import local_layout

    n, t, warning = local_layout(LocalClusterConfig(n_workers=workers, threads_per_worker=threads), cores)
    assert (n, t) == expected and n * t <= cores and warning is None


def test_local_oversubscription_is_warned():
    from workflows.cluster import core_slices, local_layout

    _, _, warning = local_layout(LocalClusterConfig(n_workers=2, threads_per_worker=2), 2)
    assert "oversubscribed" in warning and "cluster.n_workers" in warning
    assert core_slices(4, 4, cores=2) == {}  # no pinning then


def test_core_slices_are_disjoint():
    import os

    from workflows.cluster import core_slices

    cores = sorted(os.sched_getaffinity(0))
    slices = core_slices(len(cores), 1)
    assert sorted(c for cs in slices.values() for c in cs) == cores
    assert set(slices) == {str(index) for index in range(len(cores))}


def test_jobqueue_options_map_to_dask_jobqueue():
    from workflows.cluster import jobqueue_options

    config = JobQueueClusterConfig(kind="slurm", cores=8, memory="32GB", processes=2, queue="gpu", account="proj",
                                   job_extra_directives=["--gres=gpu:1"],
                                   job_script_prologue=["source .venv/bin/activate"])
    options = jobqueue_options(config)
    assert options == {"cores": 8, "memory": "32GB", "processes": 2, "queue": "gpu", "account": "proj",
                       "walltime": "01:00:00", "job_extra_directives": ["--gres=gpu:1"],
                       "job_script_prologue": ["source .venv/bin/activate"],
                       "scheduler_options": {"dashboard_address": ":8787"}}


@pytest.mark.parametrize("section, package", [
    ({"kind": "cuda"}, "dask-cuda"),
    ({"kind": "slurm", "cores": 4, "memory": "8GB"}, "dask-jobqueue"),
    ({"kind": "pbs", "cores": 4, "memory": "8GB"}, "dask-jobqueue"),
])
def test_missing_cluster_package_is_a_clear_error(monkeypatch, section, package):
    from workflows.cluster import ClusterError, open_client

    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(ClusterError, match=f"needs the '{package}' package.*pip install"):
        with open_client(cluster_of(section)):
            pass


def test_cuda_workers_get_the_device_memory_asked_for(monkeypatch):
    """A `kind: cuda` cluster hands dask-cuda its device memory settings."""
    import logging
    import types

    from workflows import cluster as clusters

    seen = {}

    class LocalCUDACluster:  # dask-cuda's, as far as qkatlas calls it
        def __init__(self, **options):
            seen.update(options)
            self.workers = {0: None, 1: None}

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=LocalCUDACluster))
    config = cluster_of({"kind": "cuda", "devices": "0,1", "rmm_pool_size": "20GB", "device_memory_limit": 0.7})
    _, description = clusters._start_cluster(config, logging.WARNING)
    assert seen["CUDA_VISIBLE_DEVICES"] == "0,1" and "env" not in seen  # dask-cuda would replace it
    assert (seen["rmm_pool_size"], seen["device_memory_limit"]) == ("20GB", 0.7)
    assert description == "LocalCUDACluster, 2 GPU workers"
    defaults = cluster_of({"kind": "cuda"})
    assert (defaults.rmm_pool_size, defaults.device_memory_limit) == (None, 0.8)  # torch allocates outside RMM


def test_cuda_workers_are_set_to_the_gpu_array_backend(monkeypatch):
    """The plugin a `kind: cuda` cluster registers: on a worker, the backend is decided again as
    the GPU; here, without CuPy, that is the one-line error such a worker would report."""
    from pipeline import arrays
    from pipeline.arrays import ArraysError
    from workflows.cluster import ArraysOnGpu

    monkeypatch.setenv("QKATLAS_ARRAYS", "cpu")  # restored after the test, whatever the plugin sets
    arrays.backend.cache_clear()
    assert arrays.backend().name == "cpu"  # decided before the plugin ran
    try:
        ArraysOnGpu().setup(worker=None)
        assert os.environ["QKATLAS_ARRAYS"] == "gpu"
        with pytest.raises(ArraysError, match="QKATLAS_ARRAYS=gpu"):
            arrays.backend()
    finally:
        arrays.backend.cache_clear()


def test_unreachable_scheduler_is_a_clear_error():
    from workflows.cluster import ClusterError, open_client

    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    expected = f"cannot reach the Dask scheduler at cluster.address tcp://127.0.0.1:{port}"
    with pytest.raises(ClusterError, match=expected):
        with open_client(SchedulerClusterConfig(address=f"tcp://127.0.0.1:{port}", timeout=2)):
            pass


def test_packaged_configs_validate():
    for path in sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml")):
        load_config(path)


def test_cli_overrides(tmp_path):
    from workflows.runner import load_run_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"extract": EXTRACT, "cluster": {"kind": "slurm", "cores": 4, "memory": "8GB"}}))
    config = load_run_config(path, out="runs/nightly-20261125", address="tcp://127.0.0.1:8786", shards=5)
    assert config.extract.out == "runs/nightly-20261125"
    assert config.cluster.kind == "scheduler" and config.workflow.shards == 5
    with pytest.raises(ConfigError, match="--workers / --threads-per-worker apply to cluster kind 'local'"):
        load_run_config(path, workers=2)
    with pytest.raises(ConfigError, match="cluster.scheduler.address"):
        load_run_config(path, address="localhost")
