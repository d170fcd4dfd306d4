"""Two executors behind one `map`: in-process (tests, debugging) and Ray (local or a cluster).

Steps never talk to Ray directly: anything parallel is `executor.map(fn, items)` over picklable
top-level functions and small items (shard paths, partition numbers). Large data moves through
files, so the same code runs in one process, on a local Ray, or on a cluster with a shared disk,
and gives the same output on each.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    name: str

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str = "") -> list[R]:
        """Apply `fn` to every item; results in input order."""
        ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    name = "local"

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str = "") -> list[R]:
        return [fn(x) for x in tqdm(items, desc=desc or None, disable=not self.progress, leave=False)]

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
            kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False,
                                      "include_dashboard": False}
            if address:
                kwargs["address"] = address
            elif num_cpus:
                kwargs["num_cpus"] = num_cpus
            ray.init(**kwargs)
            self._started_here = True
        self.cpus_per_task = cpus_per_task
        self.progress = progress

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str = "") -> list[R]:
        import ray

        # ray.remote() refuses functools.partial; ship the callable once and apply it remotely.
        remote_apply = ray.remote(num_cpus=self.cpus_per_task, max_retries=2)(_apply)
        fn_ref = ray.put(fn)
        refs = [remote_apply.remote(fn_ref, x) for x in items]
        pending = list(refs)
        with tqdm(total=len(refs), desc=desc or None, disable=not self.progress, leave=False) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        return ray.get(refs)

    def shutdown(self) -> None:
        import ray

        if self._started_here and ray.is_initialized():
            ray.shutdown()


def _apply(fn: Callable[[T], R], item: T) -> R:
    return fn(item)


def make_executor(kind: str = "local", ray_address: str | None = None, progress: bool = True) -> Executor:
    if kind == "local":
        return LocalExecutor(progress=progress)
    if kind == "ray":
        return RayExecutor(address=ray_address, progress=progress)
    raise ValueError(f"unknown executor {kind!r}: choose 'local' or 'ray'")
