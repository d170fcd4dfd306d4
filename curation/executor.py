"""Two executors behind one `map`: in-process (tests, debugging) and Ray (local or a cluster).

Steps never talk to Ray directly: anything parallel is `executor.map(fn, items)` over picklable
top-level functions and small items (shard paths, partition numbers). Large data moves through
files, so the same code runs in one process, on a local Ray, or on a cluster with a shared disk,
and gives the same output on each.

`map(..., resources={"cpus": 2, "gpus": 1, "memory_gb": 8})` says what each task needs (a phase
asks for the max over its steps, `curation.registry.phase_resources`): Ray reserves it per task,
so a GPU tagger gets a GPU and at most as many tasks run as the cluster can hold; the in-process
executor has nothing to reserve and ignores it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    name: str

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str = "",
            resources: dict[str, float] | None = None) -> list[R]:
        """Apply `fn` to every item; results in input order. `resources`: what each task needs."""
        ...

    def check_resources(self, resources: dict[str, float] | None) -> None:
        """Raise, before any work, if no worker could ever run a task needing `resources`."""
        ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    name = "local"

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str = "",
            resources: dict[str, float] | None = None) -> list[R]:
        # One task at a time in this process: there is nothing to reserve.
        return [fn(x) for x in tqdm(items, desc=desc or None, disable=not self.progress, leave=False)]

    def check_resources(self, resources: dict[str, float] | None) -> None:
        pass

    def shutdown(self) -> None:
        pass


class RayExecutor:
    """Runs each item as a Ray task (one CPU each by default).

    `address=None` starts an embedded local Ray (`ray.init()`); pass "auto" or "ray://host:port"
    to join a cluster. Items must be cheap to ship: paths and numbers, not documents.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        cpus_per_task: float = 1.0,
        progress: bool = True,
    ) -> None:
        import ray

        # Without this, ray.init() writes ~/.ray/auth_token on newer Ray versions.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        self._started_here = False
        if not ray.is_initialized():
            check_ray_address(address)
            kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False,
                                      "include_dashboard": False}
            if address:
                kwargs["address"] = address
            elif num_cpus:
                kwargs["num_cpus"] = num_cpus
            try:
                ray.init(**kwargs)
            except ConnectionError as e:  # the probe passed but the head refused us
                if not address:
                    raise
                raise RayUnavailableError(_no_cluster(address, str(e).split("\n")[0])) from e
            self._started_here = True
        self.cpus_per_task = cpus_per_task
        self.progress = progress

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str = "",
            resources: dict[str, float] | None = None) -> list[R]:
        import ray

        self.check_resources(resources)
        # ray.remote() refuses functools.partial; ship the callable once and apply it remotely.
        options = ray_task_options(resources, default_cpus=self.cpus_per_task)
        remote_apply = ray.remote(max_retries=2, **options)(_apply)
        fn_ref = ray.put(fn)
        refs = [remote_apply.remote(fn_ref, x) for x in items]
        pending = list(refs)
        with tqdm(total=len(refs), desc=desc or None, disable=not self.progress, leave=False) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        return ray.get(refs)

    def check_resources(self, resources: dict[str, float] | None) -> None:
        """Refuse a task no node can hold (Ray would queue it forever): each resource asked for
        must fit on one alive node."""
        import ray

        options = ray_task_options(resources, default_cpus=self.cpus_per_task)
        wanted = {"CPU": options["num_cpus"], "GPU": options.get("num_gpus", 0),
                  "memory": options.get("memory", 0)}
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if any(all(node.get(k, 0) >= v for k, v in wanted.items() if v) for node in nodes):
            return
        total = ray.cluster_resources()
        asked = ", ".join(_show(k, v) for k, v in wanted.items() if v)
        largest = ", ".join(_show(k, max((n.get(k, 0) for n in nodes), default=0)) for k in ("CPU", "GPU", "memory"))
        raise InsufficientResourcesError(
            f"each task asks for {asked}, but no node of the Ray cluster has that much (largest node: {largest}; "
            f"cluster: {_show('CPU', total.get('CPU', 0))}, {_show('GPU', total.get('GPU', 0))}); lower the "
            "steps' `resources:` in the config or run on a cluster with bigger nodes")

    def shutdown(self) -> None:
        import ray

        if self._started_here and ray.is_initialized():
            ray.shutdown()


