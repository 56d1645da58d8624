"""Quantization-aware training (QAT): fine-tune a model with its INT8 target's rounding simulated.

deploycomp quantizes in the ONNX graph (:mod:`deploycomp.quantize`: onnxruntime's quantizer, shaped for
a target runtime). QAT therefore does not write Q/DQ of its own: it trains the PyTorch model against the
rounding that ``deploycomp quantize --target T`` will apply to it, and leaves the weights on the INT8
grid; ``export`` + ``quantize`` then make the graph with the target's own placement, so a QAT model is
accepted by ONNX Runtime and TensorRT exactly as a post-training one is (``quantize`` re-calibrates the
activation ranges on the same images QAT measured them on).

What is simulated, with torch's fake-quantization operators (``torch.fake_quantize_per_channel_affine``
and ``torch.fake_quantize_per_tensor_affine``: straight-through gradients, zero outside the range):

* **weights** of every Conv / ConvTranspose / Linear: symmetric per-output-channel INT8 with scale
  max|w| / 127 (/ 64 where the target uses 7-bit weights), recomputed at every step, exactly as
  onnxruntime computes it. Symmetric per-channel rounding does not change when a channel is multiplied
  by a factor, so rounding the unfolded weight rounds the weight BatchNorm is folded into in the graph to
  the very same integers: no BatchNorm folding is needed in training, in train or eval mode.
* **inputs** of those layers: per tensor, the target's activation type (ort-cpu: uint8 asymmetric over a
  range that includes 0; tensorrt: int8 symmetric, zero point 0), with onnxruntime's scale and zero point
  of the min/max over the calibration images ``quantize`` uses (512 training images, seed 0), measured on
  the float model in eval mode before training and again after every epoch, held fixed in between.

* for ort-cpu, which quantizes the tensors between the layers too: the outputs of BatchNorm (the
  convolution outputs of the folded graph; not where a ReLU follows, whose range onnxruntime uses for
  it), ReLU/ReLU6/LeakyReLU, Sigmoid, Hardsigmoid, Hardswish and pooling modules, and SiLU as the graph
  computes it (x * Sigmoid(x), the sigmoid and the product rounded; an in-place SiLU is made out-of-place
  while QAT is attached). Without these, EfficientNet-B0's simulated
  INT8 lost 0.9 points where onnxruntime's lost 5.0 (benchmarks/results/int8_accuracy.md).

Not simulated: products and sums written as code rather than modules (a squeeze-excite's ``scale * x``, a
residual ``+``) are rounded only where a simulated layer reads them. Layers a target keeps in float
(tensorrt: the first convolution and the classifier) stay unquantized in training as well, unless
``all_layers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from deploycomp import console
from deploycomp.errors import UsageError

DEFAULT_EPOCHS = 1  # a pipeline's qat step (`train --qat` takes train's --epochs)
LR_FACTOR = 0.01  # QAT's default learning rate: this share of the optimizer's training default
CALIB_SAMPLES = 512  # the same images `deploycomp quantize` calibrates on (its defaults)
CALIB_BATCH = 32
CALIB_SEED = 0


@dataclass(frozen=True)
class FakeQuant:
    """The INT8 rounding of one target, as onnxruntime's quantizer applies it."""

    target: str
    weight_qmax: int  # symmetric weights in [-qmax, qmax]
    act_qmin: int
    act_qmax: int
    act_symmetric: bool
    keep_float: str  # which layers the target keeps in float: "none" | "first_and_last"
    quantize_between: bool = False  # the target also quantizes the operators between the layers (ort-cpu)

    def activation_params(self, lo: float, hi: float) -> tuple[float, int]:
        """onnxruntime's ``compute_scale_zp``: scale and zero point of the range [lo, hi] (0 included)."""
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if self.act_symmetric:
            hi = max(-lo, hi)
            lo = -hi
        scale = (hi - lo) / (self.act_qmax - self.act_qmin)
        if scale < 1.1754944e-38:  # float32's smallest normal: onnxruntime then uses scale 1
            return 1.0, 0
        if self.act_symmetric:
            return scale, round((self.act_qmin + self.act_qmax) / 2)
        zero = min(max(round(self.act_qmin - lo / scale), self.act_qmin), self.act_qmax)
        return scale, zero


