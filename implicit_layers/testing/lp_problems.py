"""The grid shortest-path LP (PyEPO's benchmark problem), for the LP tests, experiment and benchmark.

On a ``rows × cols`` grid whose arcs point right and down, the shortest path from the top-left
node to the bottom-right node is the min-cost unit flow

    min cᵀx   s.t.  Nx = d,  x ≥ 0,      N the node-arc incidence matrix (+1 head, −1 tail),
                                         d = −1 at the source, +1 at the sink, 0 elsewhere.

The graph is acyclic, so ``x ≤ 1`` holds automatically and every vertex of the polytope is a
path. The rows of ``N`` sum to zero: one is redundant (rank ``rows·cols − 1``).
"""

from __future__ import annotations

from itertools import combinations

import torch


def grid_arcs(rows: int, cols: int) -> list[tuple[int, int]]:
    """The arcs ``(tail, head)`` of the grid, nodes numbered row by row, in PyEPO's order (for
    each row, its rightward arcs, then the downward arcs leaving it)."""
    arcs = []
    for i in range(rows):
        arcs += [(i * cols + j, i * cols + j + 1) for j in range(cols - 1)]
        if i < rows - 1:
            arcs += [(i * cols + j, (i + 1) * cols + j) for j in range(cols)]
    return arcs


def shortest_path_lp(grid=(5, 5), *, drop_redundant: bool = True, dtype=torch.float64,
                     device=None):
    """``(A, b, G, h)`` of the grid shortest-path LP (``G = −I, h = 0``: ``x ≥ 0``).

    ``drop_redundant=True`` removes the sink's conservation row, which the other rows imply,
    so that ``A`` has full row rank.
    """
    rows, cols = grid
    arcs = grid_arcs(rows, cols)
    n, nodes = len(arcs), rows * cols
    kw = {"dtype": dtype, "device": device}
    A = torch.zeros(nodes, n, **kw)
    for k, (tail, head) in enumerate(arcs):
        A[head, k], A[tail, k] = 1.0, -1.0
    b = torch.zeros(nodes, **kw)
    b[0], b[-1] = -1.0, 1.0
    if drop_redundant:
        A, b = A[:-1], b[:-1]
    return A, b, -torch.eye(n, **kw), torch.zeros(n, **kw)


def grid_paths(grid=(5, 5), dtype=torch.float64) -> torch.Tensor:
    """Every source-to-sink path as a 0/1 arc vector, ``(C(rows + cols − 2, rows − 1), n)``:
    a brute-force reference for the LP (its optimum is the cheapest of these)."""
    rows, cols = grid
    index = {arc: k for k, arc in enumerate(grid_arcs(rows, cols))}
    steps = rows + cols - 2
    paths = []
    for downs in combinations(range(steps), rows - 1):
        x, node = torch.zeros(len(index), dtype=dtype), 0
        for s in range(steps):
            nxt = node + cols if s in downs else node + 1
            x[index[(node, nxt)]] = 1.0
            node = nxt
        paths.append(x)
    return torch.stack(paths)
