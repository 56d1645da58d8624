"""Knowledge distillation: the KD loss and the ``distill`` workflow on top of the one ``fit()``.

Distilling the Knowledge in a Neural Network (Hinton, Vinyals, Dean 2015, arXiv:1503.02531): the
student matches the teacher's temperature-softened class distribution as well as the labels,

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + lambda * CE(s, y)

with alpha and lambda independent (the KD report's tables vary them as 0.5/0.5, 0.7/0.3, 0.3/0.7).
The T^2 factor keeps the soft term's gradients on the same scale as the hard term's when T changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from deploycomp.errors import UsageError, check
from deploycomp.registry import Registry

LossFn = Callable[[Any, Any, Any], Any]  # (logits, inputs, targets) -> scalar, as deploycomp.train.fit takes


def check_kd_params(temperature: float, alpha: float, lam: float) -> None:
    """One-line errors for a temperature <= 0, a negative weight, or both weights zero."""
    check(0 < temperature < math.inf, f"--temperature must be positive and finite, got {temperature}")
    check(0 <= alpha < math.inf, f"--alpha must be >= 0 and finite (weight of the soft-target term), got {alpha}")
    check(0 <= lam < math.inf, f"--lambda must be >= 0 and finite (weight of the cross-entropy term), got {lam}")
    check(alpha > 0 or lam > 0, "--alpha and --lambda are both 0, so the loss would be 0 and nothing would train; "
                                "give at least one of them a positive weight")


def teacher_outputs(teacher, inputs):
    """The teacher's outputs on ``inputs``: in eval mode, without gradients, moved to the inputs' device."""
    import torch

    first = next(teacher.parameters(), None)
    if first is not None and first.device != inputs.device:
        teacher.to(inputs.device)
    teacher.eval()
    with torch.no_grad():
        return teacher(inputs)


def kd_loss(teacher, temperature: float = 2.0, alpha: float = 0.5, lam: float = 0.5,
            ignore_index: int | None = None) -> LossFn:
    """A ``fit()`` loss ``(logits, inputs, targets) -> alpha * T^2 * KL(t || s) + lam * CE(s, y)``.

    The teacher runs in eval mode under ``torch.no_grad`` on the inputs' device (it is moved there on
    first use). KL is the mathematical KL per prediction, averaged: per image for (N, classes) logits
    (``batchmean``), per pixel for segmentation's (N, classes, H, W) maps (pixel-wise distillation), so
    that T, alpha and lambda mean the same for both. ``ignore_index``: the target value CE skips.

    Args:
        teacher: the teacher ``nn.Module``; its logits must have the student's number of classes.
        temperature: T > 0 softening both distributions.
        alpha: weight of the soft-target (KL) term, >= 0.
        lam: weight of the cross-entropy term on the labels, >= 0.
    """
    check_kd_params(temperature, alpha, lam)
    t2 = float(temperature) ** 2

    def loss(logits, inputs, targets):
        import torch.nn.functional as F

        hard = F.cross_entropy(logits, targets, ignore_index=-100 if ignore_index is None else ignore_index) \
            if lam else None
        if not alpha:
            return lam * hard
        t_logits = teacher_outputs(teacher, inputs)
        if t_logits.shape != logits.shape:
            raise UsageError(f"the teacher's outputs have shape {tuple(t_logits.shape)} but the student's have "
                             f"{tuple(logits.shape)}; teacher and student must predict the same classes")
        log_s = F.log_softmax(logits.float() / temperature, dim=1)
        log_t = F.log_softmax(t_logits.float() / temperature, dim=1)
        predictions = logits.numel() // logits.shape[1]  # N for classifiers, N * H * W for segmentation
        soft = F.kl_div(log_s, log_t, reduction="sum", log_target=True) / predictions
        total = alpha * t2 * soft
        return total + lam * hard if hard is not None else total

    return loss


def run_distillation(teacher: str | None, student: str, config, *, teacher_arch: str | None = None,
                     temperature: float = 2.0, alpha: float = 0.5, lam: float = 0.5, output: str | None = None,
                     data: str | None = None, data_dir: str | None = None, resume: bool = False,
                     **student_options) -> dict[str, Any]:
    """Distill ``teacher`` (default: the shipped baseline) into ``student`` with the one shared ``fit()``.

    Both are zoo names, user code or checkpoints. A checkpoint built from user code loads only with that
    code named: ``teacher_arch`` for the teacher, ``student_options["arch"]`` for the student (the CLI's
    ``--teacher-arch`` / ``--student-arch``). The dataset is ``data``, else the teacher checkpoint's, else the
    student checkpoint's, else the default. The checkpoint's lineage records the teacher, T, alpha,
    lambda and the training config.
    """
    from deploycomp import console
    from deploycomp.checkpoint import _looks_like_path, default_model, load_model
    from deploycomp.files import check_output
    from deploycomp.inputs import load_inputs
    from deploycomp.workflows import default_output, run_training

    check_kd_params(temperature, alpha, lam)
    config.validate()  # cheap checks before loading anything
    teacher = teacher or default_model()
    _check_arch_for_a_file(teacher, teacher_arch, "--teacher")
    _check_arch_for_a_file(student, student_options.get("arch"), "--student")
    student_options["code_option"] = "--student-arch"
    peeked = load_model(student, **student_options) if _looks_like_path(student) else None
    if data is None and not _looks_like_path(teacher) and peeked is not None:
        data = peeked.metadata.get("dataset")
    t_ckpt, t_data = load_inputs(teacher, data=data, data_dir=data_dir, need_train=False,
                                 input_size=student_options.get("input_size"), arch=teacher_arch,
                                 code_option="--teacher-arch")
    if not t_ckpt.source and not t_ckpt.metadata.get("weights"):
        console.warn(f"teacher {teacher!r} is a freshly initialised zoo model, not a trained one; "
                     "pass a trained checkpoint as --teacher")
    if peeked is not None:
        _check_same_classes(t_ckpt, peeked, teacher, student)
    else:  # a fresh student takes the teacher's classes and input (synthetic data would follow the student)
        student_options.setdefault("num_classes", t_ckpt.num_classes)
        student_options.setdefault("in_channels", t_data.info.input_shape[0])
    student_options.setdefault("input_size", tuple(t_data.info.input_shape[1:]))
    data = t_data.info.name

    def prepare(ckpt, ds) -> None:
        _check_same_classes(t_ckpt, ckpt, teacher, student)

    name = peeked.name if peeked is not None else student
    out = output or str(default_output(name, "distilled"))
    lineage = {"teacher": t_ckpt.source or t_ckpt.arch, "teacher_arch": t_ckpt.arch,
               **({"teacher_code": t_ckpt.metadata["code"]} if t_ckpt.metadata.get("code") else {}),
               f"teacher_test_{t_data.task.metric}": (t_ckpt.metadata.get("metrics") or {}).get("test", {}).get(
                   t_data.task.metric),
               "temperature": temperature, "alpha": alpha, "lambda": lam}
    check_output(out, t_ckpt.source)  # the teacher is an input too
    return run_training(student, config, output=out, data=data, data_dir=data_dir, resume=resume,
                        loss_fn=t_data.task.kd_loss(t_ckpt.model, temperature, alpha, lam),
                        lineage=lineage, prepare=prepare,
                        op="distill", **student_options)


def _check_arch_for_a_file(ref: str, arch: str | None, option: str) -> None:
    """``--teacher-arch`` / ``--student-arch`` say how to rebuild a file; a model built fresh has its name already."""
    from deploycomp.checkpoint import _looks_like_path

    if arch is not None and not _looks_like_path(ref):
        raise UsageError(f"{option}-arch {arch}: {option} {ref} is built fresh from its own name; {option}-arch is for "
                         f"a checkpoint or state-dict file given as {option}")


def _check_same_classes(teacher_ckpt, student_ckpt, teacher: str, student: str) -> None:
    t_n, s_n = teacher_ckpt.num_classes, student_ckpt.num_classes
    if t_n is not None and s_n is not None and t_n != s_n:
        raise UsageError(f"teacher {teacher} predicts {t_n} classes but student {student} predicts {s_n}; "
                         "distillation needs a teacher and a student over the same classes")
    t_names, s_names = teacher_ckpt.metadata.get("class_names"), student_ckpt.metadata.get("class_names")
    if t_names and s_names and list(t_names) != list(s_names):
        raise UsageError(f"teacher {teacher} ({teacher_ckpt.metadata.get('dataset')}) and student {student} "
                         f"({student_ckpt.metadata.get('dataset')}) have different class names; "
                         "distillation needs a teacher and a student over the same classes")


# --------------------------------------------------------------------------------------------------
# Stochastic depth
#
# Deep Networks with Stochastic Depth (Huang et al. 2016, arXiv:1603.09382): in training, the residual
# branch f_l of block l is kept with probability p_l = 1 - l/L (1 - p_L) (linear decay, l = 1..L), so
# H_l = ReLU(b_l f_l(H_{l-1}) + id(H_{l-1})) with b_l ~ Bernoulli(p_l). We use the "inverted" form of
# torchvision.ops.stochastic_depth: a kept branch is scaled by 1/p_l in training, so that inference is
# the plain network with no rescaling (Huang et al. instead multiply f_l by p_l at test time; the two
# have the same expectation). The drop is a forward hook on the last BatchNorm of each residual branch:
# no module is added or renamed, the state dict keeps its keys, and in eval mode the hook does nothing,
# so a model trained this way saves, loads, exports to ONNX and prunes as a plain model.

# "module.Class" of a residual block -> attribute name of the last layer of its residual branch.
RESIDUAL_BLOCKS: Registry[str] = Registry("residual block type")
RESIDUAL_BLOCKS.register("torchvision.models.resnet.BasicBlock", "bn2")
RESIDUAL_BLOCKS.register("torchvision.models.resnet.Bottleneck", "bn3")
_SD_ATTR = "_deploycomp_stochastic_depth"


def survival_probabilities(num_blocks: int, p_last: float) -> list[float]:
    """Linear decay rule: ``p_l = 1 - l/L (1 - p_last)`` for blocks ``l = 1..L`` (input to output)."""
    return [1 - (i / num_blocks) * (1 - p_last) for i in range(1, num_blocks + 1)]


def residual_blocks(model) -> list[tuple[str, Any, Any]]:
    """``(name, block, last layer of its residual branch)`` for every known residual block, in order."""
    found = []
    for name, m in model.named_modules():
        key = f"{type(m).__module__}.{type(m).__qualname__}"
        if key in RESIDUAL_BLOCKS:
            end = getattr(m, RESIDUAL_BLOCKS.get(key), None)
            if end is not None:
                found.append((name, m, end))
    return found


class _DropBranch:
    """Forward hook on a branch's last layer: zero the branch with probability 1 - survival in training."""

    def __init__(self, block, survival: float, mode: str):
        self.block, self.survival, self.mode = block, survival, mode

    def __call__(self, module, inputs, output):
        if not self.block.training or self.survival >= 1:
            return None
        from torchvision.ops import stochastic_depth

        return stochastic_depth(output, 1 - self.survival, self.mode, training=True)


