"""Choose one option per group that keeps the most value within a latency budget.

This is the allocator of latency-aware pruning (:mod:`deploycomp.prune.latency`). Each *group* (a set
of channels torch-pruning removes together, or a residual block for depth pruning) takes one of a few
options (candidate widths, or keep / drop). Option ``o`` of group ``g`` keeps value ``values[g][o]``
(the summed importance of the channels kept). The predicted latency of the network is a constant plus
one *term* per layer, read from a measured table indexed by the option of the layer's input group and
the option of its output group (NetAdapt's per-layer lookup tables, Yang et al., arXiv:1804.03230).
Maximise the total value subject to latency <= budget.

With every term depending on one group only, this is a multiple-choice knapsack, and
:func:`knapsack` solves it exactly by dynamic programming over the Pareto frontier of (latency, value)
(exact as long as the frontier stays under ``max_states``; above it, states are thinned by latency
buckets). A layer whose input and output widths both vary couples two groups. As HALP does (Shen et al.,
"Structural Pruning via Latency-Saliency Knapsack", arXiv:2110.10811), such a term is charged to its
output group with the input group held at the current solution; the knapsack is solved, the solution
becomes the current one, and this repeats until it stops changing. Every solution is then checked
against the exact, coupled prediction: shrunk greedily (least value lost per millisecond saved) while it
is over the budget, and grown greedily (most value gained per millisecond spent) while an option still
fits. The best solution that fits is returned.

Pure numpy: nothing here measures or prunes, so it is tested on synthetic tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

MAX_STATES = 20000  # Pareto states kept per group before thinning by latency buckets
MAX_ROUNDS = 8  # re-linearisations of the coupled terms
EPS = 1e-12


@dataclass
class Term:
    """The latency of one layer: ``table[i, o]`` for option ``i`` of group ``inp``, ``o`` of group ``out``.

    ``None`` for a side whose width is fixed (that axis of the table has length 1). ``inp == out``
    (a depthwise convolution, whose input and output channels are the same group) reads the diagonal.
    """

    inp: int | None
    out: int | None
    table: np.ndarray  # (options of inp or 1, options of out or 1), milliseconds

    def at(self, choice: Sequence[int]) -> float:
        i = choice[self.inp] if self.inp is not None else 0
        o = choice[self.out] if self.out is not None else 0
        return float(self.table[i, o])


@dataclass
class Problem:
    """Groups with options, their values, and the latency terms that depend on them."""

    values: list[np.ndarray]  # per group: value kept by each option
    terms: list[Term]
    constant: float = 0.0  # latency that no option changes (ms)
    _touching: list[list[Term]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.values = [np.asarray(v, dtype=np.float64) for v in self.values]
        for t in self.terms:
            t.table = np.atleast_2d(np.asarray(t.table, dtype=np.float64))
            rows = len(self.values[t.inp]) if t.inp is not None else 1
            cols = len(self.values[t.out]) if t.out is not None else 1
            if t.table.shape != (rows, cols):
                raise ValueError(f"a term's table has shape {t.table.shape}, its groups need {(rows, cols)}")
        self._touching = [[t for t in self.terms if g in (t.inp, t.out)] for g in range(len(self.values))]

    @property
    def widest(self) -> list[int]:
        """The last option of every group (the unpruned network when options are ascending widths)."""
        return [len(v) - 1 for v in self.values]

    @property
    def narrowest(self) -> list[int]:
        return [0] * len(self.values)

    def latency(self, choice: Sequence[int]) -> float:
        return self.constant + sum(t.at(choice) for t in self.terms)

    def value(self, choice: Sequence[int]) -> float:
        return float(sum(v[o] for v, o in zip(self.values, choice, strict=True)))

    def delta(self, choice: list[int], g: int, option: int) -> float:
        """Exact change of the predicted latency when group ``g`` switches to ``option``."""
        old = choice[g]
        before = sum(t.at(choice) for t in self._touching[g])
        choice[g] = option
        after = sum(t.at(choice) for t in self._touching[g])
        choice[g] = old
        return after - before

    def linearised(self, current: Sequence[int]) -> tuple[list[np.ndarray], float]:
        """Per-group option costs with every coupled term charged to its output group at ``current``
        input widths, and the latency no group changes (HALP's cost of a neuron group)."""
        costs = [np.zeros(len(v)) for v in self.values]
        fixed = self.constant
        for t in self.terms:
            if t.inp is None and t.out is None:
                fixed += float(t.table[0, 0])
            elif t.inp == t.out:
                costs[t.out] += np.diag(t.table)
            elif t.out is not None:
                costs[t.out] += t.table[current[t.inp] if t.inp is not None else 0, :]
            else:
                costs[t.inp] += t.table[:, 0]
        return costs, fixed


@dataclass
class Allocation:
    choice: list[int]  # option of each group
    value: float
    latency: float  # predicted, exact (coupled) model
    feasible: bool  # latency <= budget
    rounds: int  # knapsack rounds run


def knapsack(values: Sequence[np.ndarray], costs: Sequence[np.ndarray], budget: float,
             max_states: int = MAX_STATES) -> list[int] | None:
    """The option per group with the largest total value whose total cost is <= ``budget`` (None: none fits).

    Dynamic programming over the Pareto frontier of (cost, value): after each group only the states that
    no other state beats on both cost and value are kept, and states that cannot fit even with the
    cheapest options of the remaining groups are dropped. Exact unless a frontier exceeds ``max_states``.
    Ties go to the cheaper solution.
    """
    n = len(values)
    mins = np.array([float(np.min(c)) for c in costs] + [0.0])
    rest = np.cumsum(mins[::-1])[::-1]  # rest[g]: cheapest cost of groups g.. n-1
    if rest[0] > budget + EPS:
        return None
    cost, value = np.zeros(1), np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for g in range(n):
        c, v = np.asarray(costs[g], dtype=np.float64), np.asarray(values[g], dtype=np.float64)
        k = len(c)
        tc = (cost[:, None] + c[None, :]).ravel()
        tv = (value[:, None] + v[None, :]).ravel()
        parent = np.repeat(np.arange(len(cost)), k)
        option = np.tile(np.arange(k), len(cost))
        ok = tc + rest[g + 1] <= budget + EPS
        tc, tv, parent, option = tc[ok], tv[ok], parent[ok], option[ok]
        order = np.lexsort((-tv, tc))  # by cost, then best value first
        tc, tv, parent, option = tc[order], tv[order], parent[order], option[order]
        best_before = np.concatenate([[-np.inf], np.maximum.accumulate(tv)[:-1]])
        keep = tv > best_before + EPS  # strictly better than every cheaper state: on the frontier
        tc, tv, parent, option = tc[keep], tv[keep], parent[keep], option[keep]
        if len(tc) > max_states:  # thin: the best (last) state of each latency bucket survives
            bucket = np.floor(tc / (max(budget, EPS) / max_states)).astype(np.int64)
            last = np.append(bucket[1:] != bucket[:-1], True)
            tc, tv, parent, option = tc[last], tv[last], parent[last], option[last]
        cost, value = tc, tv
        back.append((parent, option))
    s = int(np.argmax(value))
    choice = [0] * n
    for g in range(n - 1, -1, -1):
        parent, option = back[g]
        choice[g] = int(option[s])
        s = int(parent[s])
    return choice


def _shrink(problem: Problem, choice: list[int], budget: float) -> None:
    """Step groups down one option at a time, least value lost per millisecond saved first, until it fits."""
    lat = problem.latency(choice)
    while lat > budget + EPS:
        best = None
        for g, o in enumerate(choice):
            if o == 0:
                continue
            saved = -problem.delta(choice, g, o - 1)
            if saved <= EPS:
                continue
            lost = problem.values[g][o] - problem.values[g][o - 1]
            key = (lost / saved, -saved)
            if best is None or key < best[0]:
                best = (key, g, saved)
        if best is None:
            return  # nothing left that saves latency
        _, g, saved = best
        choice[g] -= 1
        lat -= saved


def _grow(problem: Problem, choice: list[int], budget: float) -> None:
    """Step groups up one option at a time, most value per millisecond first, while the budget allows."""
    lat = problem.latency(choice)
    while True:
        best = None
        for g, o in enumerate(choice):
            if o + 1 >= len(problem.values[g]):
                continue
            added = problem.delta(choice, g, o + 1)
            gained = problem.values[g][o + 1] - problem.values[g][o]
            if lat + added > budget + EPS or gained <= EPS:
                continue
            key = (gained / max(added, EPS), gained)
            if best is None or key > best[0]:
                best = (key, g, added)
        if best is None:
            return
        _, g, added = best
        choice[g] += 1
        lat += added


def _exchange(problem: Problem, choice: list[int], budget: float, max_passes: int = 20) -> None:
    """Local search: move one group down an option and another up one, whenever that fits and keeps more
    value; repeated until no such exchange helps (the coupled terms make single steps short-sighted)."""
    lat = problem.latency(choice)
    for _ in range(max_passes):
        best = None
        for g, o in enumerate(choice):
            if o == 0:
                continue
            lost = problem.values[g][o] - problem.values[g][o - 1]
            d_down = problem.delta(choice, g, o - 1)
            choice[g] = o - 1
            for h, q in enumerate(choice):
                if h == g or q + 1 >= len(problem.values[h]):
                    continue
                gained = problem.values[h][q + 1] - problem.values[h][q]
                if gained <= lost + EPS:
                    continue
                d_up = problem.delta(choice, h, q + 1)
                if lat + d_down + d_up <= budget + EPS and (best is None or gained - lost > best[0]):
                    best = (gained - lost, g, h, d_down + d_up)
            choice[g] = o
        if best is None:
            return
        _, g, h, d = best
        choice[g] -= 1
        choice[h] += 1
        lat += d
        _grow(problem, choice, budget)
        lat = problem.latency(choice)


def allocate(problem: Problem, budget: float, rounds: int = MAX_ROUNDS) -> Allocation:
    """The options that keep the most value with a predicted latency <= ``budget`` (see the module doc).

    The coupled terms are linearised first at the widest options, then again from the narrowest (two
    starting points of the same fixed-point iteration); the best solution of either wins. When even the
    narrowest options exceed the budget, returns them with ``feasible`` False.
    """
    best: Allocation | None = None
    done = 0
    for start in (problem.widest, problem.narrowest):
        current = list(start)
        seen: set[tuple[int, ...]] = set()
        for _ in range(rounds):
            done += 1
            costs, fixed = problem.linearised(current)
            choice = knapsack(problem.values, costs, budget - fixed)
            if choice is None:
                choice = problem.narrowest
            _shrink(problem, choice, budget)
            _grow(problem, choice, budget)
            _exchange(problem, choice, budget)
            lat = problem.latency(choice)
            cand = Allocation(choice, problem.value(choice), lat, lat <= budget + EPS, done)
            if cand.feasible and (best is None or (cand.value, -cand.latency) > (best.value, -best.latency)):
                best = cand
            if tuple(choice) in seen:
                break
            seen.add(tuple(choice))
            current = choice
    if best is None:
        narrow = problem.narrowest
        return Allocation(narrow, problem.value(narrow), problem.latency(narrow), False, done)
    best.rounds = done
    return best
