"""A Dask client from a run file's `cluster:` section. Clusters live here, never in `pipeline/`.

    local      dask.distributed LocalCluster, sized so that workers x threads <= cores, each
               worker pinned to its own cores
    cuda       dask-cuda's LocalCUDACluster, one worker per GPU          (pip install dask-cuda)
    scheduler  an existing scheduler at tcp://HOST:PORT
    slurm/pbs  dask-jobqueue's SLURMCluster / PBSCluster                (pip install dask-jobqueue)
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.config import (CudaClusterConfig, JobQueueClusterConfig, LocalClusterConfig,
                             SchedulerClusterConfig)


class ClusterError(RuntimeError):
    """A cluster that cannot be started or reached; the message says what to do."""


MAX_DEFAULT_WORKERS = 8  # each worker holds its own copy of the model


def machine_cores() -> int:
    return len(os.sched_getaffinity(0))


def local_layout(config: LocalClusterConfig, cores: int | None = None) -> tuple[int, int, str | None]:
    """(n_workers, threads_per_worker, warning): defaults never oversubscribe the machine."""
    cores = cores or machine_cores()
    workers, threads = config.n_workers, config.threads_per_worker
    if workers is None and threads is None:
        workers = min(cores, MAX_DEFAULT_WORKERS)
    if threads is None:
        threads = max(1, cores // workers)
    if workers is None:
        workers = max(1, cores // threads)
    warning = None
    if workers * threads > cores:
        warning = (f"cluster.n_workers x cluster.threads_per_worker = {workers} x {threads} = {workers * threads} "
                   f"threads on {cores} cores: oversubscribed, expect slower runs")
    return workers, threads, warning


def core_slices(workers: int, threads: int, cores: int | None = None) -> dict[str, list[int]]:
    """Disjoint CPU sets, `threads` cores per worker, keyed by LocalCluster's worker names."""
    available = sorted(os.sched_getaffinity(0))
    if cores is not None:
        available = available[:cores]
    if workers * threads > len(available):
        return {}  # oversubscribed on purpose: leave placement to the OS
    return {str(index): available[index * threads:(index + 1) * threads] for index in range(workers)}


def pin_process(cores: list[int]) -> None:
    """Restrict every thread of this process (and the threads it starts later) to `cores`, so
    that libraries sizing their pools from the CPU set (torch, numba, faiss) stay within it."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cores)


class PinCores(WorkerPlugin):
    """Pins each local worker to its own cores when it starts (and when it restarts)."""

    name = "qkatlas-pin-cores"

    def __init__(self, slices: dict[str, list[int]]):
        self.slices = slices

    def setup(self, worker) -> None:
        cores = self.slices.get(str(worker.name))
        if cores:
            pin_process(cores)


def _missing(package: str, kind: str, extra: str) -> ClusterError:
    return ClusterError(f"cluster kind '{kind}' needs the '{package}' package, which is not installed here; "
                        f"install it with: pip install '{extra}'")


@contextlib.contextmanager
def open_client(config, quiet: bool = True) -> Iterator[tuple[object, str]]:
    """Yield (client, description) for a `cluster:` section; closes what it started."""
    from distributed import Client

    level = logging.ERROR if quiet else logging.WARNING
    if isinstance(config, SchedulerClusterConfig):
        try:
            client = Client(config.address, timeout=config.timeout)
        except (OSError, TimeoutError) as error:
            raise ClusterError(f"cannot reach the Dask scheduler at cluster.address {config.address}: {error}") \
                from None
        try:
            client.wait_for_workers(1, timeout=config.timeout)
        except TimeoutError:
            client.close()
            raise ClusterError(f"the scheduler at {config.address} has no workers (waited {config.timeout:.0f} s); "
                               "start some with: dask worker " + config.address) from None
        with client:
            yield client, f"scheduler {config.address}"
        return
    cluster, description = _start_cluster(config, level)
    try:
        with Client(cluster) as client:
            if isinstance(config, LocalClusterConfig) and config.pin_cores:
                workers, threads, _ = local_layout(config)
                slices = core_slices(workers, threads)
                if slices:
                    client.register_plugin(PinCores(slices))
            if isinstance(config, JobQueueClusterConfig):
                try:
                    client.wait_for_workers(1, timeout=config.timeout)
                except TimeoutError:
                    raise ClusterError(f"no {config.kind} job started a worker within {config.timeout:.0f} s "
                                       "(cluster.timeout); check the queue with squeue / qstat") from None
            yield client, description
    finally:
        cluster.close()


def _start_cluster(config, level: int):
    if isinstance(config, LocalClusterConfig):
        from distributed import LocalCluster

        workers, threads, _ = local_layout(config)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                               memory_limit=config.memory_limit, dashboard_address=config.dashboard_address,
                               silence_logs=level)
        return cluster, f"LocalCluster, {workers} workers x {threads} threads"
    if isinstance(config, CudaClusterConfig):
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise _missing("dask-cuda", "cuda", "dask-cuda") from None
        devices = ",".join(map(str, config.devices)) if config.devices is not None else None
        cluster = LocalCUDACluster(CUDA_VISIBLE_DEVICES=devices, threads_per_worker=config.threads_per_worker,
                                   memory_limit=config.memory_limit, dashboard_address=config.dashboard_address,
                                   silence_logs=level)
        return cluster, f"LocalCUDACluster, {len(cluster.workers)} GPU workers"
    if isinstance(config, JobQueueClusterConfig):
        try:
            import dask_jobqueue
        except ImportError:
            raise _missing("dask-jobqueue", config.kind, "dask-jobqueue") from None
        cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[config.kind]
        cluster = cls(**jobqueue_options(config))
        cluster.scale(jobs=config.jobs)
        return cluster, (f"{cls.__name__}, {config.jobs} jobs x {config.processes} workers "
                         f"({config.cores} cores, {config.memory} per job)")
    raise ClusterError(f"unknown cluster kind {getattr(config, 'kind', config)!r}")


def jobqueue_options(config: JobQueueClusterConfig) -> dict:
    """Keyword arguments of dask-jobqueue's SLURMCluster / PBSCluster for this section."""
    options = dict(cores=config.cores, memory=config.memory, processes=config.processes, queue=config.queue,
                   account=config.account, walltime=config.walltime,
                   job_extra_directives=list(config.job_extra_directives),
                   job_script_prologue=list(config.job_script_prologue), local_directory=config.local_directory,
                   log_directory=config.log_directory, interface=config.interface,
                   scheduler_options={"dashboard_address": config.dashboard_address})
    return {key: value for key, value in options.items() if value is not None}
