"""A Dask client from a run file's `cluster:` section. Clusters live here, never in `pipeline/`.

    local      dask.distributed LocalCluster, sized so that workers x threads <= cores, each
               worker pinned to its own cores
    cuda       dask-cuda's LocalCUDACluster, one worker per GPU          (pip install dask-cuda)
               its workers run the GPU array backend (QKATLAS_ARRAYS=gpu): one without CuPy fails
               its tasks saying so rather than running on the host
    scheduler  an existing scheduler at tcp://HOST:PORT
    slurm/pbs  dask-jobqueue's SLURMCluster / PBSCluster                (pip install dask-jobqueue)
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import threading
import time
from typing import Iterator

from dask.system import cpu_count
from distributed.diagnostics.plugin import WorkerPlugin

from pipeline import arrays
from pipeline.config import (CudaClusterConfig, JobQueueClusterConfig, LocalClusterConfig,
                             SchedulerClusterConfig)
from pipeline.errors import QkatlasError


class ClusterError(QkatlasError, RuntimeError):
    """A cluster that cannot be started or reached; the message says what to do."""


MAX_DEFAULT_WORKERS = 8  # each worker holds its own copy of the model
LOOPBACK = "127.0.0.1"
JOB_CHECK_SECONDS = 5.0  # how often a scheduled cluster's lost batch jobs are replaced


def dashboard_bind(address: str) -> tuple[str, str | None]:
    """(address to give Dask, warning): a dashboard address without a host (":8787", "8787",
    ":0") listens on loopback only, not on every interface as Dask would; a host that is not
    loopback is kept, with a warning, since the dashboard has no authentication."""
    host, _, port = address.rpartition(":") if ":" in address else ("", "", address)
    host = host.strip("[]")
    if not host:
        return f"{LOOPBACK}:{port or 0}", None
    if host == "localhost" or _is_loopback(host):
        return address, None
    return address, (f"the Dask dashboard listens on {address} (cluster.dashboard_address) without authentication: "
                     "anyone who can reach it sees and can stop the run; leave the default (127.0.0.1) and use an "
                     "SSH tunnel instead")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_layout(config: LocalClusterConfig, cores: int | None = None) -> tuple[int, int, str | None]:
    """(n_workers, threads_per_worker, warning): defaults never oversubscribe the machine."""
    cores = cores or cpu_count()
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


class ArraysOnGpu(WorkerPlugin):
    """Sets each dask-cuda worker's array backend to the GPU (`QKATLAS_ARRAYS=gpu`) when it starts
    (and restarts), so that a worker without CuPy fails its tasks saying so instead of computing
    on its host. A plugin, not the workers' `env` option: dask-cuda replaces that with its own
    CUDA_VISIBLE_DEVICES."""

    name = "qkatlas-arrays-on-gpu"

    def setup(self, worker) -> None:
        os.environ[arrays.ENVIRONMENT] = "gpu"
        arrays.backend.cache_clear()


@contextlib.contextmanager
def open_client(config, quiet: bool = True) -> Iterator[tuple[object, str]]:
    """Yield (client, description) for a `cluster:` section; closes what it started."""
    from distributed import Client

    level = logging.ERROR if quiet else logging.WARNING
    if isinstance(config, SchedulerClusterConfig):
        try:
            client = Client(config.address, timeout=config.timeout)
        except OSError as error:  # TimeoutError included
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
    address, warning = dashboard_bind(config.dashboard_address)
    if warning:
        from workflows.progress import console

        console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True, highlight=False)
    cluster, description = _start_cluster(config.model_copy(update={"dashboard_address": address}), level)
    try:
        with Client(cluster) as client:
            if isinstance(config, LocalClusterConfig) and config.pin_cores:
                workers, threads, _ = local_layout(config)
                slices = core_slices(workers, threads)
                if slices:
                    client.register_plugin(PinCores(slices))
            if isinstance(config, CudaClusterConfig):
                client.register_plugin(ArraysOnGpu())
            if isinstance(config, JobQueueClusterConfig):
                try:
                    client.wait_for_workers(1, timeout=config.timeout)
                except TimeoutError:
                    raise ClusterError(f"no {config.kind} job started a worker within {config.timeout:.0f} s "
                                       "(cluster.timeout); check the queue with squeue / qstat") from None
                with replacing_lost_jobs(cluster, config.jobs):
                    yield client, description
                return
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
                                   memory_limit=config.memory_limit, device_memory_limit=config.device_memory_limit,
                                   rmm_pool_size=config.rmm_pool_size, dashboard_address=config.dashboard_address,
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


def job_ids(cluster) -> list[str]:
    """The batch-system ids of a dask-jobqueue cluster's live jobs."""
    return [str(job.job_id) for job in list(cluster.workers.values()) if getattr(job, "job_id", None)]


@contextlib.contextmanager
def replacing_lost_jobs(cluster, jobs: int, every: float = JOB_CHECK_SECONDS) -> Iterator[None]:
    """Keep `jobs` batch jobs while the block runs, and log their ids.

    A job that ends under a run (walltime, preemption, `scancel`) takes its workers with it, and
    dask-jobqueue does not submit another: the run would wait forever. Every `every` seconds this
    asks for `jobs` again (a job whose workers the scheduler lost is then resubmitted) and logs
    each job that ended and each one submitted."""
    from tornado.ioloop import PeriodicCallback

    from workflows.progress import console

    def say(text: str) -> None:
        console.print(f"{time.strftime('%H:%M:%S')} {text}", highlight=False, soft_wrap=True, markup=False)

    known = job_ids(cluster)
    say(f"worker job{'s' if len(known) > 1 else ''} {', '.join(known)} submitted ({type(cluster).__name__})")
    stopped = threading.Event()

    def check() -> None:
        if stopped.is_set():  # the run is over: the cluster is closing its jobs
            return
        current = job_ids(cluster)
        for job in sorted(set(known) - set(current)):
            say(f"worker job {job} ended (walltime, preemption or scancel?); submitting a replacement")
        for job in sorted(set(current) - set(known)):
            say(f"worker job {job} submitted")
        known[:] = current
        cluster.scale(jobs=jobs)

    callback = PeriodicCallback(check, every * 1000)
    cluster.loop.add_callback(callback.start)
    try:
        yield
    finally:
        stopped.set()
        cluster.loop.add_callback(callback.stop)


def jobqueue_options(config: JobQueueClusterConfig) -> dict:
    """Keyword arguments of dask-jobqueue's SLURMCluster / PBSCluster for this section."""
    options = dict(cores=config.cores, memory=config.memory, processes=config.processes, queue=config.queue,
                   account=config.account, walltime=config.walltime,
                   job_extra_directives=list(config.job_extra_directives),
                   job_script_prologue=list(config.job_script_prologue), local_directory=config.local_directory,
                   log_directory=config.log_directory, interface=config.interface,
                   scheduler_options={"dashboard_address": config.dashboard_address})
    return {key: value for key, value in options.items() if value is not None}
