"""Locally synthesized face manipulations: the paper's identity swap, local manipulation and
expression manipulation, made from real photographs with numpy and Pillow only.

Every function takes a full RGB image ``uint8 [H, W, 3]`` (not a chip) and the face's landmarks
from dlib's 5-point model, ``[5, 2]`` (x, y) in image pixels, as
``fakespotter.faces.detect_and_align(...)[i].landmarks`` returns them (points 0, 1: one eye's
corners; 2, 3: the other eye's; 4: below the nose).  It returns a new array of the same shape
and dtype; the input is never modified.

**Face frame.**  The landmarks fix a frame for the face: origin at the midpoint of the eye
centres, unit length the eye distance ``d`` (between the eye centres), ``s`` along the eye
line and ``t`` perpendicular to it, pointing from the eyes towards the nose.  On frontal faces
the nose landmark sits at about ``t = 0.7`` and the mouth at ``t = 1.05``; the mouth centre is
put at ``1.45 *`` the nose landmark's offset (``t`` clipped to 0.85..1.25).  Masks and control
points are placed in this frame, so they follow the face's position, scale and in-plane
rotation.

**Locality.**  Each manipulation changes only pixels inside a bounded support in the face frame
(``support_radius`` below, in eye distances around the face centre ``t = 0.45``); every pixel
outside it is bit-identical to the input, and parts of the support outside the image are simply
clipped (faces at the border raise nothing).

* :func:`identity_swap`: the donor face is aligned onto the target by the least-squares
  similarity transform between the two landmark sets (Umeyama, no reflection), inverse-mapped
  with bilinear sampling, colour-corrected to the target (per-channel mean and standard
  deviation matched inside the mask in a Lab-like linear opponent space, luminance and two
  colour differences, the ratio of deviations clipped to 0.67..1.5) and
  blended with a feathered elliptical mask covering eyebrows to chin.
* :func:`local_manipulation`: the same alignment and colour correction, but only one region
  (``"eyes"``: a band over both eyes; ``"mouth"``; ``"nose"``) is taken from the donor, which is
  meant to be a generated face (e.g. a GAN render).
* :func:`expression_manipulation`: a smooth landmark-driven warp: the mouth corners move up and
  outwards (smile) or down (frown), and the eyes are scaled vertically about their centres
  (narrower or wider) or left alone.  Displacements use Wendland's compactly supported RBF
  ``(1 - r)**4 * (4 r + 1)`` (smooth like a Gaussian, exactly zero beyond its radius),
  magnitudes proportional to the eye distance and small enough that the warp never folds;
  pixels are inverse-mapped with bilinear sampling.

All random choices (mask size and feather, region, expression and its magnitudes) come from the
``rng`` argument, drawn in a fixed order: the same generator state gives the same output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

__all__ = [
    "FAKE_TYPES",
    "REGIONS",
    "EXPRESSIONS",
    "EYE_CHANGES",
    "support_radius",
    "identity_swap",
    "local_manipulation",
    "expression_manipulation",
    "manipulate",
]

FAKE_TYPES = ("identity_swap", "local_manipulation", "expression")
REGIONS = ("eyes", "mouth", "nose")
EXPRESSIONS = ("smile", "frown")
EYE_CHANGES = ("none", "narrow", "widen")

# Face centre of every mask and warp, in the face frame (s, t), eye distances.
FACE_CENTRE_T = 0.45

# identity swap: ellipse semi-axes (s, t) about the face centre, scaled by rng in SWAP_JITTER
SWAP_AXES = (1.0, 1.0)
SWAP_JITTER = (0.9, 1.1)
FEATHER_RANGE = (0.2, 0.35)  # feathered fraction of the ellipse radius, uniform

# the nose landmark's (s, t) is clipped to these ranges; the mouth centre is MOUTH_FROM_NOSE
# times the nose landmark's (s, t), clipped to its own ranges
_NOSE_S = (-0.6, 0.6)
_NOSE_T = (0.4, 1.0)
MOUTH_FROM_NOSE = 1.45
_MOUTH_S = (-0.4, 0.4)
_MOUTH_T = (0.85, 1.25)

# local manipulation: (centre s, centre t, semi-axis s, semi-axis t); centres relative to the
# eye midpoint ("eyes"), the mouth centre ("mouth") or NOSE_REGION_AT times the nose landmark
# ("nose")
NOSE_REGION_AT = 0.6
REGION_JITTER = (0.9, 1.15)
_REGION_SHAPES = {
    "eyes": (0.0, -0.05, 1.05, 0.34),
    "mouth": (0.0, 0.0, 0.62, 0.36),
    "nose": (0.0, 0.0, 0.36, 0.38),
}

# expression: mouth corners at +-MOUTH_HALF_WIDTH from the mouth centre along the eye line
MOUTH_HALF_WIDTH = 0.42
MOUTH_RADIUS = 0.45  # support of each corner's displacement
SMILE_UP = (0.08, 0.16)  # vertical corner displacement, uniform, eye distances
SMILE_OUT = (0.0, 0.08)  # outwards
FROWN_DOWN = (0.06, 0.13)
FROWN_OUT = (-0.03, 0.03)
EYE_RADIUS = 0.3  # support of each eye's vertical scaling
EYE_SCALE = (0.25, 0.45)  # |k| of the local vertical scale 1 + k, uniform

_MAX_SIDE = 1 << 15


def support_radius(kind: str) -> float:
    """Radius, in eye distances around the face centre (``s = 0``, ``t = 0.45``), outside of
    which ``kind`` leaves every pixel unchanged, whatever the landmarks and the rng draw."""
    if kind not in FAKE_TYPES:
        raise ValueError(f"support_radius: unknown kind {kind!r}; expected one of {FAKE_TYPES}")
    if kind == "identity_swap":
        return max(SWAP_AXES) * SWAP_JITTER[1]
    if kind == "local_manipulation":
        # the farthest corner of each region's range of centres, plus its longest semi-axis
        reach = 0.0
        for region, (cs, ct, a, b) in _REGION_SHAPES.items():
            (s0, s1), (t0, t1) = _region_centre_bounds(region)
            far_s = max(abs(s0 + cs), abs(s1 + cs))
            far_t = max(abs(t0 + ct - FACE_CENTRE_T), abs(t1 + ct - FACE_CENTRE_T))
            reach = max(reach, float(np.hypot(far_s, far_t)) + max(a, b) * REGION_JITTER[1])
        return reach
    (s0, s1), (t0, t1) = _MOUTH_S, _MOUTH_T
    corner_s = max(abs(s0), abs(s1)) + MOUTH_HALF_WIDTH + max(SMILE_OUT[1], FROWN_OUT[1])
    corner_t = max(t1 + FROWN_DOWN[1] - FACE_CENTRE_T, FACE_CENTRE_T - (t0 - SMILE_UP[1]))
    mouth = float(np.hypot(corner_s, corner_t)) + MOUTH_RADIUS
    eyes = float(np.hypot(0.5, FACE_CENTRE_T)) + EYE_RADIUS
    return max(mouth, eyes)


def _region_centre_bounds(region: str) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """Range of (s, t) that a region's anchor (before its own offset) can take."""
    if region == "eyes":
        return (0.0, 0.0), (0.0, 0.0)
    if region == "mouth":
        return _MOUTH_S, _MOUTH_T
    return ((NOSE_REGION_AT * _NOSE_S[0], NOSE_REGION_AT * _NOSE_S[1]),
            (NOSE_REGION_AT * _NOSE_T[0], NOSE_REGION_AT * _NOSE_T[1]))


