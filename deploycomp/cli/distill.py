"""deploycomp distill: knowledge distillation from a teacher into a student with the one shared fit()."""

from __future__ import annotations

import click

from deploycomp.cli.options import (
    data_options,
    device_option,
    input_size_option,
    json_option,
    pass_options,
    print_json,
)
from deploycomp.cli.train import train_config, train_options


# The KD report's setting (Adam, lr 1e-3, batch 128) instead of train's SGD; lr stays "the optimizer's default".
@click.command(context_settings={"default_map": {"optimizer": "adam"}})
@click.option("--teacher", default=None, metavar="NAME|PATH",
              help="Teacher: a trained checkpoint (or a zoo name or user code). Default: the shipped Fashion-MNIST "
                   "baseline.")
@click.option("--teacher-arch", default=None, metavar="NAME|CODE",
              help="The user code (path/to/file.py:factory) a --teacher checkpoint was built from, or the "
                   "architecture of a plain state dict; loading runs that code, so it is never taken from the file "
                   "alone.")
@click.option("--student", required=True, metavar="NAME|PATH|CODE",
              help="Student: a zoo name (light_resnet18, resnet18, ...), user code (path/to/file.py:factory) or a "
                   "checkpoint, e.g. a pruned model.")
@click.option("--student-arch", default=None, metavar="NAME|CODE",
              help="Like --teacher-arch, for a --student checkpoint or state dict.")
@click.option("--temperature", "-T", type=float, default=2.0, show_default=True,
              help="Softmax temperature T > 0 of the soft targets.")
@click.option("--alpha", type=float, default=0.5, show_default=True,
              help="Weight of the soft-target term alpha * T^2 * KL(teacher || student).")
@click.option("--lambda", "lam", type=float, default=0.5, show_default=True,
              help="Weight of the cross-entropy term on the labels (independent of --alpha).")
@data_options
@device_option
@train_options
@click.option("--in-channels", type=int, default=None,
              help="Input channels of a fresh zoo student (default: the dataset's).")
@click.option("--weights", default=None, metavar="FILE|NAME",
              help="Weights of a fresh student: a state-dict file, or published weights by name (torchvision, timm).")
@input_size_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint to write. Default: <student>-distilled.pt in the current directory.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of this same command from its .resume.pt.")
@json_option
@pass_options
def distill(opts: dict) -> None:
    """Train a student on loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + lambda * CE(s, y).

    The teacher runs in eval mode without gradients; teacher and student must predict the same
    classes. The checkpoint's lineage records the teacher, T, alpha, lambda and the training options.

    \b
    Examples (the KD report's light student; the first distils from the shipped baseline):
      deploycomp distill --student light_resnet18 --epochs 10 -o light_kd.pt
      deploycomp distill --teacher resnet18_fmnist.pt --student light_resnet18 --epochs 10 -o light_kd.pt
      deploycomp distill --teacher my.pt --teacher-arch mynet.py:make --student light_resnet18 -o light_kd.pt
    """
    from deploycomp.distill import run_distillation

    student_options = {k: opts[k] for k in ("in_channels", "weights", "input_size") if opts[k] is not None}
    if opts["student_arch"] is not None:
        student_options["arch"] = opts["student_arch"]
    record = run_distillation(opts["teacher"], opts["student"], train_config(opts), teacher_arch=opts["teacher_arch"],
                              temperature=opts["temperature"], alpha=opts["alpha"], lam=opts["lam"],
                              output=opts["output"], data=opts["data"], data_dir=opts["data_dir"],
                              resume=opts["resume"], **student_options)
    if opts["as_json"]:
        print_json(record)
