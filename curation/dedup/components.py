"""Connected components of an edge list that no single node holds: alternating Large-Star and
Small-Star steps (Kiveris, Lattanzi, Mirrokni, Rastogi, Vassilvitskii, "Connected Components in
MapReduce and Beyond", SoCC 2014), each step one `executor.map` over hash partitions, through files.

Edges are kept in both directions, (u, v) and (v, u), in the partition of u, so a task sees every
neighbour of the nodes it owns. With m(u) the smallest of u and its neighbours:
- Large-Star: for every neighbour v > u, the edge (v, m(u)): u's larger neighbours hook onto
  the smallest node they can see through u;
- Small-Star: for every neighbour v < u, and for u itself, the edge (v, m(u)): u and its smaller
  neighbours hook onto their minimum.
Both keep each component connected and only ever move edges towards smaller nodes; their common
fixed point is a forest of stars, each centred on its component's smallest node (the paper proves
termination in O(log² n) rounds; minimum-hooking halves a chain every round or so, so measured
rounds grow with log n). A node's label is then the smallest of itself and its neighbours: its
component's smallest key, as an in-memory union-find with smallest-key roots would give.

Convergence is checked exactly, not by a digest: each task compares its partition of the edges it
received with its partition of the step before; two unchanged steps in a row (one of each kind)
mean a fixed point of both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from curation.dedup.cluster import key_partition, read_partition, write_partitioned
from curation.executor import Executor

EDGE_SCHEMA = pa.schema([("u", pa.int64()), ("v", pa.int64())])
# Far beyond what any graph needs (a 10⁶-node chain in random key order takes ~40 steps); a bound
# so that a bug cannot loop forever.
MAX_STEPS = 400


def step_dir(root: Path | str, step: int) -> Path:
    return Path(root) / f"e{step:05d}"


def write_edges(a: np.ndarray, b: np.ndarray, root: Path | str, partitions: int, source: int) -> None:
    """Write undirected edges (a[i], b[i]) as the input of step 0 (or any step): both directions,
    each in the partition of its first node. Self-loops are dropped."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    keep = a != b
    u = np.concatenate([a[keep], b[keep]])
    v = np.concatenate([b[keep], a[keep]])
    if len(u):
        write_partitioned(pa.table({"u": u, "v": v}, schema=EDGE_SCHEMA), key_partition(u, partitions),
                          Path(root), source)


def unique_edges(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Edges sorted by (u, v), each once."""
    u, v = table["u"].to_numpy(), table["v"].to_numpy()
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    first = np.concatenate([[True], (u[1:] != u[:-1]) | (v[1:] != v[:-1])]) if len(u) else np.ones(0, bool)
    return u[first], v[first]


def smallest_seen(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """m(u) per edge row, for edges sorted by (u, v): the smaller of u and its first neighbour."""
    if not len(u):
        return u
    starts = np.flatnonzero(np.concatenate([[True], u[1:] != u[:-1]]))
    group = np.cumsum(np.concatenate([[True], u[1:] != u[:-1]])) - 1
    return np.minimum(u, v[starts][group])


def node_labels(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """At the fixed point: each node of this partition and its component's smallest key."""
    u, v = unique_edges(table)
    m = smallest_seen(u, v)
    first = np.concatenate([[True], u[1:] != u[:-1]]) if len(u) else np.ones(0, bool)
    return u[first], m[first]


def _star_task(task: tuple[int, str, int, int]) -> dict[str, int | bool]:
    """One partition, one step: Large-Star on even steps, Small-Star on odd ones."""
    p, root, step, partitions = task
    u, v = unique_edges(read_partition(step_dir(root, step), p, EDGE_SCHEMA))
    changed = True
    if step > 0:
        pu, pv = unique_edges(read_partition(step_dir(root, step - 1), p, EDGE_SCHEMA))
        changed = not (np.array_equal(u, pu) and np.array_equal(v, pv))
    m = smallest_seen(u, v)
    if step % 2 == 0:  # Large-Star
        larger = v > u
        a, b = v[larger], m[larger]
    else:  # Small-Star: the smaller neighbours, and u itself once
        smaller = v < u
        first = np.concatenate([[True], u[1:] != u[:-1]]) if len(u) else np.ones(0, bool)
        a = np.concatenate([v[smaller], u[first]])
        b = np.concatenate([m[smaller], m[first]])
    write_edges(a, b, step_dir(root, step + 1), partitions, p)
    return {"changed": changed, "edges": len(u)}


def label_components(root: Path | str, partitions: int, executor: Executor, desc: str = "components") -> Path:
    """Run the steps over the edges written to `step_dir(root, 0)` (by `write_edges`) until the
    fixed point; return the folder whose partition p holds, for every node u with
    `key_partition(u) == p`, its star edges (read them with `node_labels`). Folders of earlier
    steps are removed as the steps advance."""
    unchanged = 0
    for step in range(MAX_STEPS):
        results = executor.map(_star_task, [(p, str(root), step, partitions) for p in range(partitions)],
                               desc=f"{desc}: step {step}")
        if step >= 2:
            shutil.rmtree(step_dir(root, step - 2), ignore_errors=True)
        unchanged = 0 if any(r["changed"] for r in results) else unchanged + 1
        if unchanged == 2:
            shutil.rmtree(step_dir(root, step + 1), ignore_errors=True)
            return step_dir(root, step)
    raise RuntimeError(f"connected components did not converge in {MAX_STEPS} steps")
