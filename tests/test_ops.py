"""Native ops against their pure-torch twins, bit for bit, over the test matrix of STYLE.md §7:
dtypes x granularities x shapes x memory layouts x thresholds x every CPU variant."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import fakespotter
from fakespotter import ops
from fakespotter import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRANULARITIES = ["channel", "element"]
SHAPES = [
    (0, 5),
    (0, 3, 7, 7),
    (1, 1),
    (3, 63),
    (3, 64),
    (3, 65),
    (2, 4099),
    (3, 70, 7, 7),
    (2, 65, 9, 9),
    (4, 64, 1, 1),
    (2, 3, 33),
    (2, 130, 5),
    (2, 4, 3, 4, 5),
    (2, 33, 1, 9),
    (2, 0, 3, 3),
]
LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced", "broadcast"]


def make_input(shape, layout, dtype, seed, specials=False):
    """An activation of logical shape `shape` whose memory layout is `layout`."""
    g = torch.Generator().manual_seed(seed)
    n, c, spatial = shape[0], shape[1], tuple(shape[2:])

    def rnd(*size):
        return torch.randn(*size, generator=g)

    if layout == "contiguous":
        x = rnd(*shape)
    elif layout == "channels_last":  # channels innermost in memory
        x = rnd(n, *spatial, c).movedim(-1, 1)
    elif layout == "transposed":  # last two logical dims swapped in memory
        if len(shape) >= 4:
            x = rnd(n, c, *spatial[:-2], spatial[-1], spatial[-2]).transpose(-1, -2)
        else:
            x = rnd(*reversed(shape)).permute(*reversed(range(len(shape))))
    elif layout == "sliced":  # storage offset and gaps in every dim
        big = rnd(2 * n + 1, c + 3, *(s + 2 for s in spatial))
        index = (slice(1, 2 * n + 1, 2), slice(2, 2 + c)) + tuple(slice(1, 1 + s) for s in spatial)
        x = big[index]
    elif layout == "broadcast":  # stride-0 spatial dims
        x = rnd(n, c, *(1 for _ in spatial)).expand(*shape)
    else:
        raise AssertionError(layout)
    assert tuple(x.shape) == tuple(shape)
    x = x.to(dtype)
    if specials and x.numel() >= 8:
        flat = x.reshape(-1) if x.is_contiguous() else None
        if flat is not None:
            specials_values = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
            idx = torch.randperm(x.numel(), generator=g)[: len(specials_values)]
            flat[idx] = specials_values.to(dtype)
    return x


def thresholds_for(kind, x, granularity, seed):
    features = ref.num_features(x.shape, granularity)
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "scalar":
        return torch.tensor([0.05])
    if kind == "per_neuron":
        return torch.randn(features, generator=g) * 0.3
    if kind == "tied":  # exactly the values of row 0: row 0 must have no bit set
        if x.shape[0] == 0:
            return torch.zeros(features)
        if granularity == "channel" and ref._spatial(x.shape) != 1:
            return ref._channel_means(x[:1])[0].clone()
        return x[:1].float().reshape(-1).clone()
    if kind == "-inf":
        return torch.tensor([-float("inf")])
    if kind == "+inf":
        return torch.tensor([float("inf")])
    raise AssertionError(kind)


def check_same(x, thr, granularity):
    before = x.clone()
    thr_before = thr.clone()
    got = torch.ops.fakespotter.threshold_pack(x, thr, granularity)
    want = ref.threshold_pack(x, thr, granularity)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want), (got ^ want).nonzero()[:5]
    assert torch.equal(x, before) or torch.equal(x.isnan(), before.isnan())  # input untouched
    assert torch.equal(thr, thr_before)
    return got


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_threshold_pack_matches_twin(cpu_isa, dtype, granularity, shape, layout):
    seed = zlib.crc32(repr((str(dtype), granularity, shape, layout)).encode()) % 10_000
    x = make_input(shape, layout, dtype, seed)
    for kind in ("scalar", "per_neuron", "tied", "-inf", "+inf"):
        thr = thresholds_for(kind, x, granularity, seed)
        got = check_same(x, thr, granularity)
        if kind == "tied" and x.shape[0] > 0:
            assert not got[0].any(), "a value equal to its threshold must not set a bit"


@pytest.mark.parametrize("shape", [(3, 70, 7, 7), (2, 4099), (2, 130, 33)], ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_nan_and_inf_inputs(cpu_isa, dtype, granularity, shape):
    x = make_input(shape, "contiguous", dtype, 7, specials=True)
    assert x.isnan().any() and x.isinf().any()
    for kind in ("scalar", "per_neuron", "-inf"):
        check_same(x, thresholds_for(kind, x, granularity, 7), granularity)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_bits_are_not_vacuous(cpu_isa, granularity):
    x = torch.randn(16, 64, 9, 9)
    got = fakespotter.threshold_pack(x, 0.0, granularity)
    fraction = fakespotter.layer_popcount(got).sum().item() / (16 * ref.num_features(x.shape, granularity))
    assert 0.2 < fraction < 0.8


def test_large_random_layers_match_twin(cpu_isa):
    # Enough rows and words that at::parallel_for splits the work.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 256, 18, 18, generator=g).abs()
    thr = torch.tensor([x.mean().item()])
    for granularity in GRANULARITIES:
        check_same(x, thr, granularity)
        check_same(x.contiguous(memory_format=torch.channels_last), thr, granularity)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_more_spatial_dims_than_the_kernels_index(cpu_isa, granularity):
    """Any strides: 8 spatial dims in reverse order (none merges with the next) exceed the
    kernels' 6, and are read from a contiguous copy; they used to be refused."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, *([2] * 8), generator=g).permute(0, 1, *range(9, 1, -1))
    assert not x.is_contiguous()
    for kind in ("scalar", "per_neuron"):
        check_same(x, thresholds_for(kind, x, granularity, 9), granularity)
    for empty in (x[:0], x[:, :, :0]):  # (an empty tensor counts as contiguous: its copy is itself)
        check_same(empty, torch.tensor([0.0]), granularity)


