"""The Ray of a command (``mine``, ``finetune --num-workers``): which one it joins or starts, and where Ray's own
output goes.

* ``--ray-address`` (or ``RAY_ADDRESS``) given: join that cluster (``host:port`` of its head, ``ray://host:10001``
  for Ray Client, ``auto`` for the cluster that ``ray start`` last started on this machine). The address is
  probed first, so one that answers nothing fails in seconds with one line instead of Ray's minutes of retries.
* none given: start a new local Ray bound to loopback (127.0.0.1; nothing listens on the machine's other
  interfaces), whatever Ray's ``ray_current_cluster`` record in its temp folder names: a bare ``ray.init()``
  would join that cluster, and hang when it is gone.

Unless ``verbose``, Ray's own output stays off the console: its Python loggers, its warnings and the messages
its driver prints as they come from the cluster (a node that died...) go to the run's log file (``RUN/mine.log``),
its workers' output stays in Ray's session folder (``log_to_driver=False``), and what Ray's native code writes on
the driver's standard error (gRPC, the core worker's C++ log) goes to the run's log too, through file descriptor 2,
while Python's ``sys.stderr`` keeps the console for the CLI's own lines.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import warnings
from typing import Any

from ovseg_mine import stop_signals
from ovseg_mine.faults import worker_env_vars
from ovseg_mine.storage import first_line

log = logging.getLogger("ovseg_mine")

#: Seconds to wait for a cluster's head to accept a connection before giving up.
PROBE_TIMEOUT_S = 5.0
#: Ray's Python loggers, whose records go to the run's log (and, only when verbose, to the console).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")


class RayStartError(RuntimeError):
    """Ray cannot be started or joined (a cluster address that answers nothing, ...); the message is one line."""


def cluster_address(address: str | None) -> str | None:
    """The cluster a run joins: ``address``, else ``RAY_ADDRESS``, else None (start a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def probe_cluster(address: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """Check that a Ray head answers at ``address`` before Ray tries (and retries) to connect.

    Args:
        address: ``host:port`` (GCS of the head), ``ray://host:port`` (Ray Client) or ``auto`` (the cluster named
            by ``ray_current_cluster`` in Ray's temp folder, as ``ray start`` wrote it).
        timeout: seconds to wait for the TCP connection.

    Returns:
        The ``host:port`` that answered.

    Raises:
        RayStartError: nothing answers there within ``timeout``, or ``auto`` finds no cluster; one line.
    """
    if address.startswith(("http://", "https://")):
        raise RayStartError(
            f"{address} is a Ray dashboard address (for `ray job submit`); mine joins a cluster at HOST:PORT of its "
            "head (port 6379 by default), ray://HOST:10001, or auto"
        )
    target = address.removeprefix("ray://")
    if target == "auto":
        import ray._private.services as services

        try:
            target = services.canonicalize_bootstrap_address("auto") or ""
        except (ConnectionError, ValueError) as exc:
            raise RayStartError(f"--ray-address auto: no Ray cluster on this machine ({first_line(exc)})") from exc
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RayStartError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayStartError(
            f"no Ray cluster answers at {address} ({first_line(exc)}); start one with `ray start --head`, or leave "
            "out --ray-address for a local Ray"
        ) from exc
    return target


class _ToRunLog(logging.Handler):
    """Hands Ray's log records (INFO and above) to the run's log handler. (Ray sets its own format on the
    handlers of its loggers; this one keeps the run log's.)"""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(logging.INFO)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


def _route_ray_logs(handler: logging.Handler | None, *, console: bool) -> None:
    """Send the records of Ray's loggers to ``handler`` (the run's log); unless ``console``, take Ray's console
    handlers off them."""
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            console_handler = isinstance(old, logging.StreamHandler) and not isinstance(old, logging.FileHandler)
            if isinstance(old, _ToRunLog) or (console_handler and not console):
                logger.removeHandler(old)
        if handler is not None:
            logger.addHandler(_ToRunLog(handler))
        logger.propagate = False


class _Quiet:
    """What keeps Ray off the console while a run is quiet, and undoes itself (:meth:`restore`):

    * file descriptor 2 points at the run's log (``path``), so what Ray's native code writes there lands in it;
      Python's ``sys.stderr``, and the logging handlers that wrote to it, get a copy of the console's descriptor;
    * the messages Ray's driver prints as they come from the cluster (a node that died, a raylet's last log
      lines: ``ray._private.worker.print_to_stdstream``) and Python warnings raised in Ray's code go to Ray's
      logger, hence to the run's log.
    """

    def __init__(self, path: str) -> None:
        import ray._private.worker as ray_worker

        sys.stderr.flush()
        self._python_stderr = sys.stderr
        self._console_fd = os.dup(2)
        encoding = sys.stderr.encoding or "utf-8"
        console = os.fdopen(os.dup(self._console_fd), "w", buffering=1, encoding=encoding, errors="backslashreplace")
        self._handlers = [h for h in _all_handlers() if vars(h).get("stream") is self._python_stderr]
        for handler in self._handlers:
            handler.setStream(console)
        sys.stderr = console
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, 2)
        os.close(target)
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._warning
        self._ray_worker = ray_worker
        self._print_to_stdstream = ray_worker.print_to_stdstream
        ray_worker.print_to_stdstream = self._cluster_message

    def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if f"{os.sep}ray{os.sep}" in str(filename):
            logging.getLogger("ray").warning("%s:%s: %s: %s", filename, lineno, category.__name__, message)
        else:
            self._showwarning(message, category, filename, lineno, file, line)

    @staticmethod
    def _cluster_message(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        text = "\n".join(str(line) for line in data.get("lines", []))
        logging.getLogger("ray").warning("(%s) %s", data.get("pid", "ray"), text)

    def restore(self) -> None:
        self._ray_worker.print_to_stdstream = self._print_to_stdstream
        warnings.showwarning = self._showwarning
        console = sys.stderr
        console.flush()
        os.dup2(self._console_fd, 2)
        os.close(self._console_fd)
        for handler in self._handlers:
            handler.setStream(self._python_stderr)
        sys.stderr = self._python_stderr
        console.close()


def _all_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger(), *logging.root.manager.loggerDict.values()]
    return [h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers]


_quiet: _Quiet | None = None


def init_ray(address: str | None, *, verbose: bool = False, log_handler: logging.Handler | None = None) -> bool:
    """Start a local Ray (loopback only) or join a cluster (see the module docstring).

    Args:
        address: ``--ray-address``; None: ``RAY_ADDRESS`` if set, else a new local Ray.
        verbose: leave Ray's log lines (and its workers' output) on the console too.
        log_handler: the run's log (:func:`ovseg_mine.mine.run.run_folder.run_log`), where Ray's log lines go.

    Returns:
        True when this call started or joined Ray (then call :func:`shutdown_ray`), False when Ray was up already.

    Raises:
        RayStartError: the cluster does not answer, or Ray cannot start; one line.
    """
    global _quiet
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return False
    join = cluster_address(address)
    if join is not None:
        probe_cluster(join)
    # A local Ray advertises and binds 127.0.0.1: Ray's own rule for single-machine instances (on macOS and
    # Windows), which a Linux Ray follows too when this is off. A cluster member needs its reachable address.
    ray_constants.ENABLE_RAY_CLUSTER = join is not None
    _route_ray_logs(log_handler, console=verbose)
    log_path = getattr(log_handler, "baseFilename", None)
    if not verbose and log_path and _quiet is None:
        _quiet = _Quiet(log_path)
    options: dict[str, Any] = {"logging_level": logging.INFO, "log_to_driver": verbose}
    if join is None:
        options.update(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)
    else:
        options.update(address=join)
        env_vars = worker_env_vars()
        if env_vars:  # a cluster's workers were started by `ray start`, not by this driver: hand its failpoints on
            options.update(runtime_env={"env_vars": env_vars})
    try:
        _init_holding_stops(ray, options)
    except stop_signals.StopRequested:
        shutdown_ray()  # what the interrupted start-up had started
        raise
    except Exception as exc:  # Ray raises bare Exception on start-up timeouts, ConnectionError on bad addresses
        _end_quiet()
        _route_ray_logs(None, console=True)
        where = f"the Ray cluster at {join}" if join else "a local Ray"
        raise RayStartError(f"could not start or join {where}: {type(exc).__name__}: {first_line(exc)}") from exc
    from ray.data import DataContext

    _route_ray_logs(log_handler, console=verbose)  # ray.data set up its own console handler when it was imported
    node = ray._private.worker._global_node  # None for a Ray Client connection (ray://)
    log.info(
        "Ray %s at %s; its session folder (every Ray process's log): %s",
        "joined" if join else "started",
        join or node.gcs_address,
        node.get_session_dir_path() if node is not None else "on the cluster's head",
    )
    ctx = DataContext.get_current()
    # The mask/match pool goes on with as few actors as the cluster holds (min 1) but never lets one go for being idle
    # a moment: an actor holds SAM and CLIP, loaded in seconds to minutes; Ray Data's default released and restarted
    # actors as the upstream stages paused (a utilisation below the threshold is never reached below zero).
    ctx.autoscaling_config = dataclasses.replace(ctx.autoscaling_config, actor_pool_util_downscaling_threshold=-1.0)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # A block here is a few image records, and the work on it seconds of SAM and CLIP: hand each block to the least
    # busy actor, wherever it runs, instead of queueing blocks on the actor next to them (Ray's default), which
    # leaves the other nodes' actors idle on small runs. (Deprecated in Ray 2.60 for removal in 2027; pyproject pins
    # Ray below 2.64.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.execution_options.actor_locality_enabled = False
    return True


def _init_holding_stops(ray: Any, options: dict[str, Any]) -> None:
    """``ray.init(**options)`` with SIGINT and SIGTERM held until it returns (ovseg_mine.stop_signals).

    ``ray.init`` first replaces the SIGTERM handler with one that calls ``sys.exit(SIGTERM)`` (``ray/_private/
    worker.py``, through ``ray._private.utils.set_sigterm_handler``), and its core worker installs absl's
    failure-signal handler, which aborts the process on SIGTERM. A SIGTERM taken by it interrupts the start-up
    half-way, and what it had started (the dashboard and runtime-env agents) outlives the run, since
    ``ray.shutdown`` does not know of it yet. While the stop handlers are installed, that replacement is skipped,
    so the signal waits for the start-up to end and the caller shuts the complete Ray down; where a Ray version
    takes the handler anyway, its ``SystemExit`` is still taken as the stop it is. The handlers are put back as
    soon as Ray is up.
    """
    from ray._private import ray_constants

    utils = getattr(getattr(ray, "_private", None), "utils", None)
    replace_handler = getattr(utils, "set_sigterm_handler", None)
    with stop_signals.critical():
        try:
            if stop_signals.installed():
                if replace_handler is not None:
                    utils.set_sigterm_handler = _keep_stop_handler
                # The driver's core worker would also install absl's failure-signal handler, which takes SIGTERM at
                # the C level and aborts the process (exit 134) until the stop handler is put back; the driver's
                # only (its workers keep theirs, for the stack of a native crash in their logs).
                ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
            ray.init(**options)
        except SystemExit as exc:
            if exc.code != signal.SIGTERM:
                raise
            stop_signals.hold(signal.SIGTERM)
        finally:
            if replace_handler is not None:
                utils.set_sigterm_handler = replace_handler
            stop_signals.reinstall()


def _keep_stop_handler(handler: Any) -> None:
    """Stands in for Ray's ``set_sigterm_handler`` during ``ray.init``: the stop handler stays."""


def _end_quiet() -> None:
    global _quiet
    if _quiet is not None:
        _quiet.restore()
        _quiet = None


#: Seconds :func:`shutdown_ray` waits for Ray Data's threads to end.
EXECUTOR_JOIN_S = 60.0


#: Names of the threads Ray Data's iterators start (block prefetchers, fetch workers, the metadata prefetcher, the
#: map thread pools of ray/data/_internal/util.py make_async_gen): each may be in a ray.get or ray.wait when the
#: iterator is closed, and finishes that call before it sees the stop.
RAY_DATA_THREAD_NAMES = ("Prefetcher", "iter_threaded", "ray-data-metadata-prefetch")
RAY_DATA_THREAD_PREFIXES = ("map_tp_",)


def ray_data_threads() -> list:
    """The live threads of Ray Data in this process (``threading.Thread``), but the caller's: its streaming
    executors and the threads of its iterators (:data:`RAY_DATA_THREAD_NAMES`, :data:`RAY_DATA_THREAD_PREFIXES`)."""
    import threading

    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:  # another Ray layout: only the named threads are known
        StreamingExecutor = ()  # noqa: N806 - isinstance(x, ()) is False
    return [
        thread
        for thread in threading.enumerate()
        if thread is not threading.current_thread()
        and thread.is_alive()
        and (
            isinstance(thread, StreamingExecutor)
            or thread.name in RAY_DATA_THREAD_NAMES
            or thread.name.startswith(RAY_DATA_THREAD_PREFIXES)
        )
    ]


def join_ray_data_threads(timeout: float = EXECUTOR_JOIN_S) -> list:
    """Wait up to ``timeout`` seconds in all for Ray Data's threads (:func:`ray_data_threads`) to end; returns those
    still alive. Called before ``ray.shutdown``: a thread that touches Ray after it makes Ray's core worker end the
    whole process with exit code 1 ("The core worker has already been shutdown ... The process will exit"), seen
    when a stop signal closed a busy pipeline on a loaded machine: first from a streaming executor that outlived its
    own 2 s join, later (executor finished) from an iterator's thread."""
    import time

    deadline = time.monotonic() + timeout
    threads = ray_data_threads()
    for thread in threads:
        _stop_prefetcher(thread)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [thread for thread in ray_data_threads()]


def _stop_prefetcher(thread) -> None:
    """Stop the block prefetcher whose thread this is, if it is one. A prefetcher is stopped when its iterator is
    exhausted or garbage-collected, not when the iterator is closed early (a stop signal, an error): until then its
    thread waits for blocks to fetch, and a wake-up with blocks pending calls ``ray.wait``. Stopped while Ray is up,
    it ends at once (ray/data/_internal/block_batching/util.py, WaitBlockPrefetcher). The owner is the bound
    method the thread runs (``Thread._target``, kept while the thread runs)."""
    owner = getattr(getattr(thread, "_target", None), "__self__", None)
    stop = getattr(owner, "stop", None)
    if thread.name == "Prefetcher" and callable(stop):
        stop()


def shutdown_ray() -> None:
    """Shut down (or leave) the Ray that :func:`init_ray` started or joined, once Ray Data's threads have ended
    (:func:`join_ray_data_threads`; those still alive after a minute are logged); standard error goes back to the
    console and Ray's loggers stop writing to the run's log."""
    import ray

    try:
        left = join_ray_data_threads()
        if left:
            log.warning("Ray Data threads still running at Ray's shutdown: %s", ", ".join(t.name for t in left))
        ray.shutdown()
    finally:
        _end_quiet()
        _route_ray_logs(None, console=True)
