#!/usr/bin/env python
"""Times the fused BatchNorm+add+ReLU op against the unfused expression (eager and torch.compile) and the
memory-bandwidth bound, at a ResNet activation (or every fused site of ResNet-18), and optionally whole fused
vs unfused ResNet-18 training steps and inference. Prints markdown tables; --json writes the figures.

Freed memory is kept in the process for reuse (resnet_deploy.allocator) for every implementation alike, as
`resnet-deploy train` does; --system-malloc measures with glibc's defaults instead."""
import argparse
import json

import resnet_deploy  # noqa: F401  (registers the operators)
from resnet_deploy import allocator, op_benchmark


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
    parser.add_argument("--resnet18-sites", action="store_true",
                        help="time every fused site of ResNet-18 at 96x96, batch 64, instead of --shape")
    parser.add_argument("--end-to-end", action="store_true",
                        help="also time fused vs unfused ResNet-18 (96x96): a training step at batch 64 and "
                             "eval at batch 1, 8, 64, in interleaved rounds, each speedup the median of the "
                             "per-round ratios with a 95%% confidence interval, over each of two identical "
                             "unfused models in the same rounds (faster only if over both); each eval forward is "
                             "profiled to say where its time goes (about 7 minutes)")
    parser.add_argument("--compare-stores", action="store_true",
                        help="also time the fused op with streaming against normal stores for its outputs "
                             "(interleaved in this process), at the first --shape")
    parser.add_argument("--per-call", action="store_true",
                        help="also time every step at 1x512x3x3 (18 KB per tensor), where what remains is each "
                             "step's fixed cost per call")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's malloc defaults (freed blocks go back to the OS, new ones page-fault)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    args = parser.parse_args()
    if not args.system_malloc:
        allocator.retain_freed_memory()
    print(f"malloc: {allocator.status()}")
    shapes, residual_flags = args.shape or [(64, 64, 24, 24)], None
    if args.resnet18_sites:
        sites = op_benchmark.resnet18_fused_sites()
        print("ResNet-18 fused sites at 96x96, batch 64 (shape, residual, count):", sites)
        shapes, residual_flags = [s for s, _, _ in sites], [r for _, r, _ in sites]
    report = op_benchmark.run(shapes, args.layout or ["nchw", "channels_last"], with_compile=not args.no_compile,
                              min_run_time=args.min_run_time, residual_flags=residual_flags)
    if args.compare_stores:
        print("fused op, streaming vs normal stores:")
        report["stores"] = op_benchmark.compare_stores(shapes[0], args.layout or ["nchw", "channels_last"],
                                                       args.min_run_time)
    if args.per_call:
        report["per_call"] = op_benchmark.per_call_costs(min_run_time=args.min_run_time)
    if args.end_to_end:
        report["end_to_end"] = op_benchmark.end_to_end()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
