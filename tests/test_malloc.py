"""The CLI keeps freed memory for the next forward (``_malloc.keep_freed_memory``): measured as
page faults when a large block is allocated again, in fresh processes (the setting is the
process's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")

CHILD = r"""
import json, resource
import numpy as np
from fakespotter._malloc import keep_freed_memory

applied = keep_freed_memory()
n = 256 << 20  # above glibc's largest dynamic mmap threshold (32 MB)
np.ones(n, np.uint8)  # allocated by malloc, touched and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(n, np.uint8)
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def child(**env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("FAKESPOTTER_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env={**base, **env},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_instead_of_faulted_in_again():
    kept = child()
    default = child(FAKESPOTTER_MALLOC="default")
    assert kept["applied"] is True and default["applied"] is False
    # glibc's default maps the block afresh: one fault per page (4 KiB, or 2 MiB with huge pages)
    assert default["faults"] >= 100, default
    assert kept["faults"] < 50, kept


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "65536"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_a_users_own_malloc_settings_are_left_alone(env):
    assert child(**env)["applied"] is False


def test_env_says_whether_it_is_on():
    def malloc_line(**env):
        base = {k: v for k, v in os.environ.items() if k != "FAKESPOTTER_MALLOC"}
        proc = subprocess.run([sys.executable, "-m", "fakespotter", "env", "--json"], capture_output=True, text=True,
                              env={**base, **env}, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)["malloc"]

    assert malloc_line().startswith("freed memory kept for the next forward")
    assert malloc_line(FAKESPOTTER_MALLOC="default") == "left as it is"
