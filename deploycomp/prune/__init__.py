"""Structured pruning on torch-pruning: channel criteria, depth pruning, targets, fine-tuning.

Library entry points:

- :func:`prune_checkpoint` prunes a loaded checkpoint (its model is edited in place), fine-tunes it
  with the shared :func:`deploycomp.train.fit`, and returns the pruned checkpoint and a JSON-able record;
- :func:`run_prune` loads the model and data, calls it, and writes the checkpoint and its sidecar.

What a ratio asks for. A channel ratio ``r`` removes the fraction ``r`` of every prunable layer's output
channels (layer-wise) or of all of them ranked together (``global_pruning``). The MACs reduction it
*asks* for is the one the same pruning achieves with exact channel counts (``round_to=1``), measured
on a dry run; for layer-wise pruning of a plain CNN that is about ``1 - (1 - r)^2``, since both the
input and the output channels of a convolution shrink. torch-pruning rounds each layer's kept count
*down* to a multiple of ``round_to``, which overshoots; the ratio is then re-searched (bisection on
dry runs of deep copies) until the achieved MACs reduction is within a point or so of the asked one.
A target (``target_macs_g`` or ``target_speedup`` = MACs before / MACs after) is searched the same
way. Every number reported is the achieved one.

Iterative pruning (``steps`` > 1) removes the asked MACs in equal parts, re-calibrating before each
step and spreading the fine-tuning epochs between the steps; "accuracy right after pruning" is then
the one after the last step (the record lists every step).

BatchNorm statistics are re-estimated on the calibration images right after each pruning step
(``recalibrate_bn``, on by default; EagleEye's adaptive BN): without it, a model pruned hard (half of
its channels, say) falls to chance until fine-tuned, because every BatchNorm still expects the
statistics of the unpruned inputs (benchmarks/results/prune_criteria_baseline_no_bn.md). Weights,
channel order and the classifier are untouched by it.

On synthetic data nothing may learn from the noise: BatchNorm re-estimation is off by default (asking
for it is an error, since it would replace a trained model's statistics with those of random tensors),
the CLI fine-tunes only when asked (``finetune_on_synthetic``), and accuracy is measured only when
``eval_samples`` asks for it. Data-free criteria (those whose ``needs_data`` is false: magnitude,
random, slimming) then prune any model with no dataset at all.

Depth pruning (``method="depth"``) drops whole residual blocks instead: ``ratio`` is the fraction of
the removable blocks (identity shortcut), chosen by the smallest calibration-loss rise when skipped.

A measured latency target (``target_latency_ms``, or ``target_speedup`` with ``measured``) is searched
on the deployment backend instead: see :mod:`deploycomp.prune.latency`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from deploycomp import console
from deploycomp.errors import MissingDependencyError, UsageError, check
from deploycomp.train import TrainConfig

MAX_RATIO = 0.95  # the largest channel ratio a target search may use
SEARCH_TOLERANCE = 0.005  # a search stops once MACs are within 0.5 % of the target
TARGET_TOLERANCE = 0.02  # targets must be reached within 2 %
RATIO_TOLERANCE_POINTS = 3.0  # a ratio's MACs reduction must land within 3 points of what it asks
FINETUNE_LR = {"sgd": 0.01}  # fine-tuning a trained model wants a smaller SGD step than training from scratch


@dataclass
class PruneConfig:
    method: str = "magnitude"  # a name in deploycomp.prune.criteria.CRITERIA
    ratio: float | None = None  # fraction of channels (depth: of removable blocks) to remove, in (0, 1)
    target_macs_g: float | None = None  # instead of ratio: MACs (G) after pruning
    target_speedup: float | None = None  # instead of ratio: MACs before / MACs after (measured: latency ratio)
    target_latency_ms: float | None = None  # instead of ratio: latency measured on the latency backend (ms)
    measured: bool = False  # target_speedup is a speed-up measured on the latency backend, not a MACs ratio
    # measured latency targets only (deploycomp.prune.latency); None means the default
    latency_backend: str | None = None  # ort, torch, torch-compile, trt (default: trt with a GPU, else ort)
    latency_device: str | None = None  # default: cpu (cuda for trt)
    latency_batch: int | None = None  # default: 1
    latency_threads: int | None = None  # intra-op threads on the CPU (default: 1)
    latency_widths: int | None = None  # candidate widths per group in the latency table (default 8)
    latency_iterations: int | None = None  # candidates timed against the original at most (default 4)
    latency_tolerance_pct: float | None = None  # measured speed-up within this of the target ends it (default 5)
    latency_cache: str | None = None  # table cache directory (default ~/.cache/deploycomp/latency; "off": none)
    global_pruning: bool = False  # rank channels across layers (layers end up with unequal ratios)
    steps: int = 1  # iterative pruning steps, fine-tuning between them
    round_to: int = 8  # kept channel counts are multiples of this (1: exact counts)
    calib_samples: int = 512  # calibration inputs for data-driven criteria
    calib_batch: int = 64
    norm: str = "l1"  # magnitude/hybrid weight norm: l1 or l2
    coverage_threshold: float = 0.25  # coverage: scaled activation above which a channel counts as covered
    ignore: tuple[str, ...] = ()  # module names whose output channels are kept (the classifier always is)
    recalibrate_bn: bool | None = None  # re-estimate BatchNorm statistics after pruning (None: unless synthetic)
    finetune: TrainConfig | None = field(default_factory=lambda: TrainConfig(epochs=1))  # None: no fine-tuning
    finetune_on_synthetic: bool = True  # False: skip the fine-tuning when the data is synthetic (the CLI's default)
    distill_from: str | None = None  # teacher checkpoint (or zoo name): fine-tune with knowledge distillation
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft-target (KL) term
    lam: float = 0.5  # weight of the cross-entropy term
    eval_samples: int | None = None  # evaluate on a deterministic subset of the test split (None: all; synthetic: none)
    eval_batch: int = 256
    seed: int = 0  # calibration subset and random criterion
    device: str | None = None  # calibration, evaluation and fine-tuning (pruning itself runs on CPU)

    def validate(self) -> None:
        from deploycomp.prune.criteria import NORMS, get_criterion

        get_criterion(self.method)
        from deploycomp.prune import latency

        targets = [n for n, v in (("--ratio", self.ratio), ("--target-macs", self.target_macs_g),
                                  ("--target-speedup", self.target_speedup),
                                  ("--target-latency-ms", self.target_latency_ms)) if v is not None]
        check(len(targets) <= 1, "give one of --ratio, --target-macs, --target-speedup, --target-latency-ms, not "
                                 f"{' and '.join(targets)}")
        check(len(targets) == 1, "say how much to prune: --ratio R (e.g. 0.3), --target-macs G, --target-speedup X "
                                 "or --target-latency-ms MS")
        latency.validate(self)
        check(self.ratio is None or 0 < self.ratio < 1, f"--ratio must be in (0, 1), got {self.ratio}")
        check(self.target_macs_g is None or 0 < self.target_macs_g < math.inf,
              f"--target-macs must be positive and finite, got {self.target_macs_g}")
        check(self.target_speedup is None or 1 < self.target_speedup < math.inf,
              f"--target-speedup must be above 1 ({'measured' if self.measured else 'MACs before / after'}) and "
              f"finite, got {self.target_speedup}")
        check(self.steps >= 1, f"--steps must be at least 1, got {self.steps}")
        check(self.round_to >= 1, f"--round-to must be at least 1, got {self.round_to}")
        check(self.calib_samples > 0, f"--calib-samples must be positive, got {self.calib_samples}")
        check(self.calib_batch > 0, f"--calib-batch must be positive, got {self.calib_batch}")
        check(self.norm in NORMS, f"--norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        check(0 <= self.coverage_threshold < 1,
              f"--coverage-threshold must be in [0, 1), got {self.coverage_threshold}")
        check(self.eval_samples is None or self.eval_samples > 0,
              f"--eval-samples must be positive, got {self.eval_samples}")
        check(self.distill_from is None or self.finetune is not None,
              "--distill-from distils during fine-tuning; give --finetune-epochs 1 or more")
        from deploycomp.distill import check_kd_params

        check_kd_params(self.temperature, self.alpha, self.lam)
        if self.finetune is not None:
            self.finetune.validate()

    @property
    def finetune_epochs(self) -> int:
        return self.finetune.epochs if self.finetune is not None else 0

    @property
    def latency_target(self) -> bool:
        """True when the target is a latency measured on the latency backend."""
        return self.target_latency_ms is not None or (self.target_speedup is not None and self.measured)


def finetune_config(epochs: int = 1, **overrides) -> TrainConfig | None:
    """The fine-tuning :class:`TrainConfig` after pruning (None for ``epochs`` 0); SGD defaults to lr 0.01."""
    check(epochs >= 0, f"--finetune-epochs must be >= 0 (0: no fine-tuning), got {epochs}")
    if epochs == 0:
        return None
    cfg = TrainConfig(epochs=epochs, **overrides)
    if cfg.lr is None:
        cfg.lr = FINETUNE_LR.get(cfg.optimizer)
    return cfg


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class _Context:
    ckpt: Any
    cfg: PruneConfig
    criterion: Any
    example: Any  # the example input torch-pruning traces with (the same the replay uses)
    ignored: list[str]  # module names whose output channels are never pruned
    macs0: int  # MACs before any pruning
    target_macs: float | None = None  # the final MACs the steps aim at (None: prune by ratio directly)
    asked_reduction_pct: float | None = None
    notes: list[str] = field(default_factory=list)  # warnings that also go into the record
    n_remove: int | None = None  # depth by ratio: blocks to remove over all steps
    removed: int = 0  # depth: blocks removed so far
    block_macs: dict[str, int] = field(default_factory=dict)  # depth by target: MACs inside each block
    latency: dict[str, Any] | None = None  # measured latency target: what the search measured (the record's)


def prune_checkpoint(ckpt, data, config: PruneConfig) -> tuple[Any, dict[str, Any]]:
    """Prune ``ckpt.model`` in place by ``config``, fine-tune it, and return ``(checkpoint, record)``.

    ``data`` is an :class:`deploycomp.inputs.Data` (test split for accuracy, train split for calibration
    and fine-tuning). The returned checkpoint records the pruning as surgeries (so it reloads safely),
    the operation in its lineage, and its new test metrics. Nothing is written.
    """
    import deploycomp.surgery  # noqa: F401  (registers the surgeries recorded below)
    from deploycomp.data import calibration_batches
    from deploycomp.metrics import count_macs, count_params, layer_channels, state_dict_size_mib
    from deploycomp.prune.calibrate import clear_stats, recalibrate_batchnorm
    from deploycomp.prune.criteria import CriterionOptions, get_criterion
    from deploycomp.train import evaluate, resolve_device

    config.validate()
    cfg = _for_data(config, data.info)
    check(not ckpt.trusted_pickle, "a pickled module cannot be pruned into a safe checkpoint; load its state dict "
                                   "with --arch NAME instead")
    device = resolve_device(cfg.device)
    criterion = get_criterion(cfg.method)(CriterionOptions(cfg.norm, cfg.coverage_threshold, cfg.seed, device))
    model = ckpt.model.cpu().eval()
    ignored = _ignored_layers(model, cfg.ignore)
    loss_fn = _distill_loss(ckpt, cfg) if cfg.finetune is not None else None
    check(cfg.finetune is None or data.train is not None, "fine-tuning needs the training split of the dataset")
    batches = []
    if criterion.needs_data or cfg.recalibrate_bn:
        calib_set = data.train if data.train is not None else data.test
        batches = calibration_batches(calib_set, cfg.calib_samples, cfg.calib_batch, cfg.seed)
        if data.info.synthetic and criterion.needs_data:
            console.warn(f"calibrating {cfg.method} on synthetic data: its channel ranking means little")
    criterion.check(ckpt)

    example = ckpt.example_input()
    with _one_thread():
        before = {**count_params(model), "macs": count_macs(model, example),
                  "weights_size_mib": state_dict_size_mib(model)}
    layers_before = layer_channels(model)
    ctx = _Context(ckpt, cfg, criterion, example, ignored, before["macs"])
    strategy = _strategy(criterion, cfg)
    seconds = {"calibration": 0.0, "pruning": 0.0, "finetuning": 0.0}

    def evaluate_now(what: str) -> dict[str, float] | None:
        if data.info.synthetic and cfg.eval_samples is None:
            return None  # accuracy on random tensors means nothing: measured only when asked for
        return evaluate(model, data.test, cfg.eval_batch, device, samples=cfg.eval_samples, description=what)

    steps_done: list[dict[str, Any]] = []
    acc_before = None
    for step in range(cfg.steps):
        t = time.perf_counter()
        if criterion.needs_data:
            with console.status_line(f"calibrating {cfg.method} on {cfg.calib_samples} samples"):
                criterion.calibrate(model, batches)
        seconds["calibration"] += time.perf_counter() - t
        t = time.perf_counter()
        if step == 0:
            strategy.plan(ctx)  # may refuse an unreachable target: before anything else is spent
            seconds["pruning"] += time.perf_counter() - t
            acc_before = evaluate_now("eval (before)")
            console.info(f"before pruning: {_top1(acc_before)}, {before['macs'] / 1e9:.3f} G MACs")
            t = time.perf_counter()
        with console.status_line(f"pruning ({cfg.method}, step {step + 1}/{cfg.steps})"):
            done = strategy.step(ctx, step)
        clear_stats(model)
        seconds["pruning"] += time.perf_counter() - t
        if cfg.recalibrate_bn:
            t = time.perf_counter()
            recalibrate_batchnorm(model, batches, device)
            seconds["calibration"] += time.perf_counter() - t
        done["after_pruning"] = evaluate_now("eval (pruned)")
        with _one_thread():
            done["macs"] = count_macs(model, example)
        console.info(f"step {step + 1}/{cfg.steps}: {done['macs'] / 1e9:.3f} G MACs, "
                     f"{_top1(done['after_pruning'])} right after pruning")
        epochs = _epochs_for_step(cfg.finetune_epochs, cfg.steps, step)
        if epochs:
            t = time.perf_counter()
            ft = dataclasses.replace(cfg.finetune, epochs=epochs)
            _finetune(model, data.train, ft, loss_fn)
            seconds["finetuning"] += time.perf_counter() - t
            done["finetune_epochs"] = epochs
        steps_done.append(done)
    model.cpu().eval()
    after_pruning = steps_done[-1]["after_pruning"]
    final = evaluate_now("eval (fine-tuned)") if cfg.finetune is not None else after_pruning
    seconds["total"] = sum(seconds.values())

    after = {**count_params(model), "macs": steps_done[-1]["macs"], "weights_size_mib": state_dict_size_mib(model)}
    for d in (before, after):
        d["macs_g"] = d["macs"] / 1e9
    achieved_pct = 100.0 * (1 - after["macs"] / before["macs"])
    layers_after = layer_channels(model)
    record = {
        "command": "prune", "method": cfg.method, "model": ckpt.source or ckpt.arch, "dataset": data.info.name,
        "synthetic": data.info.synthetic, "params": _params(cfg),
        "before": before, "after": after,
        "macs_reduction_pct": achieved_pct,
        "macs_reduction_asked_pct": achieved_pct if ctx.asked_reduction_pct is None else ctx.asked_reduction_pct,
        "target_macs_g": None if ctx.target_macs is None else ctx.target_macs / 1e9,
        "speedup_macs": before["macs"] / max(after["macs"], 1),
        "channels_removed_pct": _channels_removed_pct(layers_before, layers_after, ignored),
        "removed_blocks": [b for s in steps_done for b in s.get("blocks", [])],
        "accuracy": {"before": acc_before, "after_pruning": after_pruning, "after_finetuning": final},
        "seconds": seconds, "steps": steps_done, "notes": ctx.notes, "layers": layers_after,
        "latency": ctx.latency,
    }
    pruned = dataclasses.replace(ckpt, metadata=copy.deepcopy(ckpt.metadata), surgeries=list(ckpt.surgeries))
    for s in steps_done:
        pruned.add_surgery(**s.pop("surgery"))
    pruned.add_lineage("prune", **record["params"], macs_reduction_pct=achieved_pct,
                       channels_removed_pct=record["channels_removed_pct"],
                       removed_blocks=record["removed_blocks"])
    pruned.metadata["metrics"] = {"test": final, "macs_g": after["macs_g"], "params_total": after["params_total"]}
    return pruned, record


def _for_data(cfg: PruneConfig, info) -> PruneConfig:
    """``cfg`` with the defaults that depend on the data resolved: nothing learns from synthetic data."""
    if info.synthetic:
        check(not cfg.recalibrate_bn, "--recalibrate-bn re-estimates BatchNorm statistics on the data; on synthetic "
                                      "data it would replace the model's statistics with those of random tensors: "
                                      "drop it, or prune on real --data")
        if cfg.finetune is not None and not cfg.finetune_on_synthetic:
            check(cfg.distill_from is None, "--distill-from distils while fine-tuning, and on synthetic data "
                                            "nothing is fine-tuned unless --finetune-epochs N asks for it: drop "
                                            "--distill-from, or prune on real --data")
            console.info("synthetic data: no fine-tuning (give --finetune-epochs N to fine-tune on it anyway)")
            cfg = dataclasses.replace(cfg, finetune=None)
        elif cfg.finetune is not None:
            console.warn("fine-tuning on synthetic data: the model learns random tensors; use the result only to "
                         "test the plumbing")
    return dataclasses.replace(cfg, recalibrate_bn=not info.synthetic if cfg.recalibrate_bn is None
                               else cfg.recalibrate_bn)


def _top1(acc: dict[str, float] | None) -> str:
    return f"top-1 {acc['top1_pct']:.2f}%" if acc else "accuracy not measured (synthetic data)"


def run_prune(model: str | None, config: PruneConfig, *, output: str | None = None, data: str | None = None,
              data_dir: str | None = None, **model_options) -> dict[str, Any]:
    """Load ``model`` (default: the shipped baseline) and its data, prune, write the checkpoint and its record."""
    from pathlib import Path

    from deploycomp.files import check_output, sidecar_path, write_sidecar
    from deploycomp.inputs import load_inputs
    from deploycomp.workflows import default_output

    config.validate()  # cheap checks before loading anything
    ckpt, ds = load_inputs(model, data=data, data_dir=data_dir, need_train=True, **model_options)
    out = Path(output) if output else default_output(ckpt.name, f"pruned-{config.method}")
    check_output(out, ckpt.source, config.distill_from)
    console.info(f"pruning {ckpt.source or ckpt.arch} with {config.method} ({_what(config)}) -> {out}")
    pruned, record = prune_checkpoint(ckpt, ds, config)
    record["output"] = str(out)
    pruned.save(out)
    write_sidecar(out, record)
    console.info(f"wrote {out} and {sidecar_path(out)}")
    return record


# --------------------------------------------------------------------------------------------------
# Strategies: how a criterion's granularity turns into structural edits


class _Channels:
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


class _Blocks:
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
        block_macs = _module_macs(ctx.ckpt.model, ctx.example, names)
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


STRATEGIES = {"channels": _Channels, "blocks": _Blocks}


def _strategy(criterion, cfg: PruneConfig):
    """The strategy for the criterion's granularity; a measured latency target has its own pair."""
    if cfg.latency_target:
        from deploycomp.prune.latency import STRATEGIES as LATENCY_STRATEGIES

        return LATENCY_STRATEGIES[criterion.granularity]()
    return STRATEGIES[criterion.granularity]()


