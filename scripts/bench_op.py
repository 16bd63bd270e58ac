#!/usr/bin/env python
"""Times the fused BatchNorm+add+ReLU op against the unfused expression (eager and torch.compile) and the
memory-bandwidth bound, at a ResNet activation. Prints a markdown table; --json writes the figures."""
import argparse

import resnet_deploy  # noqa: F401  (registers the operators)
from resnet_deploy import op_benchmark


def parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected a shape like 64x64x24x24 (N x C x H x W), got {text!r}")
    return shape


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=parse_shape, action="append",
                        help="N x C x H x W, repeatable (default 64x64x24x24)")
    parser.add_argument("--layout", choices=sorted(op_benchmark.FORMATS), action="append",
                        help="memory layout, repeatable (default: both)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per figure")
    parser.add_argument("--json", help="write the figures to this JSON file")
    args = parser.parse_args()
    op_benchmark.run(args.shape or [(64, 64, 24, 24)], args.layout or ["nchw", "channels_last"],
                     with_compile=not args.no_compile, min_run_time=args.min_run_time, json_path=args.json)


if __name__ == "__main__":
    main()
