"""Where data.py's tasks run: worker processes of this machine by default, a Ray cluster with
--ray_address. The driver (data.py) is the same for both: it hands a stage's calls of one
function to `Executor.map` and gets their results in call order.

Both executors run each call once in the end: a call whose worker died is run again (up to
RETRIES times), a task's own error reaches the driver as is (and the rest of the stage is
abandoned), and a progress bar counts the calls or their bytes. The tasks (stages.py,
mixture.py) write their outputs as whole files, so running one twice changes nothing.

* `LocalExecutor`: a pool of --num_cpus processes of this machine, forked from the driver where
  that is safe (they share its imports), spawned elsewhere: no engine, no daemon, no port, nothing
  on the network. When a worker dies, the pool is started anew and the stage's unfinished calls
  go to it; when the driver dies, so do its workers.
* `RayExecutor`: tasks on the Ray cluster at --ray_address (`auto`, or HOST:PORT of its head),
  spread over its nodes, retried by Ray when their worker dies. Every host needs this checkout
  at the same path (tasks import stages.py and mixture.py by name) and the same Python
  environment.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import itertools
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool

from absl import logging
from tqdm import tqdm

RETRIES = 5
REPO = os.path.dirname(os.path.abspath(__file__))


class Executor:
    """map() a stage's calls; a context manager that stops its workers on the way out."""

    def share(self, value):
        """A value many calls take (the tokenizer): sent once where the engine can."""
        return value

    def map(self, name: str, function: Callable, calls: Sequence[tuple], sizes: Sequence[int] | None = None,
            unit: str = "task") -> list:
        """function(*args) for each call, with a progress bar over `sizes` (in `unit`s); the
        results in call order."""
        raise NotImplementedError

    def close(self, abort: bool = False) -> None:
        """Release the workers; `abort`: without waiting for running calls."""

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        self.close(abort=kind is not None)


def progress(name: str, sizes: Sequence[int], unit: str) -> tqdm:
    return tqdm(total=sum(sizes), desc=name, unit=unit, unit_scale=unit == "B", disable=None)


def _start_method() -> str:
    """fork where it is safe: the workers then start with the driver's modules imported (a
    spawned worker spends ~1 s of CPU importing them again, a tenth of a small run's work). Not on
    macOS, nor in a process that runs threads of its own or JAX's runtime (prepare called from a
    test or a notebook): fork copies one thread, and a lock another one held stays held."""
    jax_runtime = sys.modules.get("jax._src.xla_bridge")
    busy = threading.active_count() > 1 or (jax_runtime is not None and jax_runtime.backends_are_initialized())
    return "fork" if sys.platform == "linux" and not busy else "spawn"


def _start_worker(driver: int) -> None:
    """A local worker's first act: leave Ctrl-C to the driver (which stops the workers: one message,
    not one traceback per worker), and have the kernel kill it when the driver dies, even by
    SIGKILL (a pool's workers otherwise outlive it, waiting for calls), as a raylet does its
    workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != driver:  # it died before that
        os._exit(1)


class LocalExecutor(Executor):
    """`workers` processes of this machine (see the module docstring)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        if self.pool is None:
            context = multiprocessing.get_context(_start_method())
            self.pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),))
        return self.pool

    def map(self, name, function, calls, sizes=None, unit="task"):
        results: list = [None] * len(calls)
        sizes = sizes or [1] * len(calls)
        todo, finished = list(range(len(calls))), set()
        self._start()  # before the progress bar's thread
        with progress(name, sizes, unit) as bar:
            for retry in itertools.count(1):
                futures: dict = {}
                try:
                    for i in todo:
                        futures[self._start().submit(function, *calls[i])] = i
                    for future in concurrent.futures.as_completed(futures):
                        i = futures[future]
                        results[i] = future.result()  # a task's own error is raised here as is
                        finished.add(i)
                        bar.update(sizes[i])
                    return results
                except BrokenProcessPool:
                    for future, i in futures.items():  # those that ended before the worker died
                        if i not in finished and future.done() and not future.cancelled() and not future.exception():
                            results[i] = future.result()
                            finished.add(i)
                            bar.update(sizes[i])
                    todo = [i for i in todo if i not in finished]
                    self.close()
                    if retry > RETRIES:
                        raise RuntimeError(f"{name}: worker processes died {RETRIES + 1} times (killed, or out "
                                           "of memory?)") from None
                    logging.warning("%s: a worker process died; its %d unfinished calls run again in a new "
                                    "pool (retry %d of %d)", name, len(todo), retry, RETRIES)

    def close(self, abort=False):
        pool, self.pool = self.pool, None
        if pool is None:
            return
        if abort:  # Python 3.14's pool.terminate_workers()
            for process in list((pool._processes or {}).values()):
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor(Executor):
    """Tasks on the Ray cluster at `address` (see the module docstring)."""

    def __init__(self, address: str):
        import ray

        self.ray = ray
        self.connected = not ray.is_initialized()  # a process already connected stays so
        if self.connected:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        # What a task needs of the driver's environment: this checkout on the path, a storage
        # emulator if one is set.
        env = {"PYTHONPATH": REPO}
        if "STORAGE_EMULATOR_HOST" in os.environ:
            env["STORAGE_EMULATOR_HOST"] = os.environ["STORAGE_EMULATOR_HOST"]
        self.runtime_env = {"env_vars": env}

    def share(self, value):
        return self.ray.put(value)

    def map(self, name, function, calls, sizes=None, unit="task"):
        ray = self.ray
        # SPREAD: every node reads and writes its share of files from the start, instead of the
        # head taking tasks until it is busy.
        task = ray.remote(max_retries=RETRIES)(function).options(runtime_env=self.runtime_env,
                                                                 scheduling_strategy="SPREAD")
        futures = [task.remote(*args) for args in calls]
        position = {f: i for i, f in enumerate(futures)}
        results: list = [None] * len(futures)
        sizes = sizes or [1] * len(calls)
        with progress(name, sizes, unit) as bar:
            pending = list(futures)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i = position[done[0]]
                try:
                    results[i] = ray.get(done[0])
                except ray.exceptions.RayTaskError as e:
                    raise (e.cause if isinstance(e.cause, Exception) else e) from None
                bar.update(sizes[i])
        return results

    def close(self, abort=False):
        if self.connected:  # the cluster's running tasks of an aborted run end with the driver
            self.ray.shutdown()
            self.connected = False