# ----------------------------------------------------------------------------------------------
# validation


def _check_image(fn: str, name: str, image: object) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy array uint8 [H, W, 3], "
                        f"got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"{fn}: {name} must be uint8 [H, W, 3], got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{fn}: {name} must be uint8 [H, W, 3] with H, W >= 1, "
                         f"got shape {tuple(image.shape)}")
    if max(image.shape[:2]) > _MAX_SIDE:
        raise ValueError(f"{fn}: {name} must be at most {_MAX_SIDE} pixels on a side, "
                         f"got shape {tuple(image.shape)}")
    return image


def _check_landmarks(fn: str, name: str, landmarks: object) -> np.ndarray:
    if not isinstance(landmarks, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy array [5, 2] (x, y) of dlib's 5-point "
                        f"model, got {type(landmarks).__name__}")
    if landmarks.dtype == np.bool_ or not (np.issubdtype(landmarks.dtype, np.integer)
                                           or np.issubdtype(landmarks.dtype, np.floating)):
        raise TypeError(f"{fn}: {name} must be a real-valued array [5, 2], "
                        f"got dtype {landmarks.dtype}")
    if landmarks.shape != (5, 2):
        raise ValueError(f"{fn}: {name} must have shape (5, 2) (dlib's 5-point model, (x, y) "
                         f"in pixels), got shape {tuple(landmarks.shape)}")
    pts = landmarks.astype(np.float64)
    if not np.isfinite(pts).all():
        raise ValueError(f"{fn}: {name} must be finite, got {pts.tolist()}")
    if np.abs(pts).max() > 4 * _MAX_SIDE:
        raise ValueError(f"{fn}: {name} lie implausibly far outside any image: {pts.tolist()}")
    eye_distance = np.linalg.norm(pts[0:2].mean(0) - pts[2:4].mean(0))
    if not eye_distance >= 1.0:
        raise ValueError(f"{fn}: {name} give an eye distance of {eye_distance:.3g} pixels "
                         f"(points 0, 1 vs 2, 3); expected at least 1")
    return pts


