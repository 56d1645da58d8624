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

Layout: this module is the run (config, :func:`prune_checkpoint`, :func:`run_prune`);
:mod:`~deploycomp.prune.strategies` turns a ratio or MACs target into steps, on the torch-pruning
plumbing of :mod:`~deploycomp.prune.channels`; :mod:`~deploycomp.prune.criteria` scores channels.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from deploycomp import console
from deploycomp.errors import UsageError, check
from deploycomp.prune.adapters import PruningError, check_prunable
from deploycomp.prune.channels import channels_removed_pct, ignored_layers, one_thread, prune_channels
from deploycomp.train import TrainConfig

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
    distill_from_arch: str | None = None  # the user code a distill_from checkpoint was built from (running it: consent)
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
        check(self.distill_from_arch is None or self.distill_from is not None,
              "--distill-from-arch names the code of a --distill-from checkpoint; give --distill-from too")
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
    task = data.task
    criterion = get_criterion(cfg.method)(CriterionOptions(cfg.norm, cfg.coverage_threshold, cfg.seed, device,
                                                           loss=task.loss(model=ckpt.model)))
    model = ckpt.model.cpu().eval()
    ignored = ignored_layers(model, cfg.ignore, task)
    loss_fn = _distill_loss(ckpt, cfg, task) if cfg.finetune is not None else None
    check(cfg.finetune is None or data.train is not None, "fine-tuning needs the training split of the dataset")
    batches = []
    if criterion.needs_data or cfg.recalibrate_bn:
        calib_set = data.train if data.train is not None else data.test
        batches = calibration_batches(calib_set, cfg.calib_samples, cfg.calib_batch, cfg.seed)
        if data.info.synthetic and criterion.needs_data:
            console.warn(f"calibrating {cfg.method} on synthetic data: its channel ranking means little")
    criterion.check(ckpt)

    example = ckpt.example_input()
    with one_thread():
        before = {**count_params(model), "macs": count_macs(model, example),
                  "weights_size_mib": state_dict_size_mib(model)}
    layers_before = layer_channels(model)
    ctx = _Context(ckpt, cfg, criterion, example, ignored, before["macs"])
    strategy = _strategy(criterion, cfg)
    seconds = {"calibration": 0.0, "pruning": 0.0, "finetuning": 0.0}

    def evaluate_now(what: str) -> dict[str, float] | None:
        if data.info.synthetic and cfg.eval_samples is None:
            return None  # accuracy on random tensors means nothing: measured only when asked for
        return evaluate(model, data.test, cfg.eval_batch, device, samples=cfg.eval_samples, description=what,
                        task=task)

    steps_done: list[dict[str, Any]] = []
    acc_before = None
    name = ckpt.source or ckpt.arch
    if criterion.granularity == "channels":
        check_prunable(model, name)  # a pattern known to defeat torch-pruning: refused before any graph is built
    try:
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
                console.info(f"before pruning: {_score(acc_before, task)}, {before['macs'] / 1e9:.3f} G MACs")
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
            with one_thread():
                done["macs"] = count_macs(model, example)
            console.info(f"step {step + 1}/{cfg.steps}: {done['macs'] / 1e9:.3f} G MACs, "
                         f"{_score(done['after_pruning'], task)} right after pruning")
            epochs = _epochs_for_step(cfg.finetune_epochs, cfg.steps, step)
            if epochs:
                t = time.perf_counter()
                ft = dataclasses.replace(cfg.finetune, epochs=epochs)
                _finetune(model, data.train, ft, loss_fn, task)
                seconds["finetuning"] += time.perf_counter() - t
                done["finetune_epochs"] = epochs
            steps_done.append(done)
    except PruningError as e:
        raise PruningError(f"cannot prune {name}: {e}") from e
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
        "task": task.name, "metric": task.metric, "metric_label": task.label,
        "synthetic": data.info.synthetic, "params": _params(cfg),
        "before": before, "after": after,
        "macs_reduction_pct": achieved_pct,
        "macs_reduction_asked_pct": achieved_pct if ctx.asked_reduction_pct is None else ctx.asked_reduction_pct,
        "target_macs_g": None if ctx.target_macs is None else ctx.target_macs / 1e9,
        "speedup_macs": before["macs"] / max(after["macs"], 1),
        "channels_removed_pct": channels_removed_pct(layers_before, layers_after, ignored),
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


def _score(acc: dict[str, float] | None, task) -> str:
    return f"{task.label} {acc[task.metric]:.2f}%" if acc else "accuracy not measured (synthetic data)"


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
    if record.get("latency"):
        from deploycomp.prune.latency import bench_commands
        from deploycomp.prune.probes import Setup

        record["latency"]["reproduce"] = bench_commands(Setup(**record["latency"]["setup"]), model,
                                                        {**model_options, "data": data, "data_dir": data_dir},
                                                        str(out))
    pruned.save(out)
    write_sidecar(out, record)
    console.info(f"wrote {out} and {sidecar_path(out)}")
    return record




def _strategy(criterion, cfg: PruneConfig):
    """The strategy for the criterion's granularity; a measured latency target has its own pair."""
    if cfg.latency_target:
        from deploycomp.prune.latency import STRATEGIES as LATENCY_STRATEGIES

        return LATENCY_STRATEGIES[criterion.granularity]()
    from deploycomp.prune.strategies import STRATEGIES

    return STRATEGIES[criterion.granularity]()


def _epochs_for_step(total: int, steps: int, step: int) -> int:
    """Spread ``total`` fine-tuning epochs over ``steps`` (later steps get the remainder)."""
    return (step + 1) * total // steps - step * total // steps


def _finetune(model, train_set, config: TrainConfig, loss_fn, task=None) -> None:
    from deploycomp.train import fit

    fit(model, train_set, None, config, loss_fn=loss_fn, task=task)
    model.cpu().eval()


def _distill_loss(ckpt, cfg: PruneConfig, task):
    if cfg.distill_from is None:
        return None
    from deploycomp.checkpoint import load_model

    teacher = load_model(cfg.distill_from, num_classes=ckpt.num_classes,
                         in_channels=ckpt.model_kwargs.get("in_channels"), arch=cfg.distill_from_arch,
                         code_option="--distill-from-arch")
    if teacher.num_classes is not None and ckpt.num_classes is not None and teacher.num_classes != ckpt.num_classes:
        raise UsageError(f"teacher {cfg.distill_from} has {teacher.num_classes} classes but the model has "
                         f"{ckpt.num_classes}; they must predict the same classes")
    return task.kd_loss(teacher.model.eval(), cfg.temperature, cfg.alpha, cfg.lam)


def _params(cfg: PruneConfig) -> dict[str, Any]:
    p = asdict(cfg)
    p["finetune"] = asdict(cfg.finetune) if cfg.finetune is not None else None
    p["ignore"] = list(cfg.ignore)
    if cfg.distill_from is None:
        for k in ("temperature", "alpha", "lam"):
            p.pop(k)
    if cfg.distill_from_arch is None:
        p.pop("distill_from_arch")
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