@pytest.mark.parametrize("shape", [(1, 3, 300, 300), (2, 70, 37, 37), (3, 300, 5, 5)], ids=str)
def test_channels_last_elements_split_anywhere(cpu_isa, shape):
    # Channels-last element packing reads whole runs of words of a row at once: the thread counts
    # move where at::parallel_for cuts the rows (inside a channel, across one, within a word's
    # span of several channels), and each cut must give the same words.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape[0], *shape[2:], shape[1], generator=g).movedim(-1, 1)
    features = ref.num_features(x.shape, "element")
    per_neuron = torch.randn(features, generator=g) * 0.3
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 4, 7):
            torch.set_num_threads(n)
            for thr in (torch.tensor([0.1]), per_neuron):
                check_same(x, thr, "element")
                out = torch.full((shape[0], 2 + fakespotter.num_words(features) + 1), -1, dtype=torch.int64)
                torch.ops.fakespotter.threshold_pack_into(x, thr, "element", out, 2)
                assert torch.equal(out[:, 2:-1], ref.threshold_pack(x, thr, "element"))
                assert (out[:, :2] == -1).all() and (out[:, -1] == -1).all()
    finally:
        torch.set_num_threads(threads)


def test_variants_agree_on_random_channel_means(monkeypatch):
    # Same input, every variant, per-neuron thresholds set to float32 neighbours of the means:
    # any deviation in summation order shows up as flipped bits.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 96, 13, 13, generator=g) * torch.logspace(-3, 3, 13)
    means = ref._channel_means(x)[0]
    results = {}
    for thr in (means, torch.nextafter(means, torch.full_like(means, -float("inf")))):
        for isa in fakespotter._C.cpu_isa_supported():
            monkeypatch.setenv("FAKESPOTTER_CPU_ISA", isa)
            results[isa] = torch.ops.fakespotter.threshold_pack(x, thr, "channel")
        want = ref.threshold_pack(x, thr, "channel")
        for isa, got in results.items():
            assert torch.equal(got, want), isa


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_threshold_pack_into_fills_only_its_slot(cpu_isa, granularity):
    layers = [torch.randn(5, 32, 9, 9), torch.randn(5, 65), make_input((5, 70, 3, 3), "channels_last", torch.float16, 1)]
    words = [fakespotter.num_words(ref.num_features(x.shape, granularity)) for x in layers]
    total = sum(words) + 2
    out = torch.full((5, total), -1, dtype=torch.int64)
    want = out.clone()
    offset = 1
    for x, w in zip(layers, words):
        thr = torch.tensor([0.1])
        fakespotter.threshold_pack_into(x, thr, out, offset, granularity)
        ref.threshold_pack_into(x, thr, granularity, want, offset)
        assert torch.equal(out[:, offset : offset + w], fakespotter.threshold_pack(x, thr, granularity))
        offset += w
    assert torch.equal(out, want)
    assert (out[:, 0] == -1).all() and (out[:, -1] == -1).all()


def test_threshold_pack_into_strided_out_rows(cpu_isa):
    big = torch.zeros(6, 10, dtype=torch.int64)
    out = big[::2]  # rows 20 words apart
    x = torch.randn(3, 130)
    fakespotter.threshold_pack_into(x, 0.0, out, 4, "element")
    assert torch.equal(out[:, 4:7], ref.threshold_pack(x, torch.tensor([0.0]), "element"))
    assert not big[1::2].any()