class RayUnavailableError(RuntimeError):
    """The Ray cluster asked for cannot be reached; the message says what to do."""


class InsufficientResourcesError(RayUnavailableError):
    """Tasks ask for more CPUs, GPUs or memory than any node of the cluster has."""


def ray_task_options(resources: dict[str, float] | None, default_cpus: float = 1.0) -> dict[str, Any]:
    """A step's `resources` (cpus, gpus, memory_gb) as Ray task options (num_cpus, num_gpus, memory
    in bytes); CPUs default to `default_cpus`, the rest to nothing reserved."""
    resources = resources or {}
    options: dict[str, Any] = {"num_cpus": resources.get("cpus", default_cpus)}
    if resources.get("gpus"):
        options["num_gpus"] = resources["gpus"]
    if resources.get("memory_gb"):
        options["memory"] = int(resources["memory_gb"] * 1024**3)
    return options


def _show(key: str, amount: float) -> str:
    if key == "memory":
        return f"{amount / 1024**3:.1f} GB memory"
    return f"{amount:g} {key}s"


# Seconds to wait for a TCP connect: a live head answers in milliseconds, even across a data centre.
PROBE_TIMEOUT_S = 5.0
# Ports Ray listens on when an address names none: the GCS for `host`, the client server for ray://.
GCS_PORT, CLIENT_PORT = 6379, 10001


def _no_cluster(address: str, why: str, from_env: bool = False) -> str:
    fix = "unset RAY_ADDRESS" if from_env else "drop --ray-address"
    return (f"no Ray cluster at {address} ({why}); start one with `ray start --head` "
            f"or {fix} to use a local Ray")


def check_ray_address(address: str | None) -> None:
    """Fail in seconds, with what to do, when `address` has no Ray cluster behind it.

    ray.init retries an unreachable GCS for minutes, and `auto` without a cluster ends in a
    ConnectionError traceback; a TCP connect to the port ray.init will dial answers both at once.
    `None` means an embedded local Ray, unless RAY_ADDRESS names a cluster (ray.init joins it).
    """
    from_env = not address and bool(os.environ.get("RAY_ADDRESS"))
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "local":
        return
    try:
        host, port = _dial_target(address)
    except ConnectionError:  # `auto`: neither RAY_ADDRESS, a recorded `ray start`, nor a GCS process
        raise RayUnavailableError(_no_cluster(address, "no running cluster found on this machine", from_env)) from None
    except ValueError:
        raise RayUnavailableError(f"cannot read Ray address {address!r}; write host:port (the head's GCS "
                                  "port, 6379 by default), ray://host:10001 or auto") from None
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise RayUnavailableError(_no_cluster(address, f"{why} at {host}:{port}", from_env)) from None


def _dial_target(address: str) -> tuple[str, int]:
    """The host and port ray.init will connect to for `address`."""
    if address.startswith("ray://"):  # Ray client: the head's client server
        rest = address.removeprefix("ray://").split("/", 1)[0]
        return _host_port(rest, CLIENT_PORT)
    if address != "auto":
        _host_port(address, GCS_PORT)  # an empty host fails here, before Ray logs a traceback
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # a Ray without this private helper: dial the address as written
        return _host_port(address, GCS_PORT)
    # Resolves `auto` (raising ConnectionError when nothing runs) and, like ray.init, replaces
    # localhost by the node's IP, which is where a head started here listens.
    target = canonicalize_bootstrap_address(address)
    if target is None:
        raise ConnectionError(address)
    return _host_port(target, GCS_PORT)


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or host.endswith(":"):  # no port (IPv6 literals are bracketed)
        host, port = address, str(default_port)
    if not host:
        raise ValueError(address)
    return host.strip("[]"), int(port)


def _apply(fn: Callable[[T], R], item: T) -> R:
    return fn(item)


def make_executor(kind: str = "local", ray_address: str | None = None, progress: bool = True) -> Executor:
    if kind == "local":
        return LocalExecutor(progress=progress)
    if kind == "ray":
        return RayExecutor(address=ray_address, progress=progress)
    raise ValueError(f"unknown executor {kind!r}: choose 'local' or 'ray'")
