"""The `resnet-deploy` command: one subcommand per stage of the pipeline.

Each subcommand is an add_<name>_parser(subparsers) function that declares its flags and sets a handler;
a handler takes the parsed arguments and does the work, importing its stage's module only when it runs.
Errors a user can cause (ValueError, OSError) are printed as one line, without a traceback, and exit 1;
RESNET_DEPLOY_DEBUG=1 (any value but "" and "0") shows the traceback. Every subcommand keeps freed memory
for reuse (resnet_deploy.allocator) unless --system-malloc is given.
"""
import argparse
import os
import platform
import sys
from typing import List, Optional

import torch

import resnet_deploy
from resnet_deploy import allocator, bench, demo, export, infer


# ------------------------------------------------------------------------------------------------- info
def add_info_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="versions and how the operator library was built",
                                   description="Print the versions of Python, torch, ONNX and ONNX Runtime, whether "
                                               "the operator library has CUDA kernels, and which CPU kernels it runs.")
    parser.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> None:
    from resnet_deploy import _library

    import torchvision

    print(f"resnet_deploy {resnet_deploy.__version__}")
    print(f"python {platform.python_version()}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, CUDA available: {torch.cuda.is_available()}, "
          f"{torch.get_num_threads()} threads)")
    print(f"torchvision {torchvision.__version__}")
    for key, value in _library.build_info().items():
        print(f"operator library {key}: {value}")
    kernels = _library.cpu_kernels()
    lanes = kernels["small_plane_lanes"]
    streaming = kernels["streaming_min_bytes"]
    print(f"operator library CPU kernels: {kernels['level']}; small NCHW planes "
          + (f"in {lanes} vector lanes" if lanes else "as rows of repeated values") + "; streaming stores "
          + (f"from {streaming / 2**20:.1f} MB" if streaming >= 0 else "off"))
    print(f"malloc: {allocator.status()}")


# ------------------------------------------------------------------------------------------------ train
def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train the ResNet on Fashion-MNIST (also under torchrun)",
        description="Train the d2l ResNet on Fashion-MNIST. A preset sets every knob; any flag overrides it. "
                    "Under `torchrun --nproc_per_node=N` it trains with DistributedDataParallel.")
    from resnet_deploy.train import PRESETS, TrainConfig

    # default=None throughout: a flag the user did not give leaves the preset's value, which the help shows.
    def knob(name: str, what: str = "") -> str:
        values = {preset: getattr(TrainConfig.from_preset(preset), name) for preset in PRESETS}
        shown = {preset: ("on" if v else "off") if isinstance(v, bool) else v for preset, v in values.items()}
        return f"{what}{'; ' if what else ''}preset: " + ", ".join(f"{v} ({p})" for p, v in shown.items())

    add = parser.add_argument
    bool_flag = argparse.BooleanOptionalAction
    add("--preset", choices=["quick", "d2l"], default="quick",
        help="quick: 28x28, 4 epochs, one-cycle SGD (minutes on 2 cores); d2l: the chapter's 96x96 recipe")
    add("--out", help="run directory for checkpoint.pt, metrics.json and curves.png (default: runs/<preset>)")
    add("--resume", action="store_true", default=None, help="continue the run in --out from its last checkpoint")
    add("--data-dir", help="directory with the Fashion-MNIST idx files (then $RESNET_DEPLOY_DATA, the system "
                           "dataset, a download)")
    add("--download", action=bool_flag, help="allow a torchvision download when no local copy is found (default: on)")
    add("--arch", choices=["resnet18", "resnet34"], help=knob("arch"))
    add("--fused", action=bool_flag, help="use the fused BatchNorm+add+ReLU operator (default) or plain PyTorch")
    add("--image-size", type=int, help=knob("image_size", "images are resized to this height and width"))
    add("--epochs", type=int, help=knob("epochs"))
    add("--batch-size", type=int, help=knob("batch_size", "per process, at least 2"))
    add("--optimizer", choices=["sgd", "adamw"], help=knob("optimizer"))
    add("--lr", type=float, help=knob("lr", "learning rate (the peak under --schedule onecycle)"))
    add("--momentum", type=float, help=knob("momentum", "SGD momentum, in [0, 1)"))
    add("--nesterov", action=bool_flag, help=knob("nesterov", "Nesterov momentum (SGD)"))
    add("--weight-decay", type=float, help=knob("weight_decay"))
    add("--schedule", choices=["onecycle", "constant"], help=knob("schedule", "learning-rate schedule"))
    add("--label-smoothing", type=float, help=knob("label_smoothing", "in [0, 1)"))
    add("--augment", action=bool_flag, help=knob("augment", "random crop with 2-pixel padding and horizontal flip"))
    add("--seed", type=int, help=knob("seed", "seeds weights, data order and augmentation"))
    add("--threads", type=int,
        help="torch threads per process, at most the available cores (default: available cores / local processes)")
    add("--progress", action=bool_flag, help="show a progress bar (default: when stderr is a terminal)")
    parser.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> None:
    from resnet_deploy.train import TrainConfig, config_fields, train

    given = {name: value for name, value in vars(args).items()
             if name in config_fields() and name != "preset" and value is not None}
    train(TrainConfig.from_preset(args.preset, **given), given=given)


# ------------------------------------------------------------------------------------------------- main
PARSERS = [add_info_parser, add_train_parser, export.add_parser, infer.add_parser, bench.add_parser, demo.add_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-deploy", description=resnet_deploy.__doc__)
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's malloc defaults; by default freed memory stays in the process for reuse, "
                             "so new activations do not page-fault (resident memory stays near its peak)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in PARSERS:
        add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "progress", False) is None:  # bars redrawn with \r only help a terminal, not a log file
        args.progress = sys.stderr.isatty()
    if not args.system_malloc:
        allocator.retain_freed_memory()
    try:
        args.handler(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit: output to a pipe is block-buffered
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 1
    except (ValueError, OSError) as error:
        if os.environ.get("RESNET_DEPLOY_DEBUG", "") not in ("", "0"):
            raise
        print(f"resnet-deploy {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"resnet-deploy {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