def fake_quant_for(target: str) -> FakeQuant:
    """The rounding ``deploycomp quantize --target TARGET`` applies (decided on this machine, like quantize)."""
    from deploycomp.quantize import INT8_TARGETS, first_and_last_layers

    t = INT8_TARGETS.get(target)
    signed = t.activations == "int8"
    qmin, qmax = ((-127, 127) if t.activation_symmetric else (-128, 127)) if signed else (0, 255)
    return FakeQuant(target=t.name, weight_qmax=64 if t.reduce_range() else 127, act_qmin=qmin, act_qmax=qmax,
                     act_symmetric=t.activation_symmetric,
                     keep_float="first_and_last" if t.float_layers is first_and_last_layers else "none",
                     quantize_between=t.op_types is None)


def _weighted_types() -> tuple[type, ...]:
    from torch import nn

    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def _out_axis(module) -> int:
    """The output-channel axis of a layer's weight (ConvTranspose keeps it second)."""
    from torch import nn

    return 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0


def _weight_fake_quant(axis: int, qmax: int):
    import torch
    from torch import nn

    class WeightFakeQuant(nn.Module):
        """Parametrization: symmetric per-channel INT8 rounding of a weight, scale max|w| / qmax."""

        def forward(self, w):
            dims = [d for d in range(w.dim()) if d != axis]
            absmax = w.detach().abs().amax(dim=dims).float()
            scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
            zero = torch.zeros_like(scale, dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(w, scale, zero, axis, -qmax, qmax)

    return WeightFakeQuant()


class _Range:
    """One quantized tensor: records its min/max (observing) or rounds it per tensor (training, evaluating)."""

    def __init__(self, spec: FakeQuant):
        self.spec, self.observing = spec, False
        self.lo, self.hi, self.params = math.inf, -math.inf, None

    def reset(self) -> None:
        self.observing, self.lo, self.hi = True, math.inf, -math.inf

    def finish(self) -> None:
        self.observing = False
        self.params = self.spec.activation_params(self.lo, self.hi) if self.lo <= self.hi else None

    def __call__(self, x):
        import torch

        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        if self.observing:
            self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
            return x
        if self.params is None:
            return x
        scale, zero = self.params
        q = torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, self.spec.act_qmin, self.spec.act_qmax)
        return q.to(x.dtype)


class _InputQuant:
    """Forward pre-hook of a weighted layer: its input rounded as the quantizer's Q/DQ in front of it."""

    def __init__(self, spec: FakeQuant):
        self.ranges = [_Range(spec)]

    def __call__(self, module, args):
        return (self.ranges[0](args[0]), *args[1:]) if args else None


class _OutputQuant:
    """Forward hook: the output rounded (ort-cpu quantizes the tensors between operators: the BatchNorm-folded
    convolution outputs, activations, pooling)."""

    def __init__(self, spec: FakeQuant):
        self.ranges = [_Range(spec)]

    def __call__(self, module, args, output):
        return self.ranges[0](output)


class _SiLUQuant:
    """Forward hook of SiLU, which the graph computes as x * Sigmoid(x): both the sigmoid and the product are
    quantized there, so the output is recomputed with the sigmoid rounded too."""

    def __init__(self, spec: FakeQuant):
        self.ranges = [_Range(spec), _Range(spec)]  # sigmoid, product

    def __call__(self, module, args, output):
        import torch

        x = args[0]
        return self.ranges[1](x * self.ranges[0](torch.sigmoid(x)))


