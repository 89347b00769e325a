"""The compiled step's loader makes the process's libstdc++ global before it loads a library."""

import ctypes
import sys

import pytest
import torch  # noqa: F401  (torch is what pulls libstdc++ into the process, privately)

from moec.runtime.compiled_step import share_process_libstdcxx


@pytest.mark.skipif(sys.platform != "linux", reason="dlopen scopes are a Linux/glibc matter")
def test_libstdcxx_symbols_reach_the_global_scope():
    share_process_libstdcxx()
    share_process_libstdcxx()  # idempotent
    process = ctypes.CDLL(None)  # dlsym over the global scope, as a newly loaded library sees it
    assert hasattr(process, "_ZNSt6locale7classicEv"), "libstdc++ is still private to torch"


@pytest.mark.skipif(sys.platform != "linux", reason="dlopen scopes are a Linux/glibc matter")
def test_every_package_load_shares_libstdcxx_first(tmp_path):
    """`load_package` itself shares it, not only `CompiledStep`: gpu_op_check's packages, loaded
    through `load_package` alone, crashed while loading on the H100 machine (2026-12-07)."""
    import subprocess

    script = f"""
import ctypes, torch
from moec.runtime.compiled_step import load_package
before = hasattr(ctypes.CDLL(None), "_ZNSt6locale7classicEv")
try:
    load_package({str(tmp_path / "missing.pt2")!r})
except Exception:
    pass
print(before, hasattr(ctypes.CDLL(None), "_ZNSt6locale7classicEv"))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"], out
