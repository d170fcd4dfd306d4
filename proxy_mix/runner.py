"""Runs proxy tasks in this process or as Ray tasks, retrying a failed one once.

Each task reserves `cpus` CPUs (and `gpus` GPUs) from Ray's scheduler, so a local Ray with N CPUs
runs N / cpus proxies at once and a cluster spreads them over its nodes. A task that raises, or
whose worker dies, is submitted again up to `retries` times; after that it is reported as failed
with its last error, never dropped. `on_done(task, result)` is called in the driver as each task
settles, in completion order.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

Task = dict[str, Any]
Result = dict[str, Any]


def failure(task: Task, error: BaseException | str, attempts: int) -> Result:
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"id": task["id"], "status": "failed", "error": " ".join(str(message).split())[:2000],
            "attempts": attempts, "weights": task.get("weights")}


def run_local(tasks: list[Task], fn: Callable[[Task], Result], on_done: Callable[[Task, Result], None],
              retries: int = 1, progress: bool = True) -> None:
    for task in tqdm(tasks, desc="proxies", disable=not progress, leave=False):
        for attempt in range(1, retries + 2):
            try:
                result = fn({**task, "attempt": attempt})
            except Exception as e:  # noqa: BLE001 - any failure of one proxy is recorded, not fatal
                if attempt > retries:
                    on_done(task, failure(task, f"{type(e).__name__}: {e} | {_last_frame(e)}", attempt))
                continue
            on_done(task, result)
            break


def _last_frame(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    return f"at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def run_ray(tasks: list[Task], fn: Callable[[Task], Result], on_done: Callable[[Task, Result], None], *,
            address: str | None = None, workers: int | None = None, cpus: int = 1, gpus: float = 0.0,
            retries: int = 1, progress: bool = True) -> None:
    """Every task a Ray task; `address` joins a cluster, else a local Ray with `workers`·`cpus` CPUs
    (all of this machine's when `workers` is None)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False, "include_dashboard": False}
        if address:
            kwargs["address"] = address
        elif workers:
            kwargs["num_cpus"] = workers * cpus
            if gpus:
                kwargs["num_gpus"] = max(1, round(workers * gpus))
        ray.init(**kwargs)
        started = True
    try:
        # The driver retries (max_retries=0 here) so that a task raising an exception is retried too,
        # not only a dead worker, and the attempt number reaches the task.
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(fn)
        pending: dict[Any, tuple[Task, int]] = {}
        for task in tasks:
            pending[remote.remote({**task, "attempt": 1})] = (task, 1)
        with tqdm(total=len(tasks), desc="proxies", disable=not progress, leave=False) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                ref = done[0]
                task, attempt = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, ...
                    cause = getattr(e, "cause", None) or e
                    if attempt <= retries:
                        pending[remote.remote({**task, "attempt": attempt + 1})] = (task, attempt + 1)
                        continue
                    result = failure(task, cause, attempt)
                on_done(task, result)
                bar.update(1)
    finally:
        if started:
            ray.shutdown()


def run_tasks(tasks: list[Task], fn: Callable[[Task], Result], on_done: Callable[[Task, Result], None], *,
              executor: str = "ray", address: str | None = None, workers: int | None = None, cpus: int = 1,
              gpus: float = 0.0, retries: int = 1, progress: bool = True) -> None:
    if not tasks:
        return
    if executor == "local":
        run_local(tasks, fn, on_done, retries=retries, progress=progress)
    elif executor == "ray":
        run_ray(tasks, fn, on_done, address=address, workers=workers, cpus=cpus, gpus=gpus, retries=retries,
                progress=progress)
    else:
        raise ValueError(f"unknown executor {executor!r}: choose local or ray")