# --------------------------------------------------------------------------------------------------
# torch-pruning plumbing


def _tp_pruner_class():
    import torch_pruning as tp

    class Pruner(tp.pruner.BasePruner):
        """torch-pruning's pruner with balanced channel rounding.

        torch-pruning 1.6 rounds each layer's kept count *down* to a multiple of ``round_to`` (to zero
        for a small layer, which it then silently skips), so every layer overshoots the ratio. Here each
        layer rounds down or up, whichever keeps the running sum of rounding errors (as fractions of the
        layers' widths) closest to zero, and never below ``round_to`` channels: the errors cancel
        across layers instead of adding up.
        """

        _residual = 0.0

        def _round_to(self, n_pruned, current_channels, round_to):
            exact = current_channels - n_pruned
            down = exact - exact % round_to
            options = [c for c in (down, down + round_to) if min(round_to, current_channels) <= c <= current_channels]
            options = options or [min(round_to, current_channels)]
            kept = min(options, key=lambda c: (abs(self._residual + (c - exact) / current_channels), c))
            self._residual += (kept - exact) / current_channels
            return current_channels - kept

    return Pruner


@contextmanager
def _one_thread():
    """Graph tracing and pruning are many tiny ops: one thread avoids spinning on a busy machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def prune_channels(model, example_input, criterion, ratio: float, *, global_pruning: bool = False, round_to: int = 1,
                   ignore: Sequence[str] = ()) -> list:
    """Prune ``model`` in place at channel ratio ``ratio`` with ``criterion``; return torch-pruning's history.

    The lower-level step under :func:`prune_checkpoint`: no calibration (a data-driven criterion must
    already be calibrated), no search, no fine-tuning. ``ignore`` names modules whose outputs are kept;
    the classifier always is.
    """
    from deploycomp.prune import adapters

    criterion.reset()
    ignored = _ignored_layers(model, ignore)
    with _one_thread():
        pruner = _tp_pruner_class()(
            model, example_input, criterion, pruning_ratio=ratio, global_pruning=global_pruning,
            ignored_layers=[model.get_submodule(n) for n in ignored], round_to=round_to if round_to > 1 else None,
            **adapters.pruner_kwargs(model))
        pruner.step()
    adapters.after_pruning(model)
    return pruner.pruning_history()


def _prune_pass(ctx: _Context, model, ratio: float, round_to: int) -> list:
    return prune_channels(model, ctx.example, ctx.criterion, ratio, global_pruning=ctx.cfg.global_pruning,
                          round_to=round_to, ignore=ctx.ignored)


def _dry_macs(ctx: _Context, model, ratio: float, round_to: int) -> int:
    """MACs of a deep copy of ``model`` pruned at ``ratio`` (the model itself is untouched)."""
    from deploycomp.metrics import count_macs

    trial = copy.deepcopy(model)
    _prune_pass(ctx, trial, ratio, round_to)
    with _one_thread():
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


def _module_macs(model, example, names: list[str]) -> dict[str, int]:
    """Approximate MACs (convolutions and linear layers) inside each named module, from one forward pass."""
    import torch
    import torch.nn as nn

    per_layer: dict[str, int] = {}

    def hook(name):
        def fn(m, inputs, out):
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
                per_layer[name] = out[0].numel() * k
            else:
                per_layer[name] = m.in_features * m.out_features
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return {b: sum(v for k, v in per_layer.items() if k.startswith(b + ".")) for b in names}


def _ignored_layers(model, names) -> list[str]:
    """The classifier (the last Linear, else the last convolution) plus the user's ``--ignore`` names."""
    import difflib

    import torch.nn as nn

    modules = dict(model.named_modules())
    heads = [n for n, m in modules.items() if isinstance(m, nn.Linear)] or \
        [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    out = heads[-1:]
    for n in names:
        if n not in modules or not n:
            close = difflib.get_close_matches(n, [k for k in modules if k], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"--ignore {n!r} is not a layer of the model{hint}; "
                             "`deploycomp info --layers` lists the layers")
        if n not in out:
            out.append(n)
    return out


def _channels_removed_pct(before: list[dict], after: list[dict], ignored: list[str]) -> float:
    """Share of output channels removed over the conv/linear layers that still exist (classifier excluded)."""
    now = {r["layer"]: r["out"] for r in after}
    kept = [(r["out"], now[r["layer"]]) for r in before if r["layer"] in now and r["layer"] not in ignored]
    total = sum(b for b, _ in kept)
    return 100.0 * (1 - sum(a for _, a in kept) / total) if total else 0.0


def _epochs_for_step(total: int, steps: int, step: int) -> int:
    """Spread ``total`` fine-tuning epochs over ``steps`` (later steps get the remainder)."""
    return (step + 1) * total // steps - step * total // steps


def _finetune(model, train_set, config: TrainConfig, loss_fn) -> None:
    from deploycomp.train import fit

    fit(model, train_set, None, config, loss_fn=loss_fn)
    model.cpu().eval()


def _distill_loss(ckpt, cfg: PruneConfig):
    if cfg.distill_from is None:
        return None
    try:
        from deploycomp.distill import kd_loss
    except ImportError:
        raise MissingDependencyError("--distill-from needs deploycomp.distill, which this installation lacks") \
            from None
    from deploycomp.checkpoint import load_model

    teacher = load_model(cfg.distill_from, num_classes=ckpt.num_classes,
                         in_channels=ckpt.model_kwargs.get("in_channels"))
    if teacher.num_classes is not None and ckpt.num_classes is not None and teacher.num_classes != ckpt.num_classes:
        raise UsageError(f"teacher {cfg.distill_from} has {teacher.num_classes} classes but the model has "
                         f"{ckpt.num_classes}; they must predict the same classes")
    return kd_loss(teacher.model.eval(), temperature=cfg.temperature, alpha=cfg.alpha, lam=cfg.lam)


def _params(cfg: PruneConfig) -> dict[str, Any]:
    p = asdict(cfg)
    p["finetune"] = asdict(cfg.finetune) if cfg.finetune is not None else None
    p["ignore"] = list(cfg.ignore)
    if cfg.distill_from is None:
        for k in ("temperature", "alpha", "lam"):
            p.pop(k)
    return p


def _what(cfg: PruneConfig) -> str:
    if cfg.ratio is not None:
        return f"ratio {cfg.ratio}, {'global' if cfg.global_pruning else 'layer-wise'}"
    if cfg.target_macs_g is not None:
        return f"target {cfg.target_macs_g} G MACs"
    if cfg.target_latency_ms is not None:
        return f"target latency {cfg.target_latency_ms} ms, measured"
    return f"target speed-up {cfg.target_speedup}x ({'measured' if cfg.measured else 'MACs'})"


__all__ = ["PruneConfig", "finetune_config", "prune_channels", "prune_checkpoint", "run_prune"]
