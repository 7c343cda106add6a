"""``fakespotter env``: what a bug report needs (versions, native build, CPU variants, CUDA, weights)."""

from __future__ import annotations

import argparse
import json
import platform
import sys

from .._errors import first_line


def add_parser(sub) -> None:
    p = sub.add_parser("env", help="print versions, native build, CPU/GPU support and weights cache state",
                       description=__doc__.replace("``", ""))
    p.add_argument("--json", action="store_true", help="print JSON instead of text (default: text)")
    p.set_defaults(run=run)


def _cpu_isa() -> str:
    from .. import _C

    try:
        return _C.cpu_isa()
    except ValueError as e:  # a bad FAKESPOTTER_CPU_ISA: shown here, refused by every other command
        return f"error: {first_line(e)}"


def collect() -> dict:
    import numpy
    import torch

    import fakespotter
    from fakespotter import _C, weights
    from fakespotter._malloc import keep_freed_memory

    try:
        import dlib  # noqa: F401

        dlib_version = getattr(dlib, "__version__", "installed")
    except ImportError:
        dlib_version = "not installed (pip install 'fakespotter[faces]'): needed for face detection"
    from importlib import metadata

    import PIL

    from fakespotter import _jpeg

    simplejpeg_version = (metadata.version("simplejpeg") if _jpeg.simplejpeg is not None else
                          "not installed (pip install simplejpeg): JPEGs are then decoded by Pillow, in up to 2.5x "
                          "the time, and damaged JPEG data is seen by its markers only")

    try:
        heif_version = metadata.version("pillow-heif")  # (imported on the first HEIC met)
    except metadata.PackageNotFoundError:
        heif_version = "not installed (pip install 'fakespotter[heif]'): HEIC/HEIF photos are then not_an_image"
    extras = {}  # (not imported: ray takes seconds)
    for package, extra, use in (("ray", "ray", "scan --engine ray"), ("pyarrow", "parquet", "scan --format parquet"),
                                ("matplotlib", "plots", "the plots of evaluate and robustness"),
                                ("openvino", "data", "data build's MobileStyleGAN faces")):
        try:
            extras[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            extras[package] = f"not installed (pip install 'fakespotter[{extra}]'): needed for {use}"
    info = _C.build_info()
    cache = {}
    for name in weights.DEFAULT_WEIGHTS:
        try:
            cache[name] = f"ok {weights.weights_path(name)}"
        except weights.WeightsError as e:
            cache[name] = f"missing or bad: {first_line(e)}"
    return {
        "fakespotter": fakespotter.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "simplejpeg": simplejpeg_version,
        "pillow_heif": heif_version,
        "dlib": dlib_version,
        **extras,
        "native_build": info,
        "native_build_vs_torch": fakespotter._torch_build_mismatch() or "built against this torch release",
        "cpu_isa_supported": _C.cpu_isa_supported(),
        "cpu_isa_in_use": _cpu_isa(),
        "torch_threads": torch.get_num_threads(),
        "malloc": ("freed memory kept for the next forward (glibc thresholds raised; FAKESPOTTER_MALLOC=default "
                   "leaves them)" if keep_freed_memory() else "left as it is"),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "weights_cache": str(weights.cache_dir()),
        "weights": cache,
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0