def _between_types() -> tuple[type, ...]:
    """Modules whose outputs ort-cpu quantizes (every operator with an integer kernel in onnxruntime)."""
    from torch import nn

    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Sigmoid,
            nn.Hardsigmoid, nn.Hardswish, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d)


class QuantAwareModel:
    """A model with fake quantization attached; :meth:`remove` leaves its weights on the INT8 grid."""

    def __init__(self, model, spec: FakeQuant, calib: list, *, all_layers: bool = False):
        self.model, self.spec, self.calib = model, spec, calib
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _weighted_types())]
        if not layers:
            raise UsageError("QAT found no Conv or Linear layer to quantize in this model")
        self.skipped: list[str] = []
        if spec.keep_float == "first_and_last" and not all_layers:
            self.skipped = _first_conv_and_last_linear(model, layers, calib)
        self.layers = [(n, m) for n, m in layers if n not in self.skipped]
        self._hooks, self._quants, self._inplace = [], [], []
        self._attach()
        self.calibrate()

    def _attach(self) -> None:
        from torch import nn
        from torch.nn.utils import parametrize

        for _, m in self.layers:
            parametrize.register_parametrization(m, "weight", _weight_fake_quant(_out_axis(m), self.spec.weight_qmax))
            hook = _InputQuant(self.spec)
            self._quants.append(hook)
            self._hooks.append(m.register_forward_pre_hook(hook))
        if not self.spec.quantize_between:
            return
        folded_into_relu = _norms_before_relu(self.model, self.calib)
        for name, m in self.model.named_modules():
            if name in folded_into_relu:
                continue
            kind = _SiLUQuant if isinstance(m, nn.SiLU) else _OutputQuant if isinstance(m, _between_types()) else None
            if kind is _SiLUQuant and getattr(m, "inplace", False):
                m.inplace = False  # the hook recomputes from the input, which an in-place SiLU overwrites
                self._inplace.append(m)
            if kind is not None:
                hook = kind(self.spec)
                self._quants.append(hook)
                self._hooks.append(m.register_forward_hook(hook))

    def _ranges(self):
        return [r for q in self._quants for r in q.ranges]

    def calibrate(self) -> None:
        """Ranges of the float model (weights already on the grid), in eval mode, on the calibration images."""
        for r in self._ranges():
            r.reset()
        try:
            _eval_forward(self.model, [x for x, _ in self.calib])
        finally:
            for r in self._ranges():
                r.finish()

    @property
    def between(self) -> int:
        """Operators whose outputs are rounded too (ort-cpu): the hooks beyond one per layer."""
        return len(self._quants) - len(self.layers)

    @property
    def calib_images(self) -> int:
        return sum(len(x) for x, _ in self.calib)

    def remove(self) -> None:
        """Detach the fake quantization; the weights keep their rounded (INT8-grid) values."""
        from torch.nn.utils import parametrize

        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for m in self._inplace:
            m.inplace = True
        self._inplace.clear()
        for _, m in self.layers:
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)

    def describe(self) -> dict[str, Any]:
        s = self.spec
        return {"target": s.target, "layers": len(self.layers), "float_layers": self.skipped,
                "operators_between": self.between,
                "weights": f"int8 symmetric per-channel, [-{s.weight_qmax}, {s.weight_qmax}]",
                "activations": f"{'int8 symmetric' if s.act_symmetric else 'uint8 asymmetric'} per-tensor, "
                               f"[{s.act_qmin}, {s.act_qmax}], min/max on {self.calib_images} "
                               "training images, re-measured after every epoch",
                "simulated_by": "torch.fake_quantize_per_channel_affine / fake_quantize_per_tensor_affine"}


