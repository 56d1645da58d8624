"""One ``fit()`` and one ``evaluate()`` for every stage: train, fine-tune after pruning, distill.

``fit`` handles SGD/Adam, schedules, label smoothing, AMP and channels-last on CUDA, progress,
DistributedDataParallel under ``torchrun``, and resumable state written after every epoch (so Ctrl-C
or a crash loses at most the epoch in progress). Extra loss terms (distillation, sparsity) come in as
a ``loss_fn`` and ``penalties``; nothing here knows about them.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploycomp import console
from deploycomp.errors import DeploycompError, UsageError, check, first_line
from deploycomp.files import atomic_path, require_file
from deploycomp.registry import Registry


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # a name in OPTIMIZERS
    lr: float | None = None  # None: the optimizer's default (SGD 0.1, Adam 1e-3)
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # a name in SCHEDULES
    label_smoothing: float = 0.0
    amp: bool | None = None  # None: on for CUDA, off on CPU
    channels_last: bool | None = None  # None: on for CUDA
    device: str | None = None  # None: CUDA when present, CPU otherwise
    seed: int = 0
    workers: int = 0  # DataLoader worker processes
    train_samples: int | None = None  # a deterministic subset of the training set (None: all)
    val_samples: int | None = None  # validate each epoch on a deterministic subset (None: all)

    def validate(self) -> None:
        check(self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        check(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        check(self.lr is None or 0 < self.lr < math.inf, f"--lr must be positive and finite, got {self.lr}")
        check(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        check(0 <= self.weight_decay < math.inf, f"--weight-decay must be >= 0 and finite, got {self.weight_decay}")
        check(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        check(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        check(self.workers <= max_workers(), f"--workers {self.workers} would start more processes than this machine "
              f"can use; give at most {max_workers()} (4 per CPU core)")
        check(0 <= self.seed < 2**32, f"--seed must be in 0..{2**32 - 1}, got {self.seed}")
        check(self.train_samples is None or self.train_samples > 0,
              f"--train-samples must be positive, got {self.train_samples}")
        check(self.val_samples is None or self.val_samples > 0,
              f"--val-samples must be positive, got {self.val_samples}")
        OPTIMIZERS.get(self.optimizer)
        SCHEDULES.get(self.schedule)


def max_workers() -> int:
    """The most DataLoader worker processes a run may start: 4 per CPU core (each is a full process)."""
    return 4 * (os.cpu_count() or 1)


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    final: dict[str, float] = field(default_factory=dict)  # evaluate() on the validation set
    seconds: float = 0.0


class TrainingInterrupted(DeploycompError):
    exit_code = 130


# -- registries ------------------------------------------------------------------------------------

OPTIMIZERS: Registry[Callable[..., Any]] = Registry("optimizer")
SCHEDULES: Registry[Callable[..., Any]] = Registry("schedule")
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}  # --lr when none is given


def default_lr(optimizer: str) -> float:
    OPTIMIZERS.get(optimizer)  # an unknown name: the registry's one-line error
    return DEFAULT_LR[optimizer]


@OPTIMIZERS.register("sgd")
def _sgd(params, cfg: TrainConfig):
    import torch

    return torch.optim.SGD(params, lr=cfg.lr or DEFAULT_LR["sgd"], momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.momentum > 0)


@OPTIMIZERS.register("adam")
def _adam(params, cfg: TrainConfig):
    import torch

    return torch.optim.Adam(params, lr=cfg.lr or DEFAULT_LR["adam"], weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(params, cfg: TrainConfig):
    import torch

    return torch.optim.AdamW(params, lr=cfg.lr or DEFAULT_LR["adamw"], weight_decay=cfg.weight_decay or 0.05)


@SCHEDULES.register("cosine")
def _cosine(opt, total_steps: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))


@SCHEDULES.register("step")
def _step(opt, total_steps: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 ** (3 * s // max(total_steps, 1)))


@SCHEDULES.register("constant")
def _constant(opt, total_steps: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


# -- devices and distribution ----------------------------------------------------------------------


def resolve_device(device: str | None = None):
    """``None``/``"auto"``: CUDA when present, else CPU. Asking for CUDA without it is an error."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for, but CUDA is not available here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device) -> tuple[_Dist, Any]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), device
    d = _Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def distributed_rank() -> int:
    return int(os.environ.get("RANK", "0"))


# -- evaluation ------------------------------------------------------------------------------------


