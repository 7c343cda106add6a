"""``fakespotter info MODEL``: the metadata of a model file (checked as when loading; a model
whose backbone is not registered here is shown with a note)."""

from __future__ import annotations

import argparse
import json

from .._errors import first_line
from ._common import usage_error


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="print a model file's metadata", description=__doc__.replace("``", ""))
    p.add_argument("model", help="a model file written by 'fakespotter train', or 'default' for the embedded default detector")
    p.add_argument("--json", action="store_true", help="print the whole metadata as JSON (default: a summary)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..artifact import ModelFileError, read_model
    from ..backbones import list_backbones
    from ..detector import FakeSpotter
    from ._common import model_file

    args.model = model_file(args.model)
    unchecked = None
    try:
        tensors, meta = read_model(args.model)
        params = meta.get("detector_params")
        key = params.get("backbone") if isinstance(params, dict) else None
        if isinstance(key, str) and key not in list_backbones():  # a backbone of the writer's own
            unchecked = (f"not checked against its backbone: {key!r} is not registered here (registered in its "
                         f"writer's process, or by a package not installed here)")
        else:
            FakeSpotter.load(args.model)  # every check loading makes (shapes, layers, backbone, values)
    except (ModelFileError, OSError, ValueError) as e:
        raise usage_error(first_line(e)) from None
    if args.json:
        print(json.dumps(meta, indent=2, sort_keys=True))
        return 0
    try:
        lines = _summary(args.model, meta, tensors, unchecked)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:  # (unchecked: another writer's)
        raise usage_error(f"{args.model}: metadata lacks or mangles a required field ({e!r})") from None
    print("\n".join(lines))
    return 0


def _summary(model: str, meta: dict, tensors: dict, unchecked: str | None) -> list:
    from ..artifact import file_sha256
    from ..detector import describe_operating_threshold

    op = meta.get("operating_threshold", {})
    training = meta.get("training") or {}  # (a mapping: loading checked it)
    counts = training.get("counts") if isinstance(training.get("counts"), dict) else {}  # (another writer's)
    return [
        f"model: {model} (sha256 {file_sha256(model)})",
        *([f"note: {unchecked}"] if unchecked else []),
        f"format: {meta['format']} v{meta['format_version']}, bit layout v{meta['bit_layout_version']}, "
        f"written by fakespotter {meta.get('fakespotter_version')} / torch {meta.get('torch_version')}",
        f"backbone: {meta['backbone']['id']} (weights sha256 {meta['backbone']['weights_sha256']})",
        f"layers: {len(meta['layers'])} ({meta['layers'][0]} ... {meta['layers'][-1]}), "
        f"granularity {meta['granularity']}, thresholds {meta['threshold_mode']}, row {meta['row_words']} words",
        f"classifier: {meta['classifier']['type']} {meta['classifier']['params']}",
        f"operating threshold: {describe_operating_threshold(op)}",
        f"face detection (scan's defaults with this model): {_faces_line(meta.get('detector_params') or {})}",
        f"training: {counts.get('train')} train, {counts.get('validation')} validation chips; "
        f"seed {training.get('seed')}; created {training.get('created')}",
        f"metrics: {training.get('metrics')}",
        f"sources: {training.get('sources')}",
        f"training images: {_images_line(tensors)}",
        f"tensors: {len(tensors)} ({sum(t.numel() * t.element_size() for t in tensors.values())} bytes)",
    ]


def _images_line(tensors: dict) -> str:
    from ..detector import TRAINING_IMAGES

    seen = tensors.get(TRAINING_IMAGES)
    if seen is None:
        return ("not recorded (trained from arrays, with train --no-fingerprints, or written before model files "
                "recorded them)")
    return f"{seen.numel()} file fingerprints (evaluate and robustness warn when they score one of these files)"


def _faces_line(params: dict) -> str:
    return (f"upsample {params.get('upsample')}, weak-face-score {params.get('weak_face_score')}, detect-pixels "
            f"{params.get('detect_pixels')}")
