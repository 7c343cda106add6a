"""The installed package: non-editable, built against this torch, README examples run."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

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


def test_a_native_library_built_against_another_torch_release_is_warned_of():
    """pip without --no-build-isolation builds against the torch it fetches for the build, not
    the one installed (or torch is upgraded later): the ops may not load or may misbehave."""
    code = ("import torch, warnings; torch.__version__ = '2.99.0+cpu'; warnings.simplefilter('error')\n"
            "try:\n    import fakespotter\nexcept RuntimeWarning as w:\n    print(w)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"fakespotter's native library was built against torch {_C.build_info()['torch_version']}," in out.stdout
    assert "and this is torch 2.99.0+cpu" in out.stdout and "--no-build-isolation" in out.stdout
    import fakespotter

    assert fakespotter._torch_build_mismatch() == ""


def test_a_native_library_that_cannot_load_says_how_to_rebuild_it():
    """Built against another torch release, the library may fail to load at all (an undefined
    symbol): the error says why that happens and how to rebuild."""
    code = ("import sys\nsys.modules['fakespotter._C'] = None  # (an import that fails)\n"
            "try:\n    import fakespotter\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"fakespotter's native library cannot be loaded with torch {torch.__version__}: " in out.stdout
    assert "pip install --no-build-isolation --force-reinstall --no-deps" in out.stdout
