"""The cache of the C++ CPU kernels' large outputs (csrc/output_buffers.cpp says why it exists).

An output of the cpu backend of at least 1 MiB (a dense embedding gradient, a (batch, features)
activation), and a kernel's scratch that large (the sparse SGD step's buckets), is allocated from
this cache; when the tensor is freed its buffer is kept for the next allocation of the same byte
size, so a training step does not fault tens of MB of fresh pages in again. The cache keeps at most its limit: 256 MiB unless FASTCORE5_CPU_CACHE_MB says otherwise
when the extension loads (0 turns it off). Like ``torch.cuda.empty_cache()``, ``empty()`` gives
the kept buffers back to the allocator; buffers of live tensors are not the cache's to free.

Without the extension (CPU tensors then run the reference) there is no cache: ``stats()`` reports
zeros and ``empty()`` and ``set_limit()`` do nothing.
"""
from __future__ import annotations

from . import backends

_NO_CACHE = {"held_bytes": 0, "limit_bytes": 0, "hits": 0, "misses": 0}


def stats() -> dict[str, int]:
    """``held_bytes`` kept for reuse now, ``limit_bytes``, and the allocations the cache served
    (``hits``) and did not (``misses``) since the process started."""
    extension = backends.native_extension()
    return extension.cpu_cache_counts() if extension is not None else dict(_NO_CACHE)


def set_limit(limit_bytes: int) -> None:
    """Keep at most ``limit_bytes`` of freed outputs from now on (buffers beyond it are freed now)."""
    if not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool):
        raise TypeError(f"fastcore5.cpu_cache.set_limit: limit_bytes must be an int, got {type(limit_bytes).__name__}")
    if limit_bytes < 0:
        raise ValueError(f"fastcore5.cpu_cache.set_limit: limit_bytes must be >= 0, got {limit_bytes}")
    extension = backends.native_extension()
    if extension is not None:
        extension.cpu_cache_set_limit(limit_bytes)


def empty() -> None:
    """Free every buffer the cache keeps; the limit stays."""
    extension = backends.native_extension()
    if extension is not None:
        extension.cpu_cache_empty()
