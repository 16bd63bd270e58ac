"""Batch inference: `resnet-deploy infer ARTIFACT_DIR --input PATH` streams an input (see inputs.py) through
a runtime predictor batch by batch and writes one prediction per image as CSV or JSON:

  CSV   name, predicted, class, probability, label, label_class, then one probability column per class
  JSON  {"predictions": [{"name", "predicted", "class", "probability", "probabilities": {class: p},
                          "label", "label_class"}, ...], "summary": {...}}

name is the index in an idx / .npy file or the path inside a folder; label and label_class are present when
the input has labels (empty / absent for images whose label is unknown). The file is written under a
temporary name and renamed when complete. Unreadable images are skipped, named as they are met and
counted in the summary, which is also what infer() returns.
"""
import argparse
import csv
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from resnet_deploy import inputs, outputs, runtime

DEFAULT_BACKEND = "onnxruntime"
DEFAULT_BATCH_SIZE = 256
FORMATS = (".csv", ".json")


class PredictionWriter:
    """Predictions to a .csv or .json file, row by row; the file appears under its name only on close()."""

    def __init__(self, path: Union[str, Path], classes: Sequence[str]):
        self.path, self.classes = Path(path), list(classes)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.file = open(self.tmp, "w", newline="")
        self.rows = 0
        if self.path.suffix == ".csv":
            self.csv = csv.writer(self.file)
            self.csv.writerow(["name", "predicted", "class", "probability", "label", "label_class", *self.classes])
        else:
            self.csv = None
            self.file.write('{"predictions": [')

    def write(self, names: Sequence[str], probabilities: np.ndarray, labels: Optional[np.ndarray]) -> None:
        predicted = probabilities.argmax(1)
        for i, name in enumerate(names):
            p, label = probabilities[i], int(labels[i]) if labels is not None else -1
            top = int(predicted[i])
            if self.csv is not None:
                self.csv.writerow([name, top, self.classes[top], f"{p[top]:.6f}",
                                   label if label >= 0 else "", self.classes[label] if label >= 0 else "",
                                   *(f"{v:.6f}" for v in p)])
            else:
                record = {"name": name, "predicted": top, "class": self.classes[top], "probability": round(float(p[top]), 6),
                          "probabilities": {c: round(float(v), 6) for c, v in zip(self.classes, p)}}
                if label >= 0:
                    record.update(label=label, label_class=self.classes[label])
                self.file.write(("," if self.rows else "") + "\n  " + json.dumps(record))
            self.rows += 1

    def close(self, summary: Dict[str, Any]) -> None:
        if self.csv is None:
            self.file.write(f"\n], \"summary\": {json.dumps(summary)}}}\n")
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _check_labels(labels: np.ndarray, start: int, source: inputs.InputSource, classes: Sequence[str]) -> None:
    # A folder marks images whose folder names no class with -1; a labels file must give every image a class.
    lowest = 0 if source.labels_path else -1
    bad = np.flatnonzero((labels < lowest) | (labels >= len(classes)))
    if len(bad):
        raise ValueError(f"{source.labels_path} has label {int(labels[bad[0]])} for image {start + int(bad[0])}; "
                         f"expected labels 0 to {len(classes) - 1}, one per class of the model")


