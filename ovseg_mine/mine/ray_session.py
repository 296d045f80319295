"""The Ray of a mining run: which one it joins or starts, and where Ray's own output goes.

* ``--ray-address`` (or ``RAY_ADDRESS``) given: join that cluster (``host:port`` of its head, ``ray://host:10001``
  for Ray Client, ``auto`` for the cluster that ``ray start`` last started on this machine). The address is
  probed first, so one that answers nothing fails in seconds with one line instead of Ray's minutes of retries.
* none given: start a new local Ray bound to loopback (127.0.0.1; nothing listens on the machine's other
  interfaces), whatever Ray's ``ray_current_cluster`` record in its temp folder names: a bare ``ray.init()``
  would join that cluster, and hang when it is gone.

Unless ``verbose``, Ray's own output stays off the console: its Python loggers go to the run's log file
(``RUN/mine.log``), its workers' output stays in Ray's session folder (``log_to_driver=False``), and what Ray's
native code writes on the driver's standard error (gRPC, the core worker's C++ log) goes to the run's log too,
through file descriptor 2, while Python's ``sys.stderr`` keeps the console for the CLI's own lines.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

from ovseg_mine.mine.run_folder import RunError
from ovseg_mine.storage import first_line

log = logging.getLogger("ovseg_mine")

#: Seconds to wait for a cluster's head to accept a connection before giving up.
PROBE_TIMEOUT_S = 5.0
#: Ray's Python loggers, whose records go to the run's log (and, only when verbose, to the console).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")


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
        RunError: nothing answers there within ``timeout``, or ``auto`` finds no cluster; one line.
    """
    target = address.removeprefix("ray://")
    if target == "auto":
        import ray._private.services as services

        try:
            target = services.canonicalize_bootstrap_address("auto") or ""
        except (ConnectionError, ValueError) as exc:
            raise RunError(f"--ray-address auto: no Ray cluster on this machine ({first_line(exc)})") from exc
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RunError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RunError(
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


class _NativeStderr:
    """Point file descriptor 2 at ``path`` (what native code writes there lands in the run's log) and give Python's
    ``sys.stderr``, and the logging handlers that wrote to it, a copy of the console's descriptor."""

    def __init__(self, path: str) -> None:
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

    def restore(self) -> None:
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


_native_stderr: _NativeStderr | None = None


def init_ray(address: str | None, *, verbose: bool = False, log_handler: logging.Handler | None = None) -> bool:
    """Start a local Ray (loopback only) or join a cluster (see the module docstring).

    Args:
        address: ``--ray-address``; None: ``RAY_ADDRESS`` if set, else a new local Ray.
        verbose: leave Ray's log lines (and its workers' output) on the console too.
        log_handler: the run's log (:func:`ovseg_mine.mine.run_folder.run_log`), where Ray's log lines go.

    Returns:
        True when this call started or joined Ray (then call :func:`shutdown_ray`), False when Ray was up already.

    Raises:
        RunError: the cluster does not answer, or Ray cannot start; one line.
    """
    global _native_stderr
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
    if not verbose and log_path and _native_stderr is None:
        _native_stderr = _NativeStderr(log_path)
    options: dict[str, Any] = {"logging_level": logging.INFO, "log_to_driver": verbose}
    if join is None:
        options.update(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)
    else:
        options.update(address=join)
    try:
        ray.init(**options)
    except Exception as exc:  # Ray raises bare Exception on start-up timeouts, ConnectionError on bad addresses
        _restore_stderr()
        where = f"the Ray cluster at {join}" if join else "a local Ray"
        raise RunError(f"could not start or join {where}: {type(exc).__name__}: {first_line(exc)}") from exc
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
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return True


def _restore_stderr() -> None:
    global _native_stderr
    if _native_stderr is not None:
        _native_stderr.restore()
        _native_stderr = None


def shutdown_ray() -> None:
    """Shut down (or leave) the Ray that :func:`init_ray` started or joined; standard error goes back to the
    console and Ray's loggers stop writing to the run's log."""
    import ray

    try:
        ray.shutdown()
    finally:
        _restore_stderr()
        _route_ray_logs(None, console=True)
