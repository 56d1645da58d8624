"""deploycomp train: train or fine-tune a model with the one shared fit()."""

from __future__ import annotations

import click

from deploycomp.cli.options import (
    compose,
    data_options,
    device_option,
    json_option,
    model_kwargs,
    model_options,
    pass_options,
    positive_int,
    print_json,
)

# Shared with every command that trains (prune's fine-tuning, distill).
train_options = compose(
    click.option("--epochs", type=int, default=10, show_default=True, callback=positive_int("--epochs")),
    click.option("--batch-size", type=int, default=128, show_default=True, callback=positive_int("--batch-size")),
    click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default="sgd", show_default=True),
    click.option("--lr", type=float, default=None, help="Learning rate. Default: 0.1 for SGD, 1e-3 for Adam."),
    click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum (Nesterov)."),
    click.option("--weight-decay", type=float, default=5e-4, show_default=True),
    click.option("--schedule", type=click.Choice(["cosine", "step", "constant"]), default="cosine",
                 show_default=True, help="Learning-rate schedule over all steps."),
    click.option("--label-smoothing", type=float, default=0.0, show_default=True),
    click.option("--amp/--no-amp", default=None, help="Mixed precision. Default: on for CUDA, off on CPU."),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--train-samples", type=int, default=None,
                 help="Train on a deterministic subset of N training images (default: all)."),
    click.option("--val-samples", type=int, default=None,
                 help="Validate each epoch on a deterministic subset of N test images (default: all)."),
    click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes."),
)


def train_config(opts: dict):
    from deploycomp.train import TrainConfig

    return TrainConfig(epochs=opts["epochs"], batch_size=opts["batch_size"], optimizer=opts["optimizer"],
                       lr=opts["lr"], momentum=opts["momentum"], weight_decay=opts["weight_decay"],
                       schedule=opts["schedule"], label_smoothing=opts["label_smoothing"], amp=opts["amp"],
                       device=opts["device"], seed=opts["seed"], workers=opts["workers"],
                       train_samples=opts["train_samples"], val_samples=opts["val_samples"])


@click.command()
@model_options
@data_options
@device_option
@train_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint to write. Default: <model>-trained.pt in the current directory.")
@click.option("--sparsity", type=float, default=None, metavar="LAMBDA",
              help="Network slimming: add LAMBDA * sum|gamma| of BatchNorm layers to the loss (e.g. 1e-5, 1e-4).")
@click.option("--stochastic-depth", type=float, default=None, metavar="P_L",
              help="Stochastic depth (Huang et al. 2016): drop residual branches in training, block l of L "
                   "surviving with p_l = 1 - l/L (1 - P_L), e.g. 0.5; the plain network at inference.")
@click.option("--freeze", default=None, metavar="PREFIXES",
              help="Keep the parameters under these module-name prefixes fixed, e.g. stem,layer1 "
                   "(stem = conv1+bn1 of ResNets); 'none' unfreezes a checkpoint saved frozen.")
@click.option("--qat", "qat_target", default=None, metavar="ort-cpu|tensorrt",
              help="Quantization-aware training for `deploycomp quantize --target` this: fine-tune with the target's "
                   "INT8 rounding simulated (per-channel weights, per-tensor layer inputs over the calibration "
                   "images' ranges); the weights end on the INT8 grid. Then export and quantize as usual. Give a "
                   "trained checkpoint and a short run (about a tenth of the training epochs); --lr defaults to a "
                   "hundredth of the optimizer's default.")
@click.option("--qat-all-layers", is_flag=True,
              help="--qat tensorrt: simulate INT8 in the first convolution and the classifier too (for "
                   "`quantize --quantize-all-layers`).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of this same command from its .resume.pt.")
@json_option
@pass_options
def train(opts: dict) -> None:
    """Train (or continue training) a model on a dataset.

    A zoo name starts from scratch (or from --weights); a checkpoint continues from its weights.
    The training state is saved after every epoch to OUTPUT.resume.pt, so an interrupted run
    continues with --resume. Under `torchrun --nproc-per-node N` it trains with DDP.

    \b
    Examples:
      # the shipped baseline
      deploycomp train --model light_resnet18 --data fashion-mnist --epochs 6 -o models/light_resnet18_fmnist.pt
      # quantization-aware fine-tuning of it for ONNX Runtime's CPU INT8, then its INT8 graph
      deploycomp train --model models/light_resnet18_fmnist.pt --qat ort-cpu --epochs 1 -o qat.pt
      deploycomp export --model qat.pt -o qat.onnx && deploycomp quantize qat.onnx -p int8
    """
    from deploycomp.workflows import run_training

    penalties, lineage = [], {}
    if opts["sparsity"] is not None:
        from deploycomp.prune.slimming import bn_sparsity_penalty

        penalties.append(bn_sparsity_penalty(opts["sparsity"]))
        lineage["sparsity"] = opts["sparsity"]
    prepare = None
    if opts["stochastic_depth"] is not None or opts["freeze"] is not None:
        from deploycomp.distill import training_setup

        prepare, extra = training_setup(opts["stochastic_depth"], opts["freeze"])
        lineage.update(extra)
    config, hooks = train_config(opts), {}
    if opts["qat_target"] is not None or opts["qat_all_layers"]:
        from deploycomp.errors import check
        from deploycomp.qat import qat_setup, set_default_lr

        check(opts["qat_target"] is not None, "--qat-all-layers needs --qat TARGET, e.g. --qat tensorrt")
        check(prepare is None, "--qat cannot be combined with --stochastic-depth or --freeze")
        prepare, after_epoch, finish, extra = qat_setup(opts["qat_target"], all_layers=opts["qat_all_layers"],
                                                        data_dir=opts["data_dir"])
        hooks = {"after_epoch": after_epoch, "finish": finish}
        lineage.update(extra)
        set_default_lr(config)
    record = run_training(opts["model"], config, output=opts["output"], data=opts["data"],
                          data_dir=opts["data_dir"], resume=opts["resume"], penalties=penalties, lineage=lineage,
                          prepare=prepare, op="qat" if hooks else "train", **hooks, **model_kwargs(opts))
    if opts["as_json"]:
        print_json(record)