def evaluate(model, dataset, batch_size: int = 256, device=None, loss_fn=None, samples: int | None = None,
             description: str = "eval", task=None) -> dict[str, float]:
    """The task's metrics (classification: top-1 / top-5 accuracy in percent; segmentation: mIoU and pixel
    accuracy) and the mean loss of ``model`` on ``dataset`` (or a DataLoader); ``task`` is a
    :class:`deploycomp.tasks.Task` (None: classification with the model's classes)."""
    import torch

    from deploycomp.data import make_loader, subset

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    if not isinstance(dataset, torch.utils.data.DataLoader):
        dataset = subset(dataset, samples)
        _check_batch_fits(model, dataset, batch_size, "--batch-size", device, training=False)
    loader = dataset if isinstance(dataset, torch.utils.data.DataLoader) else make_loader(dataset, batch_size)
    was_training = model.training
    model.eval().to(device)
    meter = criterion = None
    n = 0
    loss_sum = 0.0
    with torch.inference_mode():
        for x, y in console.progress(loader, len(loader), description):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            if meter is None:
                task = task or _default_task(logits)
                task.check_outputs(logits, y)
                meter, criterion = task.meter(), loss_fn or task.loss(model=model)
            loss_sum += float(criterion(logits, x, y)) * len(y)
            meter.update(logits, y)
            n += len(y)
    model.train(was_training)
    check(n > 0, "the evaluation set is empty")
    loss = loss_sum / n  # NaN: an end-to-end detector, whose losses exist in train mode only
    return {**meter.result(), "loss": loss if loss == loss else None, "samples": n}


def _default_task(logits):
    from deploycomp.tasks import get_task

    return get_task("classification", int(logits.shape[1]))


# -- training --------------------------------------------------------------------------------------

LossFn = Callable[[Any, Any, Any], Any]  # (logits, inputs, targets) -> scalar loss
Penalty = Callable[[Any], Any]  # (model) -> scalar added to the loss (e.g. L1 on BN gammas)


