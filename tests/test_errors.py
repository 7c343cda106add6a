"""Bad input: every error names the op, the argument, what was expected and what arrived. The
native op, its pure-torch twin and its fake kernel (meta tensors) raise the same ValueError."""

from __future__ import annotations

import pytest
import torch

import fakespotter
from fakespotter import reference as ref

OPS = torch.ops.fakespotter

x4 = torch.randn(2, 8, 3, 3)
t1 = torch.tensor([0.0])

PACK_CASES = [
    # (id, x, thresholds, granularity, match)
    ("rank", torch.randn(5), t1, "channel", r"threshold_pack: x must have shape \[N, D\] or \[N, C, \*spatial\], got a 1-d tensor of shape \[5\]"),
    ("scalar-x", torch.tensor(1.0), t1, "channel", r"threshold_pack: x must have shape .* got a 0-d tensor"),
    ("int-x", torch.ones(2, 3, dtype=torch.int32), t1, "element", r"threshold_pack: x must be float32, float16 or bfloat16, got Int"),
    ("double-x", torch.ones(2, 3, dtype=torch.float64), t1, "element", r"threshold_pack: x must be float32, float16 or bfloat16, got Double"),
    ("complex-x", torch.ones(2, 3, dtype=torch.complex64), t1, "element", r"threshold_pack: x must be float32, float16 or bfloat16, got ComplexFloat"),
    ("granularity", x4, t1, "neuron", r"threshold_pack: granularity must be 'channel' or 'element', got 'neuron'"),
    ("thr-dtype", x4, torch.tensor([0.0], dtype=torch.float64), "channel", r"threshold_pack: thresholds must be float32, got Double"),
    ("thr-int", x4, torch.tensor([0]), "channel", r"threshold_pack: thresholds must be float32, got Long"),
    ("thr-len-channel", x4, torch.zeros(4), "channel", r"threshold_pack: thresholds must have 1 entry \(one per layer\) or 8 entries \(one per channel\), got 4"),
    ("thr-len-element", x4, torch.zeros(8), "element", r"threshold_pack: thresholds must have 1 entry \(one per layer\) or 72 entries \(one per element\), got 8"),
    ("thr-device", x4, torch.zeros(1, device="meta"), "channel", r"threshold_pack: thresholds must be on x's device \(cpu\), got meta"),
]


def run_native(x, thr, granularity):
    return OPS.threshold_pack(x, thr, granularity)


@pytest.mark.parametrize("impl", ["native", "twin"])
@pytest.mark.parametrize("case", PACK_CASES, ids=[c[0] for c in PACK_CASES])
def test_threshold_pack_errors(impl, case):
    _, x, thr, granularity, match = case
    fn = run_native if impl == "native" else ref.threshold_pack
    with pytest.raises(ValueError, match=match):
        fn(x, thr, granularity)


@pytest.mark.parametrize("case", [c for c in PACK_CASES if c[0] != "thr-device"], ids=lambda c: c[0])
def test_fake_kernel_raises_the_same_errors(case):
    _, x, thr, granularity, match = case
    with pytest.raises(ValueError, match=match):
        OPS.threshold_pack(x.to("meta"), thr.to("meta"), granularity)


def test_fake_kernel_device_mismatch():
    with pytest.raises(ValueError, match=r"threshold_pack: thresholds must be on x's device \(meta\), got cpu"):
        OPS.threshold_pack(x4.to("meta"), t1, "channel")


OUT_CASES = [
    ("out-dtype", torch.zeros(2, 4, dtype=torch.int32), 0, r"threshold_pack_into: out must be int64, got Int"),
    ("out-rank", torch.zeros(8, dtype=torch.int64), 0, r"threshold_pack_into: out must have shape \[N, words\], got shape \[8\]"),
    ("out-rows", torch.zeros(3, 4, dtype=torch.int64), 0, r"threshold_pack_into: out must have one row per row of x \(2\), got 3"),
    ("out-small", torch.zeros(2, 2, dtype=torch.int64), 0, r"threshold_pack_into: out has 2 words per row, but this layer needs words \[0, 3\)"),
    ("offset-past-end", torch.zeros(2, 4, dtype=torch.int64), 2, r"threshold_pack_into: out has 4 words per row, but this layer needs words \[2, 5\) \(word_offset 2 \+ 3 words\)"),
    ("offset-negative", torch.zeros(2, 4, dtype=torch.int64), -1, r"threshold_pack_into: word_offset must be >= 0, got -1"),
    # the end of the range past INT64_MAX: the native check's sum wrapped around, passed, and the
    # kernel wrote 8 bytes before `out`
    ("offset-int64-max", torch.zeros(2, 4, dtype=torch.int64), 2**63 - 1, r"threshold_pack_into: out has 4 words per row, but this layer needs words \[9223372036854775807, 9223372036854775810\)"),
    ("out-strided", torch.zeros(2, 8, dtype=torch.int64)[:, ::2], 0, r"threshold_pack_into: out must have unit stride along its words"),
    ("out-device", torch.zeros(2, 4, dtype=torch.int64, device="meta"), 0, r"threshold_pack_into: out must be on x's device \(cpu\), got meta"),
]