def apply_stochastic_depth(model, p_last: float, mode: str = "batch") -> dict[str, float]:
    """Make ``model``'s residual branches drop in training; returns ``{block name: survival p_l}``.

    Args:
        p_last: survival probability p_L of the last block, in (0, 1] (Huang et al. use 0.5).
        mode: ``"batch"`` drops a block for the whole mini-batch (Huang et al.); ``"row"`` per sample.
    """
    check(0 < p_last <= 1, f"--stochastic-depth is the last block's survival probability P_L and must be in "
                           f"(0, 1] (e.g. 0.5), got {p_last}")
    check(mode in ("batch", "row"), f"stochastic depth mode must be 'batch' or 'row', got {mode!r}")
    blocks = residual_blocks(model)
    check(len(blocks) > 0, f"--stochastic-depth needs residual blocks ({', '.join(RESIDUAL_BLOCKS.names())}), "
                           f"as in resnet18, light_resnet18 or resnet*_small; this {type(model).__name__} has none")
    remove_stochastic_depth(model)
    handles, survival = [], {}
    for (name, block, end), p in zip(blocks, survival_probabilities(len(blocks), p_last), strict=True):
        handles.append(end.register_forward_hook(_DropBranch(block, p, mode)))
        survival[name] = p
    setattr(model, _SD_ATTR, handles)
    return survival


