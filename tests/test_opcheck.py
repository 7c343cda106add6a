"""torch.library.opcheck on every op, and the ops inside torch.compile, torch.export and
TorchScript: the dispatcher integration that taps (issue B) rely on."""

from __future__ import annotations

import warnings

import pytest
import torch

import fakespotter
from fakespotter import reference as ref

OPS = torch.ops.fakespotter


def pack_samples():
    yield torch.randn(3, 40, 7, 7), torch.tensor([0.05]), "channel"
    yield torch.randn(3, 40, 7, 7).contiguous(memory_format=torch.channels_last), torch.randn(40), "channel"
    yield torch.randn(2, 65).half(), torch.tensor([0.0]), "element"
    yield torch.randn(2, 5, 3, 3).bfloat16(), torch.randn(45), "element"
    yield torch.randn(0, 8, 2, 2), torch.tensor([0.0]), "element"


@pytest.mark.parametrize("sample", list(pack_samples()), ids=lambda s: f"{tuple(s[0].shape)}-{s[2]}")
def test_opcheck_threshold_pack(sample):
    torch.library.opcheck(OPS.threshold_pack.default, sample)


@pytest.mark.parametrize("sample", list(pack_samples()), ids=lambda s: f"{tuple(s[0].shape)}-{s[2]}")
def test_opcheck_threshold_pack_into(sample):
    x, thr, granularity = sample
    words = fakespotter.num_words(ref.num_features(x.shape, granularity))
    out = torch.zeros(x.shape[0], words + 3, dtype=torch.int64)
    torch.library.opcheck(OPS.threshold_pack_into.default, (x, thr, granularity, out, 2))


def test_packing_ops_accept_any_layout_under_inductor():
    """The packing ops read any strides, so inductor may hand them the layout it chose
    (channels_last after its convolution fusions) instead of copying each activation back to
    the eager strides first (benchmarks/RESULTS.md, "Compiled forward")."""
    for op in (OPS.threshold_pack.default, OPS.threshold_pack_into.default):
        assert torch.Tag.flexible_layout in op.tags, op


def test_opcheck_popcount_and_unpack():
    packed = torch.randint(-(2**63), 2**63 - 1, (4, 5), dtype=torch.int64)
    torch.library.opcheck(OPS.layer_popcount.default, (packed, 1, 3))
    torch.library.opcheck(OPS.unpack_bits.default, (packed, 1, 130))


class TwoLayerTap(torch.nn.Module):
    """Packs two activations into one preallocated row: the pattern taps use."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 70, 3)
        self.register_buffer("t1", torch.tensor([0.01]))
        self.register_buffer("t2", torch.tensor([0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv(x))
        b = a.mean(dim=(2, 3))
        out = torch.zeros(x.shape[0], 4, dtype=torch.int64, device=x.device)
        torch.ops.fakespotter.threshold_pack_into(a, self.t1, "channel", out, 0)
        torch.ops.fakespotter.threshold_pack_into(b, self.t2, "element", out, 2)
        return out


def test_compile_export_and_script_match_eager(tmp_path):
    torch.manual_seed(0)
    model = TwoLayerTap().eval()
    x = torch.randn(5, 3, 11, 11)
    with torch.no_grad():
        eager = model(x)
        assert eager[:, :2].any() and eager[:, 2:].any()

        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        assert torch.equal(compiled, eager)

        batch = torch.export.Dim("batch", min=1)
        exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
        path = tmp_path / "tap.pt2"
        torch.export.save(exported, path)
        reloaded = torch.export.load(path).module()
        assert torch.equal(reloaded(x), eager)
        assert torch.equal(reloaded(x[:2]), eager[:2])

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            scripted = torch.jit.script(model)
            path = tmp_path / "tap.ts"
            scripted.save(str(path))
            loaded = torch.jit.load(str(path))
            assert torch.equal(loaded(x), eager)