@pytest.mark.parametrize("impl", ["native", "twin"])
@pytest.mark.parametrize("case", OUT_CASES, ids=[c[0] for c in OUT_CASES])
def test_threshold_pack_into_errors(impl, case):
    _, out, offset, match = case
    x = torch.randn(2, 150)  # 3 words in element granularity
    before = out.clone() if out.device.type != "meta" else None
    with pytest.raises(ValueError, match=match):
        if impl == "native":
            OPS.threshold_pack_into(x, t1, "element", out, offset)
        else:
            ref.threshold_pack_into(x, t1, "element", out, offset)
    if before is not None:
        assert torch.equal(out, before), "a refused call must not write"


PACKED_CASES = [
    ("popcount", lambda m: m.layer_popcount(torch.zeros(2, 3), 0, 1), r"layer_popcount: packed must be int64, got Float"),
    ("popcount-rank", lambda m: m.layer_popcount(torch.zeros(3, dtype=torch.int64), 0, 1), r"layer_popcount: packed must have shape \[N, words\], got shape \[3\]"),
    ("popcount-range", lambda m: m.layer_popcount(torch.zeros(2, 3, dtype=torch.int64), 2, 2), r"layer_popcount: packed has 3 words per row, but words \[2, 4\) were asked for"),
    ("popcount-negative", lambda m: m.layer_popcount(torch.zeros(2, 3, dtype=torch.int64), -1, 2), r"layer_popcount: word_offset and the word count must be >= 0, got -1 and 2"),
    ("unpack-range", lambda m: m.unpack_bits(torch.zeros(2, 3, dtype=torch.int64), 1, 129), r"unpack_bits: packed has 3 words per row, but words \[1, 4\) were asked for"),
    ("unpack-negative", lambda m: m.unpack_bits(torch.zeros(2, 3, dtype=torch.int64), 0, -5), r"unpack_bits: num_features must be >= 0, got -5"),
    # ranges whose end is past INT64_MAX (the native sums wrapped around: reads before `packed`)
    ("popcount-offset-int64-max", lambda m: m.layer_popcount(torch.zeros(2, 3, dtype=torch.int64), 2**63 - 1, 1), r"layer_popcount: packed has 3 words per row, but words \[9223372036854775807, 9223372036854775808\) were asked for"),
    ("popcount-count-int64-max", lambda m: m.layer_popcount(torch.zeros(2, 3, dtype=torch.int64), 1, 2**63 - 1), r"layer_popcount: packed has 3 words per row, but words \[1, 9223372036854775808\) were asked for"),
    ("unpack-offset-int64-max", lambda m: m.unpack_bits(torch.zeros(2, 3, dtype=torch.int64), 2**63 - 1, 1), r"unpack_bits: packed has 3 words per row, but words \[9223372036854775807, 9223372036854775808\) were asked for"),
    ("unpack-features-int64-max", lambda m: m.unpack_bits(torch.zeros(2, 3, dtype=torch.int64), 0, 2**63 - 1), r"unpack_bits: packed has 3 words per row, but words \[0, 144115188075855872\) were asked for"),
]


@pytest.mark.parametrize("impl", ["native", "twin"])
def test_threshold_pack_into_refuses_rows_that_share_memory(impl):
    """An expanded ``out`` (row stride 0): every row is the same words, which several threads
    would write at once; refused as torch's own out= ops refuse it."""
    out = torch.zeros(1, 4, dtype=torch.int64).expand(2, 4)
    fn = OPS.threshold_pack_into if impl == "native" else ref.threshold_pack_into
    with pytest.raises(RuntimeError, match="single memory location"):
        fn(torch.randn(2, 150), t1, "element", out, 0)
    assert not out.any()