@pytest.mark.parametrize("features", [0, 1, 63, 64, 65, 200])
def test_unpack_and_popcount_match_twin(features):
    g = torch.Generator().manual_seed(features)
    packed = torch.randint(-(2**63), 2**63 - 1, (6, 5), dtype=torch.int64, generator=g)
    for offset in (0, 1):
        feats = min(features, (5 - offset) * 64)
        assert torch.equal(
            torch.ops.fakespotter.unpack_bits(packed, offset, feats), ref.unpack_bits(packed, offset, feats)
        )
        nw = fakespotter.num_words(feats)
        assert torch.equal(
            torch.ops.fakespotter.layer_popcount(packed, offset, nw), ref.layer_popcount(packed, offset, nw)
        )
    strided = packed[::2, 1:]
    assert torch.equal(fakespotter.unpack_bits(strided, 64), ref.unpack_bits(strided, 0, 64))
    assert torch.equal(fakespotter.layer_popcount(strided), ref.layer_popcount(strided, 0, 4))


def test_roundtrip_pack_unpack():
    x = torch.randn(7, 300)
    packed = fakespotter.threshold_pack(x, 0.0, "element")
    assert torch.equal(fakespotter.unpack_bits(packed, 300), x > 0)
    assert torch.equal(fakespotter.layer_popcount(packed), (x > 0).sum(1))
    # padding bits past the last feature are zero
    assert torch.equal(fakespotter.unpack_bits(packed)[:, 300:], torch.zeros(7, 20, dtype=torch.bool))


def test_empty_batch_gives_empty_results():
    x = torch.randn(0, 70, 9, 9)
    for granularity in GRANULARITIES:
        got = fakespotter.threshold_pack(x, 0.0, granularity)
        assert got.shape == (0, fakespotter.num_words(ref.num_features(x.shape, granularity)))
    packed = torch.zeros(0, 3, dtype=torch.int64)
    assert fakespotter.layer_popcount(packed).shape == (0,)
    assert fakespotter.unpack_bits(packed, 100).shape == (0, 100)


