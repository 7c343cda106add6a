"""bitset_linear: the classifier's first layer on packed rows. Native == twin bit for bit over
shapes and CPU variants; equal to the float64 path on the dequantized weights exactly, and to the
float weights within the documented quantization bound."""

from __future__ import annotations

import pytest
import torch

import fakespotter
from fakespotter import ops
from fakespotter import reference as ref


def make(n, inputs, outputs, seed, density=0.5, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(outputs, inputs, generator=g) * 0.1
    b = torch.randn(outputs, generator=g) if bias else None
    x = torch.rand(n, inputs, generator=g) < density
    packed = ref.pack_bits(x)
    q, scale = ops.quantize_linear(w)
    return packed, x, w, b, q, scale, ops.bitset_table(q)


@pytest.mark.parametrize("n", [0, 1, 5])
@pytest.mark.parametrize("inputs", [1, 3, 4, 63, 64, 65, 300, 4099])
@pytest.mark.parametrize("outputs", [1, 7, 8, 9, 64, 65, 130])
def test_matches_twin_and_exact_float64_path(cpu_isa, n, inputs, outputs):
    packed, x, w, b, q, scale, table = make(n, inputs, outputs, seed=inputs * 1000 + outputs)
    got = ops.bitset_linear(packed, table, scale, b)
    assert got.shape == (n, outputs) and got.dtype == torch.float32
    assert torch.equal(got, ref.bitset_linear(packed, table, scale, b))
    exact = (x.double() @ (q.double() * scale.double()) + b.double()).float()
    assert torch.equal(got, exact)


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_within_quantization_bound_of_float_weights(cpu_isa, density):
    packed, x, w, b, q, scale, table = make(64, 5000, 64, seed=3, density=density)
    got = ops.bitset_linear(packed, table, scale, b).double()
    want = x.double() @ w.double().T + b.double()
    k = x.sum(dim=1, keepdim=True).double()
    bound = k * scale.double() / 2 + want.abs() * 2**-24 + 1e-30
    assert ((got - want).abs() <= bound).all()
    # relative to the scale of possible scores, far inside 1e-5
    assert ((got - want).abs() / w.abs().sum(dim=1).double()).max() < 1e-5


def test_no_bias_adds_zero(cpu_isa):
    packed, x, w, b, q, scale, table = make(4, 100, 9, seed=1, bias=False)
    got = ops.bitset_linear(packed, table, scale)
    assert torch.equal(got, ref.bitset_linear(packed, table, scale, None))
    assert torch.equal(got, (x.double() @ (q.double() * scale.double())).float())


def test_bits_past_the_table_are_ignored(cpu_isa):
    packed, x, w, b, q, scale, table = make(3, 70, 5, seed=2)  # 18 groups: nibbles 18..31 unused
    noisy = packed.clone()
    noisy[:, 1] |= -(1 << 8)  # set every bit from 72 on
    assert torch.equal(ops.bitset_linear(noisy, table, scale, b), ops.bitset_linear(packed, table, scale, b))


def test_strided_packed_rows(cpu_isa):
    packed, x, w, b, q, scale, table = make(6, 200, 10, seed=4)
    big = torch.zeros(12, 8, dtype=torch.int64)
    big[::2, 2:6] = packed
    view = big[::2, 2:6]
    assert torch.equal(ops.bitset_linear(view, table, scale, b), ops.bitset_linear(packed, table, scale, b))


def test_table_contents_literal():
    q = torch.tensor([[1], [10], [100], [1000], [5]], dtype=torch.int32)
    table = ops.bitset_table(q)
    assert table.shape == (2, 16, 1)
    assert table[0, :, 0].tolist() == [sum(v for j, v in enumerate([1, 10, 100, 1000]) if m >> j & 1) for m in range(16)]
    assert table[1, :, 0].tolist() == [5 if m & 1 else 0 for m in range(16)]


def test_quantize_keeps_int32_sums_exact():
    w = torch.randn(3, 1000) * torch.tensor([[1e-6], [1.0], [1e6]])
    q, scale = ops.quantize_linear(w)
    sums = q.long().abs().sum(dim=0)
    assert (sums <= 2**31 - 1).all() and (sums > 2**29).all()  # fine steps, no overflow
    assert ((q.double() * scale.double() - w.T.double()).abs() <= scale.double() / 2).all()
    assert torch.equal(scale, torch.exp2(torch.round(torch.log2(scale))))  # powers of two


def test_quantize_at_the_edges_of_its_range():
    """Rows whose |sum| is a power of two (the step exactly at the budget), a row of zeros, float32
    weights near their maximum (a coarse step, still exact sums), and the refusals."""
    for w, step in ((torch.tensor([[1.0]]), 2.0**-30), (torch.tensor([[0.5, 0.5]]), 2.0**-30),
                    (torch.full((1, 16), 3e38), 2.0**101)):
        q, scale = ops.quantize_linear(w)
        assert scale.tolist() == [step] and int(q.long().abs().sum()) <= 2**31 - 1
        assert torch.equal(q.double().T * scale.double(), w.double())
    q, scale = ops.quantize_linear(torch.zeros(1, 3))
    assert not q.any() and scale.isfinite().all() and scale.item() > 0
    with pytest.raises(ValueError, match="quantize_linear: the weights of output 1 sum to 1e.50 in absolute value, too "
                                         "large for int32 sums with a float32 scale"):
        ops.quantize_linear(torch.tensor([[1.0], [1e50]], dtype=torch.float64))
    for bad in (torch.ones(2, 3, dtype=torch.int64), torch.ones(3)):
        with pytest.raises(ValueError, match=r"quantize_linear: weight must be a float \[outputs, inputs\] matrix"):
            ops.quantize_linear(bad)
    ok = ops.bitset_table(torch.tensor([[2**31 - 1]], dtype=torch.int32))  # exactly at the limit: accepted
    assert ok.shape == (1, 16, 1) and int(ok[0, 1, 0]) == 2**31 - 1


def test_errors():
    packed, x, w, b, q, scale, table = make(2, 100, 4, seed=5)
    cases = [
        (lambda: ops.bitset_linear(packed.int(), table, scale, b), r"bitset_linear: packed must be int64, got Int"),
        (lambda: ops.bitset_linear(packed, table.long(), scale, b), r"bitset_linear: table must be int32, got Long"),
        (lambda: ops.bitset_linear(packed, table[:, :8], scale, b), r"bitset_linear: table must have shape \[groups, 16, outputs\]"),
        (lambda: ops.bitset_linear(packed[:, :1], table, scale, b), r"bitset_linear: table covers 25 groups of 4 features = 2 words, packed has 1 words per row"),
        (lambda: ops.bitset_linear(packed, table, scale[:3], b), r"bitset_linear: scale must be float32 of shape \[4\], got Float of shape \[3\]"),
        (lambda: ops.bitset_linear(packed, table, scale, b.double()), r"bitset_linear: bias must be float32 of shape \[4\], got Double of shape \[4\]"),
        (lambda: ops.bitset_linear(packed, table, scale.to("meta"), b), r"bitset_linear: scale must be on packed's device \(cpu\), got meta"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match=r"bitset_table: the weights of output 0 sum to 4294967294 in absolute value"):
        ops.bitset_table(torch.full((2, 1), 2**31 - 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"quantize_linear: weight has NaN or infinite entries"):
        ops.quantize_linear(torch.tensor([[1.0, float("nan")]]))


def test_twin_raises_the_same_errors():
    packed, x, w, b, q, scale, table = make(2, 100, 4, seed=5)
    with pytest.raises(ValueError, match=r"bitset_linear: table covers 25 groups of 4 features = 2 words, packed has 1 words per row"):
        ref.bitset_linear(packed[:, :1], table, scale, b)


def test_opcheck():
    packed, x, w, b, q, scale, table = make(5, 300, 70, seed=6)
    torch.library.opcheck(torch.ops.fakespotter.bitset_linear.default, (packed, table, scale, b))
    torch.library.opcheck(torch.ops.fakespotter.bitset_linear.default, (packed, table, scale, None))


def test_compiles_and_exports():
    packed, x, w, b, q, scale, table = make(5, 300, 70, seed=7)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", table)
            self.register_buffer("scale", scale)
            self.register_buffer("bias", b)

        def forward(self, rows):
            return torch.ops.fakespotter.bitset_linear(rows, self.table, self.scale, self.bias).relu()

    head = Head()
    want = head(packed)
    assert torch.equal(torch.compile(head, backend="aot_eager", fullgraph=True)(packed), want)
    assert torch.equal(torch.export.export(head, (packed,)).module()(packed), want)