@pytest.mark.parametrize("impl", ["native", "twin"])
def test_threshold_pack_into_refuses_rows_that_overlap(impl):
    """Rows of ``out`` that overlap in part (row stride below the row's width): refused on every
    backend (CUDA's channels-innermost path zeroes each row's words first, and could not)."""
    buf = torch.full((8,), -1, dtype=torch.int64)
    out = buf.as_strided((2, 3), (2, 1))
    fn = OPS.threshold_pack_into if impl == "native" else ref.threshold_pack_into
    for x in (torch.randn(2, 150), torch.randn(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)):
        with pytest.raises(ValueError, match=r"threshold_pack_into: out's rows overlap \(row stride 2 words, 3 words "
                                             r"per row\); give each row memory of its own"):
            fn(x, t1, "element", out, 0)
    assert (buf == -1).all()
    one_row, x = torch.full((3, 1), -1, dtype=torch.int64).T, torch.randn(1, 150)  # one row: any stride will do
    fn(x, t1, "element", one_row, 0)
    assert torch.equal(one_row, ref.threshold_pack(x, t1, "element"))


@pytest.mark.parametrize("impl", ["native", "twin"])
def test_threshold_pack_into_refuses_an_out_that_shares_memory_with_its_inputs(impl):
    """x (or thresholds) a view of out's memory: the kernels wrote word 0 over floats they read
    for word 1 afterwards, and returned wrong bits without a word."""
    fn = OPS.threshold_pack_into if impl == "native" else ref.threshold_pack_into
    out = torch.zeros(1, 64, dtype=torch.int64)
    x = out.view(torch.float32)[:, :128]
    x.copy_(torch.randn(1, 128))
    thr = torch.zeros(1, 4, dtype=torch.int64).view(torch.float32)[0, 2:3]  # (0.0)
    before = out.clone()
    with pytest.raises(ValueError, match=r"threshold_pack_into: out shares memory with x, which would be read after "
                                         r"being written over; give out memory of its own"):
        fn(x, t1, "element", out, 32)
    tail = torch.zeros(1, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"out shares memory with thresholds"):
        fn(torch.randn(1, 128), tail.view(torch.float32)[0, 6:7], "element", tail, 0)
    assert torch.equal(out, before) and not tail.any()
    # views of one buffer that do not overlap are fine: x after out's words
    buf = torch.zeros(1, 66, dtype=torch.int64)
    x = buf.view(torch.float32)[:, 4:]
    x.copy_(torch.randn(1, 128))
    fn(x, thr, "element", buf[:, :2], 0)
    assert torch.equal(buf[:, :2], ref.threshold_pack(x.clone(), t1, "element"))


def test_the_twins_name_every_dtype_as_the_native_ops_do():
    names = ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "int16", "int8", "bool")
    for dtype in [getattr(torch, n) for n in names if hasattr(torch, n)]:
        x = torch.zeros(2, 3, dtype=dtype)
        with pytest.raises(ValueError) as native:
            OPS.threshold_pack(x, t1, "element")
        with pytest.raises(ValueError) as twin:
            ref.threshold_pack(x, t1, "element")
        assert str(native.value).splitlines()[0] == str(twin.value), dtype
        out = torch.zeros(2, 1, dtype=dtype)
        with pytest.raises(ValueError) as native:
            OPS.threshold_pack_into(torch.zeros(2, 3), t1, "element", out, 0)
        with pytest.raises(ValueError) as twin:
            ref.threshold_pack_into(torch.zeros(2, 3), t1, "element", out, 0)
        assert str(native.value).splitlines()[0] == str(twin.value), dtype


@pytest.mark.parametrize("impl", ["native", "twin"])
@pytest.mark.parametrize("case", PACKED_CASES, ids=[c[0] for c in PACKED_CASES])
def test_packed_errors(impl, case):
    _, call, match = case
    with pytest.raises(ValueError, match=match):
        call(OPS if impl == "native" else ref)


def test_bad_cpu_variant_name(monkeypatch):
    monkeypatch.setenv("FAKESPOTTER_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match=r"FAKESPOTTER_CPU_ISA must be auto, scalar, avx2 or avx512, got 'sse9'"):
        fakespotter.threshold_pack(torch.randn(2, 70), 0.0, "element")


def test_unsupported_cpu_variant(monkeypatch):
    missing = [v for v in ("avx2", "avx512") if v not in fakespotter._C.cpu_isa_supported()]
    if not missing:
        pytest.skip("this CPU supports every variant")
    monkeypatch.setenv("FAKESPOTTER_CPU_ISA", missing[0])
    with pytest.raises(ValueError, match=f"FAKESPOTTER_CPU_ISA={missing[0]} asks for a variant this CPU does not support"):
        fakespotter.threshold_pack(torch.randn(2, 70), 0.0, "element")