@pytest.mark.parametrize("spatial", [(5, 5), (9, 9), (13, 13), (18, 18)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_channel_means_follow_the_lane_order_exactly(cpu_isa, spatial, layout):
    # Huge values of opposite sign that cancel only when added in the specified order (same lane,
    # then the fold by halves), among ones that are absorbed otherwise. Thresholds at the twin's
    # mean and at the float32 just below it pin each native mean to the twin's exactly.
    g = torch.Generator().manual_seed(sum(spatial))
    n, c = 3, 64
    s = spatial[0] * spatial[1]
    x = torch.ones(n, c, s)
    for row in range(n):
        for ch in range(c):
            pos = torch.randperm(s, generator=g)[:4]
            k = torch.randint(30, 60, (2,), generator=g)
            x[row, ch, pos[0]], x[row, ch, pos[1]] = 2.0 ** k[0].item(), -(2.0 ** k[0].item())
            x[row, ch, pos[2]], x[row, ch, pos[3]] = 2.0 ** k[1].item(), -(2.0 ** k[1].item())
    x = x.reshape(n, c, *spatial)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    means = ref._channel_means(x)
    for row in range(n):
        for thr in (means[row], torch.nextafter(means[row], torch.tensor(-float("inf")))):
            got = torch.ops.fakespotter.threshold_pack(x[row : row + 1], thr.contiguous(), "channel")
            assert torch.equal(got, ref.threshold_pack(x[row : row + 1], thr.contiguous(), "channel"))


def test_python_wrappers_take_thresholds_as_floats_lists_and_arrays():
    import numpy as np

    x = torch.randn(3, 8, 5, 5)
    thr = torch.linspace(-0.2, 0.2, 8)
    want = fakespotter.threshold_pack(x, thr)
    for given in (thr.tolist(), thr.numpy(), thr.numpy().astype(np.float64)):
        assert torch.equal(fakespotter.threshold_pack(x, given), want)
    out = torch.zeros(3, 2, dtype=torch.int64)
    fakespotter.threshold_pack_into(x, thr.numpy(), out, 1)
    assert torch.equal(out[:, 1:], want) and not out[:, 0].any()
    assert torch.equal(fakespotter.threshold_pack(x, np.float32(0.1)), fakespotter.threshold_pack(x, 0.1))
    from fractions import Fraction

    big = torch.full((8,), 1e30)  # (Python ints beyond int64 and fractions make object arrays: numbers all the same)
    assert torch.equal(fakespotter.threshold_pack(x, [10**30] * 8), fakespotter.threshold_pack(x, big))
    assert torch.equal(fakespotter.threshold_pack(x, [Fraction(1, 2)] * 8), fakespotter.threshold_pack(x, 0.5))
    with pytest.raises(TypeError, match=r"threshold_pack: thresholds must be a float, or a float32 tensor / "
                                        r"array / list of floats, got dict"):
        fakespotter.threshold_pack(x, {"a": 1.0})
    # not parsed nor taken as NaN (np.asarray(None, np.float32) is NaN: a threshold never set gave all-zero rows)
    for bad in (None, [None] * 8, "0.1", ["0.1"] * 8, 10**400, [10**400] * 8, True, [True] * 8, np.bool_(True),
                [True] + [0.5] * 7):
        with pytest.raises(TypeError, match=rf"thresholds must be a float, .* got {type(bad).__name__}"):
            fakespotter.threshold_pack(x, bad)
    with pytest.raises(ValueError, match="threshold_pack"):  # the op's own check of the length
        fakespotter.threshold_pack(x, [0.0] * 7)


def test_popcount_and_unpack_default_to_the_rest_of_the_row_from_their_offset():

    p = torch.tensor([[1, 3, 7]], dtype=torch.int64)
    assert ops.layer_popcount(p, 1).tolist() == [5] and ops.layer_popcount(p).tolist() == [6]
    bits = ops.unpack_bits(p, word_offset=1)
    assert bits.shape == (1, 128) and bits[0, :3].tolist() == [True, True, False] and int(bits.sum()) == 5
    assert ops.unpack_bits(p).shape == (1, 192)


def test_a_threshold_tensor_goes_to_the_op_as_given():
    # a tensor is not converted (the op refuses a float64 one), unlike a numpy array, which is cast to float32
    x = torch.rand(2, 8, 3, 3)
    with pytest.raises(ValueError, match="threshold_pack: thresholds must be float32, got Double"):
        ops.threshold_pack(x, torch.full((8,), 0.5, dtype=torch.float64))
    assert torch.equal(ops.threshold_pack(x, np.full(8, 0.5)), ops.threshold_pack(x, 0.5))


def test_a_tuple_of_bools_is_refused_like_a_list_of_bools():
    x = torch.rand(2, 8, 3, 3)
    for bad in ((True,) * 8, (True,) + (0.5,) * 7):
        with pytest.raises(TypeError, match="threshold_pack: thresholds must be a float.*got tuple"):
            ops.threshold_pack(x, bad)
    assert torch.equal(ops.threshold_pack(x, (0.5,) * 8), ops.threshold_pack(x, 0.5))


def test_quantize_linear_leaves_room_for_rounding_up():
    # ten weights of 214748364.6: their sum fits int32, but rounded up one by one it would not
    w = torch.full((1, 10), 214748364.6, dtype=torch.float64)
    q, scale = ops.quantize_linear(w)
    assert int(q.to(torch.int64).abs().sum()) <= 2**31 - 1
    assert float((q.double().T * scale.double() - w).abs().max()) <= float(scale) / 2


def test_a_zero_dim_threshold_array_is_one_value_for_the_layer():
    x = torch.rand(2, 8, 3, 3)
    assert torch.equal(ops.threshold_pack(x, np.array(0.5)), ops.threshold_pack(x, 0.5))
    out = torch.zeros(2, 1, dtype=torch.int64)
    ops.threshold_pack_into(x, np.array(0.5, dtype=np.float64), out, 0)
    assert torch.equal(out, ops.threshold_pack(x, 0.5))


def test_quantize_linear_refuses_a_weight_of_more_than_two_dims():
    with pytest.raises(ValueError, match=r"quantize_linear: weight must be a float \[outputs, inputs\] matrix, "
                                         r"got torch.float32 of shape \[2, 3, 4\]"):
        ops.quantize_linear(torch.ones(2, 3, 4))


def test_quantize_linear_accepts_a_row_that_sums_to_int32_max_exactly():
    # a huge float64 weight: the step is clamped at 2**126 and q lands exactly on 2**31 - 1
    w = torch.tensor([[(2**31 - 1) * 2.0**126]], dtype=torch.float64)
    q, scale = ops.quantize_linear(w)
    assert q.tolist() == [[2**31 - 1]] and scale.tolist() == [2.0**126]
    assert torch.equal(q.double().T * scale.double(), w)


def test_bitset_table_refuses_q_that_is_not_int32():
    for bad in (torch.ones(2, 1), torch.ones(2, 1, dtype=torch.int16), torch.ones(2, 1, dtype=torch.int64)):
        with pytest.raises(ValueError, match=rf"bitset_table: q must be int32 of shape \[inputs, outputs\], got {bad.dtype}"):
            ops.bitset_table(bad)


def test_bitset_table_of_no_outputs_is_empty():
    table = ops.bitset_table(torch.zeros(5, 0, dtype=torch.int32))
    assert table.shape == (2, 16, 0) and table.dtype == torch.int32


def test_bitset_table_names_the_output_that_overflows():
    q = torch.tensor([[1, 2**31 - 1, 7], [1, 2**31 - 1, 7]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"bitset_table: the weights of output 1 sum to 4294967294 in absolute value"):
        ops.bitset_table(q)