def fit(model, train_set, val_set=None, config: TrainConfig | None = None, *, loss_fn: LossFn | None = None,
        penalties: Sequence[Penalty] = (), resume_path: str | os.PathLike | None = None, resume: bool = False,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None, keep_resume: bool = False,
        task=None, after_epoch: Callable[[], None] | None = None) -> FitResult:
    """Train ``model`` in place on ``train_set``; evaluate on ``val_set`` after each epoch.

    Args:
        loss_fn: ``(logits, inputs, targets) -> loss``; cross-entropy with label smoothing by default.
        penalties: callables ``model -> scalar`` added to the loss (sparsity regularisers).
        resume_path: where the resumable state is written after every epoch (deleted on success).
        resume: continue from ``resume_path`` instead of starting over.
        keep_resume: leave the resume state for the caller to delete once the trained model is saved (so that
            an interruption between the end of training and that save loses nothing).
        on_epoch_end: called with ``(epoch, row)`` after each epoch (on the main process).
        after_epoch: called on every process after each epoch's training, before its validation (QAT re-measures
            its activation ranges there, so that the validation sees the ranges of the new weights).
        task: the :class:`deploycomp.tasks.Task` (its loss, running accuracy and metrics); None: classification.
    """
    import torch

    from deploycomp.data import make_loader, subset

    cfg = config or TrainConfig()
    cfg.validate()
    device = resolve_device(cfg.device)
    dist, device = _init_distributed(device)
    use_amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    check(len(params) > 0, "every parameter is frozen; nothing to train")
    optimizer = OPTIMIZERS.get(cfg.optimizer)(params, cfg)
    train_set = subset(train_set, cfg.train_samples, cfg.seed)
    _check_batch_fits(model, train_set, cfg.batch_size, "--batch-size", device, training=True,
                      bytes_per_value=2 if use_amp else 4)
    sampler = None
    if dist.world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(train_set, dist.world, dist.rank, seed=cfg.seed)
        loader = torch.utils.data.DataLoader(train_set, cfg.batch_size, sampler=sampler, num_workers=cfg.workers)
    else:
        # A last batch of one image is dropped: BatchNorm in train mode cannot normalise it (SSDlite's 1x1
        # maps, any BatchNorm1d) and its statistics would be noise. Other sizes keep every image.
        loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, workers=cfg.workers,
                             drop_last=len(train_set) % cfg.batch_size == 1 and len(train_set) > 1)
    steps_per_epoch = len(loader)
    check(steps_per_epoch > 0, "the training set is empty")
    scheduler = SCHEDULES.get(cfg.schedule)(optimizer, cfg.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and device.type == "cuda")
    if task is None:
        from deploycomp.tasks import get_task
        from deploycomp.zoo import infer_num_classes

        task = get_task("classification", infer_num_classes(model) or 1)
    if getattr(loss_fn, "needs_model", False):  # a loss that asks the model (a detector's distillation)
        loss_fn = loss_fn(model)
    criterion = loss_fn or task.loss(cfg.label_smoothing, model=model)
    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    result, start_epoch = FitResult(), 0
    if resume:
        start_epoch, result.history = _load_resume(resume_path, model, optimizer, scheduler, scaler)
        console.info(f"resuming from {resume_path} after epoch {start_epoch}/{cfg.epochs}")
    t0 = time.perf_counter()
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            # Seeding per epoch makes a resumed run identical to an uninterrupted one.
            torch.manual_seed(cfg.seed * 100_003 + epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            else:
                loader.generator.manual_seed(cfg.seed + epoch)
            row = _train_one_epoch(net, model, loader, optimizer, scheduler, scaler, criterion, penalties, device,
                                   use_amp, channels_last, f"epoch {epoch + 1}/{cfg.epochs}", dist.main, task)
            if after_epoch is not None:
                after_epoch()
            if val_set is not None and dist.main:
                val = evaluate(model, val_set, device=device, samples=cfg.val_samples, description="validate",
                               task=task)
                row.update({f"val_{k}": v for k, v in val.items() if k != "samples" and isinstance(v, (int, float))})
                row.setdefault("val_loss", None)
            row["epoch"] = epoch + 1
            row["lr"] = scheduler.get_last_lr()[0]
            result.history.append(row)
            if dist.main:
                console.info(_epoch_line(row, cfg.epochs, task))
                if resume_path:
                    _save_resume(resume_path, model, optimizer, scheduler, scaler, epoch + 1, result.history, cfg)
                if on_epoch_end:
                    on_epoch_end(epoch + 1, row)
    except KeyboardInterrupt:
        where = f"; rerun with --resume to continue from {resume_path}" if resume_path else ""
        raise TrainingInterrupted(f"training interrupted during epoch {epoch + 1}{where}") from None
    finally:
        if dist.world > 1:
            import torch.distributed as tdist

            tdist.barrier()
    result.seconds = time.perf_counter() - t0
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    if val_set is not None and result.history and f"val_{task.metric}" in result.history[-1]:
        last = result.history[-1]
        result.final = {k[4:]: v for k, v in last.items() if k.startswith("val_")}
    if resume_path and dist.main and not keep_resume and Path(resume_path).exists():
        Path(resume_path).unlink()
    return result


def _check_batch_fits(model, dataset, batch_size: int, what: str, device, training: bool,
                      bytes_per_value: int = 4) -> None:
    """A one-line error, before the first batch, when a batch of this size cannot fit in memory."""
    from deploycomp.resources import check_forward_fits

    n = len(dataset)
    if n == 0:
        return
    x = dataset[0][0]
    if getattr(x, "ndim", 0) == 3:
        check_forward_fits(model, tuple(x.shape), min(batch_size, n), what, training=training, device=device,
                           bytes_per_value=bytes_per_value)


def _train_one_epoch(net, model, loader, optimizer, scheduler, scaler, criterion, penalties, device, use_amp,
                     channels_last, description, show, task) -> dict[str, float]:
    import torch

    net.train()
    n = correct = counted = 0
    loss_sum = 0.0
    batches = console.progress(loader, len(loader), description) if show else loader
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=use_amp):
            logits, loss = task.train_step(net, x, y, criterion)
            if n == 0 and logits is not None:
                task.check_outputs(logits, y)
            for penalty in penalties:
                loss = loss + penalty(model)
        if not torch.isfinite(loss):
            raise DeploycompError(f"the loss became {float(loss)} during training; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.item() * len(y)
        if task.train_metric:
            hits, total = task.train_accuracy(logits, y)
            correct, counted = correct + hits, counted + total
        n += len(y)
    row = {"train_loss": loss_sum / max(n, 1)}
    if task.train_metric:
        row[f"train_{task.train_metric}"] = 100.0 * correct / max(counted, 1)
    return row


def _epoch_line(row: dict[str, float], epochs: int, task) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}"]
    if task.train_metric:
        parts.append(f"train {row[f'train_{task.train_metric}']:.2f}%")
    if f"val_{task.metric}" in row:
        parts.append(f"val {task.label} {row[f'val_{task.metric}']:.2f}%")
        if row.get("val_loss") is not None:  # None for end-to-end detectors: no eval-mode loss
            parts.append(f"val loss {row['val_loss']:.4f}")
    parts.append(f"lr {row['lr']:.3g}")
    return "  ".join(parts)


def _save_resume(path, model, optimizer, scheduler, scaler, epochs_done, history, cfg) -> None:
    import torch

    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "epochs_done": epochs_done, "history": history, "config": asdict(cfg)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_resume(path, model, optimizer, scheduler, scaler) -> tuple[int, list[dict[str, float]]]:
    import pickle

    import torch

    if not path or not Path(path).exists():
        raise UsageError(f"--resume given, but there is no resume state at {path}; run without --resume")
    require_file(path, "resume state")
    damaged = f"the resume state {path} is damaged or belongs to another run; delete it to start over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        return int(state["epochs_done"]), list(state["history"])
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError,
            AttributeError) as e:
        raise DeploycompError(f"{damaged} ({first_line(e, 160)})") from None
