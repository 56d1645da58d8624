"""Memory checks before big allocations: an absurd batch or input size ends in one line, not an OOM kill.

Linux hands out memory lazily, so a forward pass that needs more than the machine has may not fail
when it allocates but get the process killed later by the kernel. A pass whose activations are
estimated to exceed the memory available now is refused before it starts, with the numbers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from deploycomp.errors import ResourceError, format_bytes

MAX_SIDE = 65_536  # pixels: no image classifier takes an input side larger than this
# Peak memory of an inference pass, in multiples of its largest activation: that layer's input and
# output plus a residual branch held beside them.
PEAK_FACTOR = 3


def available_memory() -> int | None:
    """Bytes a new allocation can get now: MemAvailable, or less under a cgroup (container) memory limit.

    None when unknown (then nothing is refused).
    """
    have = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    have = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if have is None:
        try:
            have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:  # cgroup v2: memory.max is "max" or a number of bytes
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text().strip())
            have = min(have, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return have


def activation_elements(model, chw: tuple[int, ...]) -> tuple[int, int]:
    """(largest, total) elements of the layer outputs of one sample of shape ``chw``.

    Measured on a copy of the input no larger than 64 px a side (cheap whatever the size asked), then
    scaled by the area: convolutional feature maps grow with the input's area.
    """
    import torch

    c, h, w = chw
    scale = min(1.0, 64 / max(h, w))
    hr, wr = max(1, round(h * scale)), max(1, round(w * scale))
    seen = [c * hr * wr, c * hr * wr]  # largest, total

    def hook(module, inputs, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                seen[0] = max(seen[0], t.numel())
                seen[1] += t.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, c, hr, wr, device=next(model.parameters(), torch.zeros(0)).device))
    except Exception:  # noqa: BLE001 - too small for this model's pooling: judge by the input alone
        pass
    finally:
        for hnd in handles:
            hnd.remove()
        model.train(was_training)
    area = (h * w) / (hr * wr)
    return math.ceil(seen[0] * area), math.ceil(seen[1] * area)


def device_memory(device=None) -> int | None:
    """Bytes free on ``device``: a CUDA device's free memory, else the host's available memory."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    return available_memory()


def check_forward_fits(model, chw: tuple[int, ...], batch: int, what: str = "", *, training: bool = False,
                       device=None, bytes_per_value: int = 4) -> None:
    """Refuse a pass of ``batch`` samples of shape ``chw`` through ``model`` that cannot fit in memory.

    Inference needs about the largest activation a few times over; training keeps every activation
    for the backward pass. The estimate leans low (it leaves out weights, gradients and workspace), so
    what it refuses would certainly not fit. ``what`` names the options to change, e.g. "--batch or
    --input-size"; ``bytes_per_value`` is 2 under mixed precision.
    """
    check_side(chw)
    largest, total = activation_elements(model, chw)
    per_sample = total if training else math.prod(chw) + PEAK_FACTOR * largest
    need = batch * per_sample * bytes_per_value
    have = device_memory(device)
    if have is not None and need > have:
        mode = "a training step" if training else "a forward pass"
        raise ResourceError(f"{mode} of batch {batch} at input {'x'.join(map(str, chw))} needs about "
                            f"{format_bytes(need)} of memory, more than the {format_bytes(have)} available"
                            f"{' on ' + str(device) if device is not None and str(device) != 'cpu' else ''}; "
                            f"ask for less{' (' + what + ')' if what else ''}")


def check_side(chw: tuple[int, ...]) -> None:
    if any(s > MAX_SIDE for s in chw[1:]):
        raise ResourceError(f"input size {'x'.join(map(str, chw[1:]))} is larger than any image classifier "
                            f"takes (at most {MAX_SIDE} px a side); give a realistic --input-size")
