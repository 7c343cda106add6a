from __future__ import annotations

import pytest
import torch

import fakespotter  # noqa: F401  (loads the native ops)
from fakespotter import _C

CPU_VARIANTS = _C.cpu_isa_supported()


@pytest.fixture(params=CPU_VARIANTS)
def cpu_isa(request, monkeypatch):
    """Runs the test once per CPU kernel variant this machine supports, forcing it."""
    monkeypatch.setenv("FAKESPOTTER_CPU_ISA", request.param)
    assert _C.cpu_isa() == request.param
    return request.param


def pytest_report_header(config):
    info = _C.build_info()
    return [
        f"fakespotter {info['version']} built with torch {info['torch_version']}, "
        f"cuda={info['cuda']}; CPU variants compiled {info['cpu_isa_compiled']}, "
        f"supported here {CPU_VARIANTS}; torch.cuda.is_available()={torch.cuda.is_available()}"
    ]