def infer(artifact_dir: Union[str, Path], input_path: Union[str, Path], output: Union[str, Path],
          backend: str = DEFAULT_BACKEND, batch_size: int = DEFAULT_BATCH_SIZE, threads: Optional[int] = None,
          labels: Optional[Union[str, Path]] = None, progress: bool = True,
          log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Predict every image of input_path with the artifacts of artifact_dir; write output; return the summary
    {images, unreadable: [{name, reason}], labelled, accuracy, confusion, seconds, images_per_sec, ...}."""
    output = Path(output)
    if output.suffix not in FORMATS:
        raise ValueError(f"--output {output} must end in .csv or .json, the two formats infer writes")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    outputs.check_output_file(output)
    manifest = runtime.read_manifest(artifact_dir, verify=False)  # load() verifies; here: fail early on bad input
    classes = manifest["classes"]
    source = inputs.open_input(input_path, classes, labels, image_size=tuple(manifest["preprocess"]["size"]))
    if source.count == 0:
        raise ValueError(f"no images found in {source.path} (it holds 0); expected at least one image to predict")
    predictor = runtime.load(artifact_dir, backend, threads=threads)
    log(f"predicting {source.count} images of {source.path} ({source.kind}"
        f"{', labels from ' + str(source.labels_path) if source.labels_path else ''}) with {predictor.backend}, "
        f"batch size {batch_size}, {predictor.threads} thread(s), into {output}")

    writer = PredictionWriter(output, classes)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)  # [label, predicted]
    seen, reported, started = 0, 0, time.perf_counter()
    bar = tqdm(total=source.count, unit="img", desc="infer", disable=not progress, dynamic_ncols=True,
               mininterval=0.5)
    try:
        # A folder may hold photos of any size: each is pre-processed as soon as it is decoded, so that a batch
        # holds model-sized inputs, not full-size pictures (12 MB each at 12 megapixels, 48 MB as float).
        for batch in source.batches(batch_size, prepare=lambda image: predictor.preprocess(image[None])):
            for name, reason in source.unreadable[reported:]:
                tqdm.write(f"unreadable image skipped: {name} ({reason})")
            reported = len(source.unreadable)
            if batch.labels is not None:
                _check_labels(batch.labels, seen, source, classes)
            model_input = (torch.cat(batch.images) if isinstance(batch.images, list)
                           else predictor.preprocess(batch.images))
            logits = predictor.predict(model_input)
            probabilities = torch.softmax(logits, dim=1).numpy()
            writer.write(batch.names, probabilities, batch.labels)
            if batch.labels is not None:
                known = batch.labels >= 0
                np.add.at(confusion, (batch.labels[known], probabilities.argmax(1)[known]), 1)
            seen += len(batch)
            bar.update(seen + len(source.unreadable) - bar.n)  # files done, readable or not
        for name, reason in source.unreadable[reported:]:
            tqdm.write(f"unreadable image skipped: {name} ({reason})")
        bar.update(seen + len(source.unreadable) - bar.n)
        bar.close()
        if seen == 0:  # an empty predictions file would pass for a result; the writer's abort leaves none
            raise ValueError(f"no readable images in {source.path}: all {len(source.unreadable)} image files failed "
                             f"to decode; expected at least one readable PNG or JPEG image")
        seconds = time.perf_counter() - started
        labelled = int(confusion.sum())
        summary = {
            "input": str(source.path), "kind": source.kind, "labels": str(source.labels_path) if source.labels_path else None,
            "artifact_dir": str(artifact_dir), "backend": predictor.backend, "device": predictor.device,
            "threads": predictor.threads, "batch_size": batch_size, "output": str(output),
            "images": seen, "unreadable": [{"name": n, "reason": r} for n, r in source.unreadable],
            "ignored_files": source.ignored, "labelled": labelled,
            "accuracy": float(np.trace(confusion) / labelled) if labelled else None,
            "confusion": confusion.tolist() if labelled else None, "classes": list(classes),
            "seconds": round(seconds, 3), "images_per_sec": round(seen / seconds, 1) if seconds > 0 else None,
        }
        writer.close(summary)
    except BaseException:
        bar.close()
        writer.abort()
        raise

    if source.unreadable:
        log(f"{len(source.unreadable)} unreadable image(s) skipped: "
            f"{', '.join(name for name, _ in source.unreadable[:10])}{' ...' if len(source.unreadable) > 10 else ''}")
    if source.ignored:
        log(f"{source.ignored} file(s) that are not PNG or JPEG ignored")
    if summary["accuracy"] is not None:
        log(f"accuracy {100 * summary['accuracy']:.2f}% ({int(np.trace(confusion))} of {labelled} labelled images)")
    log(f"wrote {seen} predictions to {output} in {seconds:.1f} s ({summary['images_per_sec']} images/s)")
    return summary


# -------------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "infer", help="batch predictions of an exported model over idx, .npy or image-folder input",
        description="Predict every image of --input with the artifacts `resnet-deploy export` wrote, batch by batch "
                    "(memory stays flat), and write one row per image with its class and probabilities. Prints "
                    "the accuracy when the input has labels.")
    add = parser.add_argument
    add("artifact_dir", metavar="ARTIFACT_DIR", help="a directory written by `resnet-deploy export`")
    add("--input", required=True, help="an idx file (.gz or not), a .npy uint8 array or a folder of PNG/JPEG images")
    add("--output", default="predictions.csv", help="predictions file, .csv or .json (default: predictions.csv)")
    add("--labels", help="labels for idx or .npy input (idx or .npy); idx images find their sibling labels file")
    add("--backend", choices=runtime.BACKENDS, default=DEFAULT_BACKEND, help=f"default: {DEFAULT_BACKEND}")
    add("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"default: {DEFAULT_BATCH_SIZE}")
    add("--threads", type=int, help="cores to use, at most those available (default: all available)")
    add("--progress", action=argparse.BooleanOptionalAction,
        help="show a progress bar (default: when stderr is a terminal)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    infer(args.artifact_dir, args.input, args.output, args.backend, args.batch_size, args.threads, args.labels,
          args.progress, log=lambda line: print(line, flush=True))
