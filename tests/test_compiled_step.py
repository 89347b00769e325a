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
