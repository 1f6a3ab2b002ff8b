"""Globus Compute: block tasks run on a Globus Compute endpoint (e.g. Polaris GPUs), stitching in the driver.

``laueflow run SCAN --site globus-compute --endpoint UUID`` sends every block task through the Globus
Compute SDK's ``Executor`` (wrapped by Parsl's ``GlobusComputeExecutor``); the rest of the task graph,
stitching and writing the point files, stays in the driver.  Options (keyword, else
``LAUEFLOW_GLOBUS_COMPUTE_<OPTION>``, else the default): see ``laueflow sites show globus-compute``.
``account``, ``queue``, ``walltime``, ``nodes``, ``max_blocks`` and ``worker_init`` are variables of
the endpoint's configuration template (``laueflow/sites/endpoints/polaris/``, shipped with the package),
sent as ``user_endpoint_config``.
The endpoint must run the same Python, Parsl, globus-compute-sdk and laueflow versions as the driver.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any

from parsl.config import Config
from parsl.executors import GlobusComputeExecutor

from ..errors import SiteError
from .base import COMMON_OPTIONS, Option, assemble, option_env_var, resolve_options

try:
    import globus_compute_sdk
except ImportError:  # an optional dependency (laueflow[globus]): config() says so; the site still lists
    globus_compute_sdk = None

SITE = "globus-compute"
TEMPLATE_VARIABLES = ("account", "queue", "walltime", "nodes", "max_blocks", "worker_init")

# name: (default, type, help); None means required.  Empty / 0 template variables are not sent, so the
# endpoint template's own defaults apply.
OPTIONS: dict[str, Option] = {
    "endpoint": (None, str, "Globus Compute endpoint UUID (required; `laueflow run --endpoint UUID`)"),
    "account": ("", str, "template variable: PBS project to charge"),
    "queue": ("", str, "template variable: PBS queue (debug, debug-scaling, prod, preemptable, demand)"),
    "walltime": ("", str, "template variable: walltime of each batch job (HH:MM:SS)"),
    "nodes": (0, int, "template variable: nodes per batch job"),
    "max_blocks": (0, int, "template variable: most batch jobs at once"),
    "worker_init": ("", str, "template variable: shell lines that activate laueflow's environment"),
    "user_endpoint_config": ("", str, "further template variables, as a JSON object"),
    "amqp_port": (0, int, "port of the result stream: 443, 5671 or 5672 (0: the SDK's default)"),
    "batch_size": (128, int, "tasks per request to the Globus Compute service"),
    "retries": COMMON_OPTIONS["retries"],
    "stitch_threads": COMMON_OPTIONS["stitch_threads"],
}

LOGIN_HINT = ("log in once in a terminal (the Globus Compute SDK asks for it on first use, e.g. "
              "`python -c 'import globus_compute_sdk as g; g.Client()'`), or set GLOBUS_COMPUTE_CLIENT_ID "
              "and GLOBUS_COMPUTE_CLIENT_SECRET for a service account")


env_var = partial(option_env_var, SITE)


class RemoteTaskError(RuntimeError):
    """A task that failed outside its own code: on the endpoint (it could not unpack or run the task, a
    worker was lost) or on the way (submission, login).  The message is one line, the last line of the
    endpoint's traceback plus the Globus Compute task ID; ``remote_traceback`` keeps the whole traceback
    and ``__cause__`` the SDK's exception.  (A task's own exceptions come back as they were raised.)
    """

    def __init__(self, message: str, remote_traceback: str = ""):
        super().__init__(message)
        self.remote_traceback = remote_traceback


def _one_line(exc: BaseException) -> tuple[str, str]:
    """The last line of the endpoint's traceback (or the local error's first line), and the traceback."""
    remote = getattr(exc, "remote_data", None)
    if isinstance(remote, str) and remote.strip():
        return remote.strip().splitlines()[-1].strip(), remote
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}", ""


class EndpointExecutor(GlobusComputeExecutor):
    """Parsl's GlobusComputeExecutor whose failed tasks raise a one-line :class:`RemoteTaskError` (the
    SDK's ``TaskExecutionFailed`` carries the endpoint's whole traceback in its message)."""

    def submit(self, func: Callable, resource_specification: dict[str, Any], *args: Any,
               **kwargs: Any) -> Future:
        remote = super().submit(func, resource_specification, *args, **kwargs)
        settled: Future = Future()

        def settle(done: Future) -> None:
            if done.cancelled():
                settled.cancel()
                return
            exc = done.exception()
            if exc is None:
                settled.set_result(done.result())
                return
            line, trace = _one_line(exc)
            task = getattr(done, "task_id", None)
            error = RemoteTaskError(line + (f" (Globus Compute task {task})" if task else ""), trace)
            error.__cause__ = exc
            settled.set_exception(error)

        remote.add_done_callback(settle)
        return settled


def _endpoint_config(opts: dict) -> dict[str, Any]:
    """The template variables to send: the JSON option, then the named ones that are set."""
    extra: dict[str, Any] = {}
    if opts["user_endpoint_config"]:
        try:
            extra = json.loads(opts["user_endpoint_config"])
        except json.JSONDecodeError as exc:
            raise SiteError(f"{SITE} site: option user_endpoint_config ({env_var('user_endpoint_config')}) "
                            f"is not valid JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise SiteError(f"{SITE} site: option user_endpoint_config must be a JSON object, "
                            f"not {type(extra).__name__}")
    for name in TEMPLATE_VARIABLES:
        if opts[name]:
            extra[name] = opts[name]
    return extra


def config(workers: int | None = None, run_dir: str = "runinfo", **options) -> Config:
    """A Parsl configuration whose ``decode`` executor is a Globus Compute endpoint.

    ``workers`` does not apply: the endpoint's configuration decides how many workers run.
    """
    opts = resolve_options(SITE, OPTIONS, options)
    if workers is not None:
        raise SiteError(f"{SITE} site: the endpoint's configuration sets the number of workers "
                        "(max_workers_per_node); run without --workers")
    try:
        endpoint = str(uuid.UUID(opts["endpoint"]))
    except ValueError:
        raise SiteError(f"{SITE} site: endpoint {opts['endpoint']!r} is not a Globus Compute endpoint UUID "
                        f"(option endpoint, {env_var('endpoint')})") from None
    template = _endpoint_config(opts)
    if globus_compute_sdk is None:
        raise SiteError(f"{SITE} site: needs globus-compute-sdk: pip install 'laueflow[globus]'")
    kwargs: dict[str, Any] = {"endpoint_id": endpoint, "user_endpoint_config": template or None,
                              "batch_size": opts["batch_size"], "label": "laueflow"}
    if opts["amqp_port"]:
        kwargs["amqp_port"] = opts["amqp_port"]
    try:
        executor = globus_compute_sdk.Executor(**kwargs)
    except Exception as exc:  # no login, no network, a service error: all stop the run before it starts
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SiteError(f"{SITE} site: cannot start the Globus Compute client ({type(exc).__name__}: "
                        f"{text}); {LOGIN_HINT}") from exc
    decode = EndpointExecutor(executor=executor, label="decode")
    return assemble(decode, run_dir, opts["stitch_threads"], opts["retries"])
