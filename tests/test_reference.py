"""The pure-torch twins against hand-written cases and an independent encoder (numpy.packbits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fakespotter import reference as ref


def numpy_pack(bits: np.ndarray) -> np.ndarray:
    """Independent encoder: bool [N, F] -> uint8 [N, 8 * words], little bit order."""
    n, f = bits.shape
    words = -(-f // 64)
    padded = np.zeros((n, words * 64), dtype=bool)
    padded[:, :f] = bits
    return np.packbits(padded, axis=1, bitorder="little")


def test_literal_element_bits():
    x = torch.tensor([[1.0, -1.0, 2.0, 0.0], [0.0, 0.5, 0.0, 3.0]])
    got = ref.threshold_pack(x, torch.tensor([0.0]), "element")
    assert got.tolist() == [[0b0101], [0b1010]]


def test_literal_strict_and_nan():
    x = torch.tensor([[0.25, 0.2500001, float("nan"), float("inf"), -float("inf")]])
    got = ref.threshold_pack(x, torch.tensor([0.25]), "element")
    assert got.tolist() == [[0b01010]]  # equal is not above; NaN never sets a bit


def test_literal_bit_63_is_the_sign_bit():
    x = torch.zeros(1, 65)
    x[0, 63] = 1.0
    x[0, 64] = 1.0
    got = ref.threshold_pack(x, torch.tensor([0.5]), "element")
    assert got.tolist() == [[-(2**63), 1]]


def test_literal_channel_means():
    # channel 0 mean 1.5, channel 1 mean -0.25, channel 2 mean 0.5 (ties the threshold)
    x = torch.tensor([[[[1.0, 2.0], [1.0, 2.0]], [[-1.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]]])
    got = ref.threshold_pack(x, torch.tensor([0.5]), "channel")
    assert got.tolist() == [[0b001]]
    per = ref.threshold_pack(x, torch.tensor([2.0, -0.5, 0.4]), "channel")
    assert per.tolist() == [[0b110]]


def test_literal_element_order_is_c_h_w():
    x = torch.zeros(1, 2, 2, 3)
    x[0, 1, 0, 2] = 1.0  # feature 1 * 6 + 0 * 3 + 2 = 8
    got = ref.threshold_pack(x, torch.tensor([0.5]), "element")
    assert got.tolist() == [[1 << 8]]
    # channels_last memory changes nothing
    got_cl = ref.threshold_pack(x.contiguous(memory_format=torch.channels_last), torch.tensor([0.5]), "element")
    assert got_cl.tolist() == [[1 << 8]]


def test_literal_unpack_and_popcount():
    packed = torch.tensor([[0b1011, -1], [0, 1]], dtype=torch.int64)
    assert ref.unpack_bits(packed, 0, 5).tolist() == [[True, True, False, True, False], [False] * 5]
    assert ref.unpack_bits(packed, 1, 2).tolist() == [[True, True], [True, False]]
    assert ref.layer_popcount(packed, 0, 2).tolist() == [67, 1]
    assert ref.layer_popcount(packed, 1, 1).tolist() == [64, 1]
    assert ref.layer_popcount(packed, 1, 0).tolist() == [0, 0]


@pytest.mark.parametrize("features", [1, 7, 63, 64, 65, 130, 4099])
def test_element_matches_numpy_packbits(features):
    g = torch.Generator().manual_seed(features)
    x = torch.randn(5, features, generator=g)
    thr = torch.randn(features, generator=g) * 0.5
    got = ref.threshold_pack(x, thr, "element")
    bits = x.numpy() > thr.numpy()
    assert np.array_equal(got.numpy().view(np.uint8), numpy_pack(bits))
    assert torch.equal(ref.unpack_bits(got, 0, features), torch.from_numpy(bits))
    assert ref.layer_popcount(got, 0, got.shape[1]).tolist() == bits.sum(axis=1).tolist()


@pytest.mark.parametrize("shape", [(3, 5, 7, 7), (2, 70, 9, 9), (2, 65, 1, 1), (2, 3, 33), (1, 2, 3, 4, 5)])
def test_channel_matches_numpy_means(shape):
    # Multiples of 1/8 in a small range: float64 sums are exact in any order, so numpy's mean,
    # whatever its summation order, is the same number as the fixed-order one.
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randint(-64, 64, shape, generator=g).float() / 8
    thr = torch.randint(-8, 8, (shape[1],), generator=g).float() / 16
    got = ref.threshold_pack(x, thr, "channel")
    xs = x.numpy().reshape(shape[0], shape[1], -1).astype(np.float64)
    means = (xs.sum(axis=2) / xs.shape[2]).astype(np.float32)
    bits = means > thr.numpy()
    assert np.array_equal(got.numpy().view(np.uint8), numpy_pack(bits))
    assert 0 < bits.mean() < 1


def test_channel_sum_order_is_the_lane_order():
    # 2**60 at s=0 and -2**60 at s=32 share lane 0 and cancel there, so all 68 ones survive;
    # a left-to-right sum would lose the 31 ones in between (37 / 70 instead of 68 / 70).
    v = torch.ones(1, 1, 70)
    v[0, 0, 0] = 2.0**60
    v[0, 0, 32] = -(2.0**60)
    assert ref._channel_means(v).item() == np.float32(68 / 70)
    left_to_right = 0.0
    for val in v.flatten().double().tolist():
        left_to_right += val
    assert np.float32(left_to_right / 70) == np.float32(37 / 70)
