"""The installed package: non-editable, built against this torch, README examples run."""

from __future__ import annotations

import pathlib
import re

import torch

import fakespotter
from fakespotter import _C

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tests_run_against_the_installed_package():
    # ./dev installs non-editably; the tests must exercise that install, not the source tree.
    pkg = pathlib.Path(fakespotter.__file__).resolve().parent
    assert ROOT / "src" not in pkg.parents, pkg
    assert pathlib.Path(_C.__file__).resolve().parent == pkg


def test_build_info():
    info = _C.build_info()
    assert info["version"] == fakespotter.__version__
    assert info["torch_version"] == torch.__version__
    assert info["cpu_isa_compiled"] == ["scalar", "avx2", "avx512"]
    assert "scalar" in _C.cpu_isa_supported()
    for name in ("threshold_pack", "threshold_pack_into", "layer_popcount", "unpack_bits"):
        assert hasattr(torch.ops.fakespotter, name)


def readme_python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_examples_run(capsys):
    blocks = readme_python_blocks()
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([8, 4]) torch.int64" in out
    assert "torch.Size([4, 61]) torch.Size([4, 30])" in out
