"""How a criterion's granularity turns into structural edits, for a ratio or a MACs target.

A strategy is planned once (:meth:`plan`: what the steps aim at, whether the target is reachable) and
then stepped (:meth:`step`: one pruning step, returning its record and the surgery that replays it).
:class:`Channels` prunes widths with torch-pruning, searching the channel ratio on dry runs of deep
copies until the MACs land on the goal; :class:`Blocks` drops residual blocks. A measured latency
target has its own pair with the same interface (:mod:`deploycomp.prune.latency`).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

from deploycomp import console
from deploycomp.errors import UsageError
from deploycomp.prune.channels import module_macs, one_thread, prune_channels

if TYPE_CHECKING:
    from deploycomp.prune import _Context

MAX_RATIO = 0.95  # the largest channel ratio a target search may use
SEARCH_TOLERANCE = 0.005  # a search stops once MACs are within 0.5 % of the target
TARGET_TOLERANCE = 0.02  # targets must be reached within 2 %
RATIO_TOLERANCE_POINTS = 3.0  # a ratio's MACs reduction must land within 3 points of what it asks


class Channels:
    """Width pruning with torch-pruning, by ratio or by MACs target (searched on dry runs)."""

    def plan(self, ctx: _Context) -> None:
        cfg = ctx.cfg
        direct = cfg.ratio is not None and cfg.round_to == 1 and cfg.steps == 1
        if cfg.ratio is not None and not direct:
            asked = _dry_macs(ctx, ctx.ckpt.model, cfg.ratio, round_to=1)
            ctx.target_macs = asked
        elif cfg.target_macs_g is not None:
            ctx.target_macs = cfg.target_macs_g * 1e9
        elif cfg.target_speedup is not None:
            ctx.target_macs = ctx.macs0 / cfg.target_speedup
        if ctx.target_macs is not None:
            ctx.asked_reduction_pct = 100.0 * (1 - ctx.target_macs / ctx.macs0)
            if cfg.ratio is None:
                self._check_reachable(ctx)
        else:
            ctx.asked_reduction_pct = None  # direct: what the ratio asks is exactly what it does

    def _check_reachable(self, ctx: _Context) -> None:
        g = ctx.macs0 / 1e9
        t = ctx.target_macs
        if t >= ctx.macs0:
            raise UsageError(f"target {t / 1e9:.4g} G MACs is not below the model's {g:.4g} G MACs; "
                             "ask for less (or use --ratio)")
        floor = _dry_macs(ctx, ctx.ckpt.model, MAX_RATIO, ctx.cfg.round_to)
        if floor > t * (1 + TARGET_TOLERANCE):
            raise UsageError(f"target {t / 1e9:.4g} G MACs is unreachable: removing {MAX_RATIO:.0%} of the channels "
                             f"of every layer leaves {floor / 1e9:.4g} G MACs (from {g:.4g} G); ask for at least "
                             f"{floor / 1e9:.4g} G or a speed-up of at most {ctx.macs0 / floor:.3g}")

    def step(self, ctx: _Context, step: int) -> dict[str, Any]:
        cfg, model = ctx.cfg, ctx.ckpt.model
        if ctx.target_macs is None:
            ratio = cfg.ratio
            history = _prune_pass(ctx, model, ratio, cfg.round_to)
            return {"ratio": ratio, "surgery": {"op": "prune_channels", "history": history}}
        goal = ctx.macs0 - (ctx.macs0 - ctx.target_macs) * (step + 1) / cfg.steps
        if cfg.ratio is not None and cfg.steps == 1:  # the ratio itself is fine when within a point of what it asks
            ratio, macs, evals = _search_ratio(ctx, model, goal, first_guess=cfg.ratio, tolerance=0.01 * ctx.macs0)
        else:
            ratio, macs, evals = _search_ratio(ctx, model, goal)
        history = _prune_pass(ctx, model, ratio, cfg.round_to)
        if step == cfg.steps - 1:
            self._check_landing(ctx, macs)
        return {"ratio": ratio, "goal_macs": goal, "search_evaluations": evals,
                "surgery": {"op": "prune_channels", "history": history}}

    def _check_landing(self, ctx: _Context, macs: int) -> None:
        t = ctx.target_macs
        if ctx.cfg.ratio is not None:
            off = abs((t - macs) / ctx.macs0) * 100
            if off > RATIO_TOLERANCE_POINTS:
                msg = (f"with --round-to {ctx.cfg.round_to} the MACs reduction lands {off:.1f} points from the "
                       f"{ctx.asked_reduction_pct:.1f}% that --ratio {ctx.cfg.ratio} asks for; "
                       "use a smaller --round-to")
                console.warn(msg)
                ctx.notes.append(msg)
        elif abs(macs - t) / t > TARGET_TOLERANCE:
            msg = (f"reached {macs / 1e9:.4g} G MACs for a target of {t / 1e9:.4g} G (channel counts are multiples "
                   f"of {ctx.cfg.round_to}); use a smaller --round-to to get closer")
            console.warn(msg)
            ctx.notes.append(msg)


class Blocks:
    """Depth pruning: drop the residual blocks whose skipping raises the calibration loss least."""

    def plan(self, ctx: _Context) -> None:
        from deploycomp.prune.depth import removable_blocks

        names = removable_blocks(ctx.ckpt.model)
        if not names:
            raise UsageError(f"{ctx.ckpt.arch} has no residual blocks with an identity shortcut, so depth pruning "
                             "has nothing to remove; use a channel criterion such as --method magnitude")
        cfg = ctx.cfg
        if cfg.ratio is not None:
            ctx.n_remove = min(len(names), max(1, math.floor(cfg.ratio * len(names) + 0.5)))
            return
        ctx.target_macs = cfg.target_macs_g * 1e9 if cfg.target_macs_g is not None else ctx.macs0 / cfg.target_speedup
        ctx.asked_reduction_pct = 100.0 * (1 - ctx.target_macs / ctx.macs0)
        block_macs = module_macs(ctx.ckpt.model, ctx.example, names)
        floor = ctx.macs0 - sum(block_macs.values())
        if ctx.target_macs >= ctx.macs0 or floor > ctx.target_macs * (1 + TARGET_TOLERANCE):
            raise UsageError(f"target {ctx.target_macs / 1e9:.4g} G MACs is unreachable by dropping blocks: the model "
                             f"has {ctx.macs0 / 1e9:.4g} G MACs and at least {floor / 1e9:.4g} G remain with all "
                             f"{len(names)} removable blocks gone")
        ctx.block_macs = block_macs
        ctx.n_remove = None

    def step(self, ctx: _Context, step: int) -> dict[str, Any]:
        from deploycomp.metrics import count_macs
        from deploycomp.prune.depth import drop_blocks, removable_blocks

        model, cfg = ctx.ckpt.model, ctx.cfg
        names = removable_blocks(model)
        scores = ctx.criterion.block_scores(model, names)
        order = sorted(names, key=lambda n: scores[n])
        if ctx.n_remove is not None:
            k = math.floor(ctx.n_remove * (step + 1) / cfg.steps + 0.5) - ctx.removed
            chosen = order[:max(k, 0)]
            ctx.removed += len(chosen)
        else:
            goal = ctx.macs0 - (ctx.macs0 - ctx.target_macs) * (step + 1) / cfg.steps
            macs, chosen = count_macs(model, ctx.example), []
            for n in order:
                if macs <= goal * (1 + SEARCH_TOLERANCE):
                    break
                chosen.append(n)
                macs -= ctx.block_macs[n]
        drop_blocks(model, chosen)
        return {"blocks": chosen, "sensitivity": {n: scores[n] for n in order},
                "surgery": {"op": "drop_blocks", "blocks": chosen}}


STRATEGIES = {"channels": Channels, "blocks": Blocks}


def _prune_pass(ctx: _Context, model, ratio: float, round_to: int) -> list:
    return prune_channels(model, ctx.example, ctx.criterion, ratio, global_pruning=ctx.cfg.global_pruning,
                          round_to=round_to, ignore=ctx.ignored)


def _dry_macs(ctx: _Context, model, ratio: float, round_to: int) -> int:
    """MACs of a deep copy of ``model`` pruned at ``ratio`` (the model itself is untouched)."""
    from deploycomp.metrics import count_macs

    trial = copy.deepcopy(model)
    _prune_pass(ctx, trial, ratio, round_to)
    with one_thread():
        return count_macs(trial, ctx.example)


def _search_ratio(ctx: _Context, model, goal: float, first_guess: float | None = None, tolerance: float | None = None,
                  max_evals: int = 14) -> tuple[float, int, int]:
    """The channel ratio whose pruning of ``model`` lands closest to ``goal`` MACs (bisection on dry runs).

    Stops as soon as a dry run is within ``tolerance`` MACs of the goal (default: 0.5 % of the goal).
    """
    from deploycomp.metrics import count_macs

    now = count_macs(model, ctx.example)
    if goal >= now:
        return 0.0, now, 0
    round_to = ctx.cfg.round_to
    tried: dict[float, int] = {}

    def f(r: float) -> int:
        if r not in tried:
            tried[r] = _dry_macs(ctx, model, r, round_to)
        return tried[r]

    tolerance = SEARCH_TOLERANCE * goal if tolerance is None else tolerance
    lo, hi = 0.0, MAX_RATIO
    r = first_guess if first_guess is not None else min(MAX_RATIO, max(0.01, 1 - math.sqrt(goal / now)))
    for _ in range(max_evals):
        m = f(r)
        if abs(m - goal) <= tolerance:
            break
        if m > goal:
            lo = r
        else:
            hi = r
        if hi - lo < 1e-4:
            break
        r = (lo + hi) / 2
    best = min(tried, key=lambda k: (abs(tried[k] - goal), k))
    return best, tried[best], len(tried)