def _check_rng(fn: str, rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{fn}: rng must be a numpy.random.Generator "
                        f"(e.g. numpy.random.default_rng(seed)), got {type(rng).__name__}")
    return rng


# ----------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class _Frame:
    """The face frame: image point = origin + d * (s * u + t * v)."""

    origin: np.ndarray  # [2] eye midpoint, pixels
    d: float  # eye distance, pixels
    u: np.ndarray  # [2] unit vector along the eye line
    v: np.ndarray  # [2] unit vector perpendicular to it, towards the nose
    nose: Tuple[float, float]  # (s, t) of the nose landmark, clipped to _NOSE_S, _NOSE_T
    mouth: Tuple[float, float]  # (s, t) of the estimated mouth centre

    def to_image(self, s: float, t: float) -> np.ndarray:
        return self.origin + self.d * (s * self.u + t * self.v)

    def coords(self, x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        dx, dy = x - self.origin[0], y - self.origin[1]
        return ((dx * self.u[0] + dy * self.u[1]) / self.d,
                (dx * self.v[0] + dy * self.v[1]) / self.d)


def _frame(pts: np.ndarray) -> _Frame:
    eye_a, eye_b = pts[2:4].mean(0), pts[0:2].mean(0)
    origin = (eye_a + eye_b) / 2
    d = float(np.linalg.norm(eye_b - eye_a))
    u = (eye_b - eye_a) / d
    v = np.array([-u[1], u[0]])
    if (pts[4] - origin) @ v < 0:
        v = -v
    ns = float((pts[4] - origin) @ u / d)
    nt = float((pts[4] - origin) @ v / d)
    nose = (float(np.clip(ns, *_NOSE_S)), float(np.clip(nt, *_NOSE_T)))
    mouth = (float(np.clip(MOUTH_FROM_NOSE * ns, *_MOUTH_S)),
             float(np.clip(MOUTH_FROM_NOSE * nt, *_MOUTH_T)))
    return _Frame(origin, d, u, v, nose, mouth)


def _box(frame: _Frame, cs: float, ct: float, radius: float, shape: Tuple[int, int]
         ) -> Optional[Tuple[int, int, int, int]]:
    """Pixel box ``(x0, y0, x1, y1)`` (exclusive ends) of the disc of ``radius`` eye distances
    around ``(cs, ct)``, clipped to the image; None when it misses the image."""
    c = frame.to_image(cs, ct)
    r = radius * frame.d + 2
    h, w = shape
    x0, x1 = max(int(np.floor(c[0] - r)), 0), min(int(np.ceil(c[0] + r)) + 1, w)
    y0, y1 = max(int(np.floor(c[1] - r)), 0), min(int(np.ceil(c[1] + r)) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, y0, x1, y1


def _grid(box: Tuple[int, int, int, int]) -> Tuple[np.ndarray, np.ndarray]:
    x0, y0, x1, y1 = box
    y, x = np.mgrid[y0:y1, x0:x1]
    return x.astype(np.float64), y.astype(np.float64)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _ellipse(s: np.ndarray, t: np.ndarray, cs: float, ct: float, a: float, b: float,
             feather: float) -> np.ndarray:
    """Weight 1 well inside the ellipse, 0 on and outside it, a smooth ramp over the outer
    ``feather`` fraction of the radius."""
    r = np.sqrt(((s - cs) / a) ** 2 + ((t - ct) / b) ** 2)
    return _smoothstep((1.0 - r) / feather)


def _similarity(src: np.ndarray, dst: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ~ A @ src + b`` (rotation, uniform scale, translation;
    no reflection), Umeyama's closed form."""
    ms, md = src.mean(0), dst.mean(0)
    xs, xd = src - ms, dst - md
    cov = xd.T @ xs / len(src)
    uu, sig, vt = np.linalg.svd(cov)
    fix = np.diag([1.0, np.sign(np.linalg.det(uu) * np.linalg.det(vt)) or 1.0])
    rot = uu @ fix @ vt
    var = (xs ** 2).sum() / len(src)
    scale = float((sig * np.diag(fix)).sum() / var)
    a = scale * rot
    return a, md - a @ ms


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray, clamp: bool
              ) -> Tuple[np.ndarray, np.ndarray]:
    """Sample ``image`` (float ``[H, W, C]``) at float pixel coordinates.

    Returns ``(values [..., C], coverage [...])``.  ``clamp``: coordinates outside are clamped
    to the edge (coverage 1); otherwise outside pixels count as missing and ``coverage`` is the
    bilinear weight of the pixels that exist (values are normalised by it where it is > 0).
    """
    h, w = image.shape[:2]
    if clamp:
        x = np.clip(x, 0.0, w - 1.0)
        y = np.clip(y, 0.0, h - 1.0)
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx, fy = x - x0, y - y0
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    out = np.zeros(x.shape + image.shape[2:], dtype=np.float64)
    cover = np.zeros(x.shape, dtype=np.float64)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            wgt = wx * wy
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h) & (wgt > 0)
            wgt = np.where(inside, wgt, 0.0)
            px = image[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
            out += px * wgt[..., None]
            cover += wgt
    if not clamp:
        out = np.where(cover[..., None] > 1e-9, out / np.maximum(cover, 1e-9)[..., None], 0.0)
    return out, cover


# A linear opponent colour space (Lab-like: luminance and two colour-difference axes,
# orthonormal rows), where per-channel statistics of skin are far less correlated than in RGB.
_OPPONENT = np.array([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]])
_OPPONENT = _OPPONENT / np.linalg.norm(_OPPONENT, axis=1, keepdims=True)
STD_RATIO = (0.67, 1.5)  # clip of the per-channel contrast change of the colour correction


def _colour_match(src: np.ndarray, ref: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``src`` with the weighted per-channel mean and standard deviation of ``ref`` in the
    opponent space (the ratio of deviations clipped to ``STD_RATIO``); ``[..., 3]`` RGB."""
    wsum = weight.sum()
    if wsum <= 1e-9:
        return src
    wn = (weight / wsum)[..., None]
    axes = tuple(range(src.ndim - 1))
    a, b = src @ _OPPONENT.T, ref @ _OPPONENT.T
    mu_a, mu_b = (a * wn).sum(axis=axes), (b * wn).sum(axis=axes)
    sd_a = np.sqrt(((a - mu_a) ** 2 * wn).sum(axis=axes))
    sd_b = np.sqrt(((b - mu_b) ** 2 * wn).sum(axis=axes))
    ratio = np.clip(sd_b / np.maximum(sd_a, 1e-6), *STD_RATIO)
    return ((a - mu_a) * ratio + mu_b) @ _OPPONENT  # rows orthonormal: the inverse is .T.T


def _paste(target: np.ndarray, box: Tuple[int, int, int, int], content: np.ndarray,
           weight: np.ndarray) -> np.ndarray:
    """``target`` with ``content`` blended in by ``weight`` inside ``box``; pixels of weight 0
    keep their exact input value."""
    out = target.copy()
    x0, y0, x1, y1 = box
    region = target[y0:y1, x0:x1].astype(np.float64)
    blended = region + weight[..., None] * (content - region)
    new = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    keep = weight <= 0
    new[keep] = target[y0:y1, x0:x1][keep]
    out[y0:y1, x0:x1] = new
    return out


def _transplant(target: np.ndarray, tpts: np.ndarray, donor: np.ndarray,
                dpts: np.ndarray, ellipse: Tuple[float, float, float, float], feather: float
                ) -> np.ndarray:
    """Warp ``donor`` onto ``target`` and blend it inside ``ellipse`` (cs, ct, a, b) of the
    target's face frame, colour-corrected."""
    frame = _frame(tpts)
    cs, ct, a, b = ellipse
    box = _box(frame, cs, ct, max(a, b), target.shape[:2])
    if box is None:
        return target.copy()
    x, y = _grid(box)
    s, t = frame.coords(x, y)
    mask = _ellipse(s, t, cs, ct, a, b, feather)
    # target pixel p shows donor pixel A^-1 (p - b)
    a_mat, shift = _similarity(dpts, tpts)
    inv = np.linalg.inv(a_mat)
    px, py = x - shift[0], y - shift[1]
    sx = inv[0, 0] * px + inv[0, 1] * py
    sy = inv[1, 0] * px + inv[1, 1] * py
    warped, cover = _bilinear(donor.astype(np.float64), sx, sy, clamp=False)
    weight = mask * np.clip(cover, 0.0, 1.0)
    if not (weight > 0).any():
        return target.copy()
    x0, y0, x1, y1 = box
    region = target[y0:y1, x0:x1].astype(np.float64)
    corrected = _colour_match(warped, region, weight)
    return _paste(target, box, np.clip(corrected, 0, 255), weight)


# ----------------------------------------------------------------------------------------------
# the three manipulations


def identity_swap(target: np.ndarray, target_landmarks: np.ndarray, donor: np.ndarray,
                  donor_landmarks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Put ``donor``'s face (eyebrows to chin, cheek to cheek) onto ``target``'s face.

    target, donor: RGB ``uint8 [H, W, 3]`` full images (any sizes, independently).
    target_landmarks, donor_landmarks: ``[5, 2]`` (x, y) pixels, dlib's 5-point model.
    rng: draws the mask's size (x0.9..1.1) and feather (0.2..0.35 of its radius).
    Returns ``uint8`` of ``target``'s shape; pixels beyond ``support_radius("identity_swap")``
    eye distances from the face centre are unchanged.
    """
    fn = "identity_swap"
    target = _check_image(fn, "target", target)
    tpts = _check_landmarks(fn, "target_landmarks", target_landmarks)
    donor = _check_image(fn, "donor", donor)
    dpts = _check_landmarks(fn, "donor_landmarks", donor_landmarks)
    rng = _check_rng(fn, rng)
    scale = float(rng.uniform(*SWAP_JITTER))
    feather = float(rng.uniform(*FEATHER_RANGE))
    ellipse = (0.0, FACE_CENTRE_T, SWAP_AXES[0] * scale, SWAP_AXES[1] * scale)
    return _transplant(target, tpts, donor, dpts, ellipse, feather)


def local_manipulation(target: np.ndarray, target_landmarks: np.ndarray, donor: np.ndarray,
                       donor_landmarks: np.ndarray, rng: np.random.Generator,
                       region: Optional[str] = None) -> np.ndarray:
    """Replace one region of ``target``'s face by the same region of ``donor`` (meant to be a
    generated face, e.g. a 64x64 DCGAN render), aligned, colour-corrected and feathered.

    region: ``"eyes"`` (a band over both eyes), ``"mouth"`` or ``"nose"``; None: drawn
        uniformly by ``rng``.
    rng: draws the region (when None), then its size (x0.9..1.15) and feather (0.2..0.35).
    Other arguments and the result as in :func:`identity_swap`.
    """
    fn = "local_manipulation"
    target = _check_image(fn, "target", target)
    tpts = _check_landmarks(fn, "target_landmarks", target_landmarks)
    donor = _check_image(fn, "donor", donor)
    dpts = _check_landmarks(fn, "donor_landmarks", donor_landmarks)
    rng = _check_rng(fn, rng)
    if region is None:
        region = REGIONS[int(rng.integers(len(REGIONS)))]
    elif not isinstance(region, str) or region not in REGIONS:
        raise ValueError(f"{fn}: region must be one of {REGIONS} or None, got {region!r}")
    scale = float(rng.uniform(*REGION_JITTER))
    feather = float(rng.uniform(*FEATHER_RANGE))
    frame = _frame(tpts)
    cs, ct, a, b = _REGION_SHAPES[region]
    if region == "mouth":
        cs, ct = cs + frame.mouth[0], ct + frame.mouth[1]
    elif region == "nose":
        cs, ct = cs + NOSE_REGION_AT * frame.nose[0], ct + NOSE_REGION_AT * frame.nose[1]
    return _transplant(target, tpts, donor, dpts, (cs, ct, a * scale, b * scale), feather)


@dataclass(frozen=True)
class _Expression:
    """A drawn expression change, all lengths in pixels of the target image."""

    mouth: str  # one of EXPRESSIONS
    eyes: str  # one of EYE_CHANGES
    corners: np.ndarray  # [2, 2] mouth corners (x, y) before the warp
    shifts: np.ndarray  # [2, 2] their displacements (x, y)
    corner_radius: float
    eye_centres: np.ndarray  # [2, 2]
    eye_k: float  # vertical scale about each eye centre is 1 + eye_k (0: eyes unchanged)
    eye_radius: float
    v: np.ndarray  # [2] the face's downward unit vector


def _draw_expression(pts: np.ndarray, rng: np.random.Generator) -> _Expression:
    frame = _frame(pts)
    mouth = EXPRESSIONS[int(rng.integers(len(EXPRESSIONS)))]
    eyes = EYE_CHANGES[int(rng.integers(len(EYE_CHANGES)))]
    if mouth == "smile":
        vert = -float(rng.uniform(*SMILE_UP))
        out = float(rng.uniform(*SMILE_OUT))
    else:
        vert = float(rng.uniform(*FROWN_DOWN))
        out = float(rng.uniform(*FROWN_OUT))
    k = float(rng.uniform(*EYE_SCALE))
    eye_k = {"none": 0.0, "narrow": -k, "widen": k}[eyes]
    ms, mt = frame.mouth
    corners, shifts = [], []
    for side in (-1.0, 1.0):
        corners.append(frame.to_image(ms + side * MOUTH_HALF_WIDTH, mt))
        shifts.append(frame.d * (side * out * frame.u + vert * frame.v))
    return _Expression(
        mouth=mouth, eyes=eyes, corners=np.array(corners), shifts=np.array(shifts),
        corner_radius=MOUTH_RADIUS * frame.d,
        eye_centres=np.array([pts[2:4].mean(0), pts[0:2].mean(0)]), eye_k=eye_k,
        eye_radius=EYE_RADIUS * frame.d, v=frame.v)


def _wendland(r: np.ndarray) -> np.ndarray:
    r = np.clip(r, 0.0, 1.0)
    return (1.0 - r) ** 4 * (4.0 * r + 1.0)


def _apply_expression(image: np.ndarray, e: _Expression) -> np.ndarray:
    """Warp ``image`` by ``e``: the output at p samples the input at p - D(p), with D the sum
    of compactly supported RBF displacements (centred on the displaced mouth corners, so the
    content at a corner lands at corner + shift) and the eyes' local vertical scaling."""
    h, w = image.shape[:2]
    xs = [c[0] for c in e.corners + e.shifts] + ([c[0] for c in e.eye_centres] if e.eye_k else [])
    ys = [c[1] for c in e.corners + e.shifts] + ([c[1] for c in e.eye_centres] if e.eye_k else [])
    reach = max(e.corner_radius, e.eye_radius) + 2
    box = (max(int(np.floor(min(xs) - reach)), 0), max(int(np.floor(min(ys) - reach)), 0),
           min(int(np.ceil(max(xs) + reach)) + 1, w), min(int(np.ceil(max(ys) + reach)) + 1, h))
    if box[0] >= box[2] or box[1] >= box[3]:
        return image.copy()
    x, y = _grid(box)
    dx = np.zeros_like(x)
    dy = np.zeros_like(y)
    for centre, shift in zip(e.corners + e.shifts, e.shifts):
        phi = _wendland(np.hypot(x - centre[0], y - centre[1]) / e.corner_radius)
        dx += shift[0] * phi
        dy += shift[1] * phi
    if e.eye_k:
        for centre in e.eye_centres:
            rx, ry = x - centre[0], y - centre[1]
            phi = _wendland(np.hypot(rx, ry) / e.eye_radius)
            along = (rx * e.v[0] + ry * e.v[1]) * e.eye_k * phi  # k > 0 magnifies (widens)
            dx += along * e.v[0]
            dy += along * e.v[1]
    moved = (dx != 0) | (dy != 0)
    if not moved.any():
        return image.copy()
    sampled, _ = _bilinear(image.astype(np.float64), x - dx, y - dy, clamp=True)
    return _paste(image, box, sampled, moved.astype(np.float64))


def expression_manipulation(target: np.ndarray, target_landmarks: np.ndarray,
                            rng: np.random.Generator) -> np.ndarray:
    """Change the face's expression with a smooth landmark-driven warp.

    rng draws, in this order: the mouth change (``"smile"``: corners up by 0.08..0.16 and out
    by 0..0.08 eye distances; ``"frown"``: down by 0.06..0.13, out by -0.03..0.03), the eye
    change (``"none"``, ``"narrow"`` or ``"widen"``), the vertical scale change of the eyes
    (0.25..0.45 at the eye centre, fading to 0 at 0.3 eye distances), then the magnitudes.  Other arguments and the result as in
    :func:`identity_swap`.
    """
    fn = "expression_manipulation"
    target = _check_image(fn, "target", target)
    pts = _check_landmarks(fn, "target_landmarks", target_landmarks)
    rng = _check_rng(fn, rng)
    return _apply_expression(target, _draw_expression(pts, rng))


def manipulate(kind: str, target: np.ndarray, target_landmarks: np.ndarray,
               rng: np.random.Generator, donor: Optional[np.ndarray] = None,
               donor_landmarks: Optional[np.ndarray] = None) -> np.ndarray:
    """Dispatch on ``kind`` (one of ``FAKE_TYPES``).

    ``identity_swap`` and ``local_manipulation`` need ``donor`` and ``donor_landmarks``
    (``local_manipulation`` draws its region from ``rng``); ``expression`` uses no donor and
    ignores one if given.
    """
    if not isinstance(kind, str) or kind not in FAKE_TYPES:
        raise ValueError(f"manipulate: unknown kind {kind!r}; expected one of {FAKE_TYPES}")
    if kind == "expression":
        return expression_manipulation(target, target_landmarks, rng)
    missing = [n for n, v in (("donor", donor), ("donor_landmarks", donor_landmarks))
               if v is None]
    if missing:
        raise ValueError(f"manipulate: kind {kind!r} needs {' and '.join(missing)}, got None")
    if kind == "identity_swap":
        return identity_swap(target, target_landmarks, donor, donor_landmarks, rng)
    return local_manipulation(target, target_landmarks, donor, donor_landmarks, rng)
