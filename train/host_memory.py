"""Host memory that goes back to the OS when freed.

glibc raises its mmap threshold (up to 32 MB) each time a large mmapped block is freed, after which
blocks of that size come from the heap and stay in the process when freed. FSDP2 allocates and frees
every layer's gathered parameters on each forward and backward, so on CPU a rank's resident memory
grew by about half the model after one step (measured: 500M-parameter Llama, 2 ranks, LoRA: +1.0 GB
on the non-loading rank). A fixed threshold keeps large blocks mmapped and returned on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
from pathlib import Path

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


@functools.cache
def _libc_function(symbol: str, argtypes: tuple | None = None):
    """A C library function, looked up (find_library runs ldconfig) and typed once; None where there is none."""
    name = ctypes.util.find_library("c")
    try:
        function = getattr(ctypes.CDLL(name), symbol, None) if name else None
    except OSError:
        return None
    if function is not None and argtypes is not None:
        function.argtypes = list(argtypes)
    return function


def return_large_frees_to_os(threshold_bytes: int = 128 * 1024) -> bool:
    """Fix glibc's mmap threshold (disables its dynamic growth). False where there is no glibc."""
    mallopt = _libc_function("mallopt")
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))


MADV_PAGEOUT = 21  # Linux ≥ 5.4: reclaim these pages now; their content is kept (re-read or swapped in on access)


def page_out(storage) -> bool:
    """Ask the kernel to take a tensor storage's whole pages out of this process's resident memory.

    transformers loads safetensors weights as views of the memory-mapped file, so a weight that has
    been read stays resident (as file pages) until the whole mapping goes, i.e. until the last weight
    of the file is freed — freeing weights one by one frees nothing. Paging out is never destructive
    (unlike MADV_DONTNEED): a page that is still in use elsewhere is simply read back. False where the
    kernel or libc cannot do it."""
    page = mmap.PAGESIZE
    ptr, size = storage.data_ptr(), storage.nbytes()
    start, end = -(-ptr // page) * page, (ptr + size) // page * page  # whole pages only
    if end <= start or storage.device.type != "cpu":
        return False
    madvise = _libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
    if madvise is None:
        return False
    return madvise(start, end - start, MADV_PAGEOUT) == 0


def hwm_mb() -> float:
    """This process's peak resident memory (VmHWM, Linux) in MB; 0.0 where the kernel does not report it."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_hwm() -> None:
    """Reset this process's VmHWM to its current resident memory (Linux: 5 into clear_refs), so the next
    hwm_mb() is the peak of what runs in between."""
    Path("/proc/self/clear_refs").write_text("5")