def _call_order(model, modules, calib) -> list[str]:
    """The names of ``modules`` ((name, module) pairs) in the order one calibration image calls them."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n)) for n, m in modules]
    try:
        _eval_forward(model, [calib[0][0][:1]])
    finally:
        for h in hooks:
            h.remove()
    return order


def _eval_forward(model, batches) -> None:
    """Run ``batches`` through ``model`` in eval mode without gradients; its train/eval mode is restored."""
    import torch

    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                model(x.to(device))
    finally:
        model.train(was_training)


def _first_conv_and_last_linear(model, layers, calib) -> list[str]:
    """The first convolution and the last Linear to run (tensorrt keeps the graph's first Conv and last Gemm)."""
    from torch import nn

    order, kinds = _call_order(model, layers, calib), dict(layers)
    convs = [n for n in order if isinstance(kinds[n], (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    linears = [n for n in order if isinstance(kinds[n], nn.Linear)]
    return list(dict.fromkeys(convs[:1] + linears[-1:]))


def _norms_before_relu(model, calib) -> set[str]:
    """BatchNorm modules whose next call is a ReLU/ReLU6: onnxruntime quantizes such a (folded) convolution
    output once, with the ReLU's range, so only the ReLU's output is rounded."""
    from torch import nn

    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    order, kinds = _call_order(model, leaves, calib), dict(leaves)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    return {a for a, b in zip(order, order[1:], strict=False) if isinstance(kinds[a], norms)
            and isinstance(kinds[b], (nn.ReLU, nn.ReLU6))}


def set_default_lr(config) -> None:
    """QAT's learning rate when none is given: ``LR_FACTOR`` of the optimizer's training default (in place)."""
    from deploycomp.train import default_lr as training_lr

    if config.lr is None:
        config.lr = LR_FACTOR * training_lr(config.optimizer)


def calibration_images(dataset, samples: int = CALIB_SAMPLES) -> list:
    """The (x, y) batches `deploycomp quantize --calib-samples N` calibrates on (fewer when the split is smaller):
    the first ``samples`` of the same seeded permutation, whatever the batch size."""
    from deploycomp.data import calibration_batches

    n = min(samples, len(dataset))
    return calibration_batches(dataset, n, min(CALIB_BATCH, n), seed=CALIB_SEED)


def qat_setup(target: str, *, all_layers: bool = False, data_dir=None, calib_samples: int = CALIB_SAMPLES):
    """``(prepare, after_epoch, finish, lineage)`` for :func:`deploycomp.workflows.run_training` (``train --qat``).

    ``prepare`` attaches fake quantization for ``target`` (a name in ``INT8_TARGETS``) after measuring the
    input ranges on ``calib_samples`` images of the un-augmented training split (those ``quantize`` will
    use); ``after_epoch`` re-measures them (before the epoch's validation, which therefore scores the
    simulated INT8 model ``quantize`` will make); ``finish`` detaches it (the weights stay on the grid) and
    records what was simulated in the lineage.
    """
    spec = fake_quant_for(target)
    state: dict[str, Any] = {}
    lineage: dict[str, Any] = {"qat": {"target": spec.target, "all_layers": all_layers}}

    def prepare(ckpt, data) -> None:
        from deploycomp.data import load_dataset
        from deploycomp.inputs import model_inputs

        train, _ = load_dataset(data.info.name, "train", data_dir, input_size=tuple(data.info.input_shape[1:]),
                                fit=model_inputs(ckpt))
        qat = state["qat"] = QuantAwareModel(ckpt.model, spec, calibration_images(train, calib_samples),
                                             all_layers=all_layers)
        kept = f"; kept in float as the target keeps them: {', '.join(qat.skipped)}" if qat.skipped else ""
        between = f" and the outputs of {qat.between} operators between them" if qat.between else ""
        console.info(f"QAT for {spec.target}: fake INT8 on {len(qat.layers)} layers (weights per channel, inputs "
                     f"per tensor){between}, ranges from {qat.calib_images} training images{kept}")

    def after_epoch() -> None:
        state["qat"].calibrate()

    def finish(ckpt) -> None:
        qat = state["qat"]
        qat.remove()
        lineage["qat"].update(qat.describe())

    return prepare, after_epoch, finish, lineage