def remove_stochastic_depth(model) -> None:
    """Remove the hooks of :func:`apply_stochastic_depth` (a no-op for a model without them)."""
    for handle in getattr(model, _SD_ATTR, ()):
        handle.remove()
    if hasattr(model, _SD_ATTR):
        delattr(model, _SD_ATTR)


# --------------------------------------------------------------------------------------------------
# Freezing (transfer learning: the KD report trained a ResNet-18 with the stem and layer1 frozen)

# Aliases for groups of top-level modules; "stem" is the first convolution and its BatchNorm of ResNets.
FREEZE_ALIASES = {"stem": ("conv1", "bn1")}


def parse_prefixes(spec: str | Sequence[str]) -> list[str]:
    """``"stem,layer1"`` -> ``["stem", "layer1"]``."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    prefixes = [p.strip() for p in items if p.strip()]
    check(len(prefixes) > 0, f"--freeze needs module-name prefixes such as stem,layer1; got {spec!r}")
    return prefixes


def resolve_prefixes(model, spec: str | Sequence[str]) -> list[str]:
    """Expand aliases and check every prefix names parameters of ``model``; unknown -> one-line error."""
    params = [n for n, _ in model.named_parameters()]
    top = list(dict.fromkeys(n.split(".")[0] for n in params))
    valid = f"top-level modules with parameters: {', '.join(top)} (and 'stem' = conv1+bn1 for ResNets)"
    resolved: list[str] = []
    for prefix in parse_prefixes(spec):
        expanded = FREEZE_ALIASES.get(prefix, (prefix,))
        for p in expanded:
            if not any(n == p or n.startswith(p + ".") for n in params):
                what = f"{prefix!r} (= {'+'.join(expanded)})" if prefix in FREEZE_ALIASES else repr(p)
                raise UsageError(f"--freeze {what} matches no parameter of {type(model).__name__}; {valid}")
            if p not in resolved:
                resolved.append(p)
    return resolved


def freeze(model, spec: str | Sequence[str]) -> list[str]:
    """Freeze the parameters under the module-name prefixes ``spec`` (e.g. ``"stem,layer1"``).

    Frozen parameters get ``requires_grad=False`` (so ``info`` counts them as non-trainable and
    ``fit()`` leaves them out of the optimizer), and frozen BatchNorm layers also keep their running
    statistics (they always run in eval mode, like torchvision's FrozenBatchNorm2d). Returns the
    resolved prefixes, which a checkpoint records as a ``freeze`` surgery so loading re-applies them.
    """
    import torch.nn as nn

    prefixes = resolve_prefixes(model, spec)

    def under(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    for name, p in model.named_parameters():
        if under(name):
            p.requires_grad_(False)
    for name, m in model.named_modules():
        if under(name) and isinstance(m, nn.modules.batchnorm._BatchNorm) and not hasattr(m, _FROZEN_BN_ATTR):
            setattr(m, _FROZEN_BN_ATTR, m.register_forward_pre_hook(_keep_eval))
    return prefixes


_FROZEN_BN_ATTR = "_deploycomp_frozen_bn"


def freeze_checkpoint(ckpt, spec: str | Sequence[str]) -> list[str]:
    """:func:`freeze` ``ckpt.model`` and record a ``freeze`` surgery, so that loading freezes it again."""
    prefixes = freeze(ckpt.model, spec)
    ckpt.add_surgery("freeze", prefixes=prefixes)
    return prefixes


def _keep_eval(module, inputs) -> None:
    module.training = False


def unfreeze(model) -> None:
    """Make every parameter trainable again and let frozen BatchNorm layers update their statistics."""
    for p in model.parameters():
        p.requires_grad_(True)
    for m in model.modules():
        handle = getattr(m, _FROZEN_BN_ATTR, None)
        if handle is not None:
            handle.remove()
            delattr(m, _FROZEN_BN_ATTR)


def training_setup(stochastic_depth: float | None = None, freeze_spec: str | None = None):
    """``(prepare, lineage)`` for ``run_training`` from ``train --stochastic-depth / --freeze``.

    ``prepare(ckpt, data)`` edits the loaded model before training and records a ``freeze`` surgery
    (replayed on load). ``freeze_spec="none"`` unfreezes a checkpoint that was saved frozen.
    """
    lineage: dict[str, Any] = {}
    if stochastic_depth is not None:
        check(0 < stochastic_depth <= 1, f"--stochastic-depth is the last block's survival probability P_L and "
                                         f"must be in (0, 1] (e.g. 0.5), got {stochastic_depth}")
        lineage.update(stochastic_depth=stochastic_depth, stochastic_depth_mode="batch")
    if freeze_spec is not None:
        lineage["freeze"] = parse_prefixes(freeze_spec)
    if not lineage:
        return None, lineage

    def prepare(ckpt, data) -> None:
        from deploycomp import console

        if freeze_spec is not None and freeze_spec.strip().lower() == "none":
            unfreeze(ckpt.model)
            ckpt.surgeries[:] = [s for s in ckpt.surgeries if s["op"] != "freeze"]
        elif freeze_spec is not None:
            prefixes = freeze_checkpoint(ckpt, freeze_spec)
            frozen = sum(p.numel() for p in ckpt.model.parameters() if not p.requires_grad)
            console.info(f"frozen: {', '.join(prefixes)} ({frozen:,} parameters)")
        if stochastic_depth is not None:
            survival = apply_stochastic_depth(ckpt.model, stochastic_depth)
            console.info(f"stochastic depth over {len(survival)} blocks, survival "
                         f"{max(survival.values()):.3f} -> {min(survival.values()):.3f}")

    return prepare, lineage
