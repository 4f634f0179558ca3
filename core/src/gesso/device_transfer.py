"""Copying weight files to a CUDA device by DMA from page-locked host memory.

A plain host-to-device copy from pageable memory is staged by the driver through a small
page-locked buffer: about 7 GB/s on the H200 machine, most of a pipeline's load time. Locking a
read-only mapping of the weight file once (``cudaHostRegister``) lets every tensor in it go by
DMA: 1.7 GB in 0.09 s there, locking included. Only read-only *shared* mappings are locked: on
that machine, locking a private (copy-on-write) mapping never returned. Where the CUDA runtime
cannot be reached or refuses the region, the copies take the plain path.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("gesso")

_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly: the device only reads the region


class CudaRuntime:
    """``cudaHostRegister``/``cudaHostUnregister`` of the CUDA runtime that torch itself loaded."""

    def __init__(self, library: Any) -> None:
        self.library = library
        library.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        library.cudaHostUnregister.argtypes = [ctypes.c_void_p]

    def lock(self, pointer: int, nbytes: int) -> bool:
        """Page-lock a host region; ``False`` (with the runtime's error cleared) when refused."""
        if self.library.cudaHostRegister(pointer, nbytes, _REGISTER_READ_ONLY) == 0:
            return True
        self.library.cudaGetLastError()  # or torch's next kernel-launch check would report it
        return False

    def unlock(self, pointer: int) -> None:
        if self.library.cudaHostUnregister(pointer) != 0:
            self.library.cudaGetLastError()


@functools.cache
def cuda_runtime() -> CudaRuntime | None:
    """The runtime library torch loaded (never a second copy of it), or ``None``."""
    if not torch.version.cuda or not hasattr(os, "RTLD_NOLOAD"):
        return None
    major = torch.version.cuda.split(".")[0]
    for name in (f"libcudart.so.{major}", "libcudart.so"):
        try:
            return CudaRuntime(ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL))
        except (OSError, AttributeError):
            continue
    return None


@contextmanager
def read_only_file_view(path: Path, device: torch.device) -> Iterator[torch.Tensor]:
    """The whole file as a read-only uint8 tensor, page-locked while the block runs when ``device``
    is a CUDA device; copies made from it inside the block have finished when it ends."""
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the buffer is not writable: nothing writes it
        raw = torch.frombuffer(mapping, dtype=torch.uint8)
    runtime = cuda_runtime() if device.type == "cuda" else None
    if runtime is None:
        yield raw
        return
    with torch.cuda.device(device):
        locked = runtime.lock(raw.data_ptr(), raw.numel())
        try:
            yield raw
            torch.cuda.current_stream().synchronize()
        finally:
            if locked:
                runtime.unlock(raw.data_ptr())


_refusal_reported = False


def page_locked(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty page-locked CPU tensor, which CUDA copies from by DMA and without waiting; plain
    memory (slower copies, which wait) where the system refuses to lock more, said once per process."""
    global _refusal_reported
    try:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    except RuntimeError as error:
        if not _refusal_reported:
            _refusal_reported = True
            logger.warning("page-locked memory refused (%s); copies to the GPU take the slower path", str(error).splitlines()[0])
        return torch.empty(shape, dtype=dtype)
