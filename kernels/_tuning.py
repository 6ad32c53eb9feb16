"""Launch configs chosen once per shape bucket, remembered across processes.

Triton's ``@triton.autotune`` keys on the exact values of its key arguments and runs its own
bookkeeping on every call. For a GEMM whose M is the batch size that means re-tuning for every
new batch size (the last, partial batch of an epoch included) and paying the autotuner's
Python on every launch. Here instead:

* a launcher describes its launch by a *bucket* (what decides which config wins: dtype,
  precision, M rounded up to a power of two, N, K, the divisibility and stride classes that
  change the compiled code) and a list of candidate configs already pruned for that bucket;
* the first launch of a bucket on a GPU times the candidates on the real arguments
  (``benchmark``), prints one line on stderr, and stores the winner in memory and in a JSON
  file (``cache_path()``), which later processes read instead of tuning again;
* every later launch finds its config with one dict lookup and launches the kernel directly.

``FASTCORE5_TUNING=off`` skips the timing: each bucket launches its kernel's default config, and
nothing is saved. For test runs on a GPU, where the config does not matter to the result and
tuning every bucket of every test would take minutes.

Triton's own disk cache (``cache_results=True``) is not used: it lives inside the autotuner
whose per-call cost and exact-value keys are what this module removes. Under Triton's CPU
interpreter, and wherever only one candidate survives pruning, nothing is timed or written.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import triton
from triton.runtime.errors import OutOfResources
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_FORMAT = 1
_PACKAGE = __name__.rpartition(".")[0]  # fastcore5.kernels
_lock = threading.Lock()
_disk: dict | None = None  # cache_path()'s entries, read on the first bucket miss


def cache_path() -> Path:
    """The JSON file of tuned configs: $FASTCORE5_CACHE_DIR, else $XDG_CACHE_HOME/fastcore5, else
    ~/.cache/fastcore5; file ``tuning.json``."""
    root = os.environ.get("FASTCORE5_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastcore5")
    return Path(root) / "tuning.json"


TUNING_VAR = "FASTCORE5_TUNING"
BUDGET_VAR = "FASTCORE5_TUNING_SECONDS"
_tuning_spent = 0.0  # seconds this process has spent timing candidates


def tuning_budget_left() -> bool:
    """FASTCORE5_TUNING_SECONDS (unset: no limit) caps the seconds a process spends tuning; once
    they are spent, new buckets launch their default config (scripts/gpu_check.sh sets it, so a
    cold cache cannot eat a benchmark stage's time limit)."""
    raw = os.environ.get(BUDGET_VAR)
    if raw is None:
        return True
    try:
        budget = float(raw)
    except ValueError:
        raise ValueError(f"{BUDGET_VAR}={raw!r} is not a number of seconds") from None
    return _tuning_spent < budget


def tuning_enabled() -> bool:
    """FASTCORE5_TUNING: "on" (the default) or "off" (module docstring); anything else raises."""
    raw = os.environ.get(TUNING_VAR, "on")
    value = raw.strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"{TUNING_VAR}={raw!r} is not a tuning mode; set it to 'on' or 'off', or unset it")
    return value == "on"


def config_to_dict(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def config_from_dict(data: dict) -> triton.Config:
    return triton.Config(dict(data["kwargs"]), num_warps=data["num_warps"], num_stages=data["num_stages"])


def launch_kwargs(config: triton.Config) -> dict:
    """What ``kernel[grid](...)`` takes for this config: its meta-parameters, warps and stages."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def benchmark(runs: dict[triton.Config, Callable[[], object]]) -> dict[triton.Config, float]:
    """Milliseconds per launch of each candidate (inf for one that fails to compile or launch).

    Module-level so that scripts/compile_check.py can replace it with "compile, do not run"."""
    from triton.testing import do_bench

    timings = {}
    for config, run in runs.items():
        try:
            median = do_bench(run, warmup=5, rep=20, quantiles=[0.5])  # a float or [float] by version
            timings[config] = median[0] if isinstance(median, (list, tuple)) else median
        except OutOfResources:  # more shared memory or registers than this card has: not a candidate
            timings[config] = float("inf")
        # Anything else (a compile error, a bad launch) is a bug, raised as it is: caught here it
        # looked like one skipped config, and the next candidate hid it.
    return timings


def _load_disk() -> dict:
    global _disk
    if _disk is None:
        try:
            data = json.loads(cache_path().read_text())
            _disk = data["entries"] if data.get("format") == _FORMAT else {}
        except (OSError, ValueError, KeyError, TypeError):
            _disk = {}
    return _disk


def _save_disk(key: str, entry: dict) -> None:
    """Merge one entry into the JSON file (re-read first: other processes may have added some)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            current = json.loads(path.read_text())
            entries = current["entries"] if current.get("format") == _FORMAT else {}
        except (OSError, ValueError, KeyError, TypeError):
            entries = {}
        entries[key] = entry
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump({"format": _FORMAT, "entries": entries}, tmp, indent=1, sort_keys=True)
        os.replace(tmp.name, path)
    except OSError as err:  # a read-only home must not break training: tune again next process
        print(f"fastcore5: could not save tuned configs to {path}: {err}", file=sys.stderr)


def forget_disk_cache() -> None:
    """Drop what was read from cache_path() (tests, or after the file changed)."""
    global _disk
    _disk = None


def _python_function(jit_function):
    return getattr(jit_function, "fn", jit_function)


def _is_own_jit(value) -> bool:
    """A @triton.jit function of this package (triton's own, like tl.cdiv, come with its version)."""
    return isinstance(value, (JITFunction, InterpretedFunction)) and _python_function(value).__module__.startswith(
        _PACKAGE
    )


def _called_jit_functions(fn) -> list:
    """The @triton.jit functions ``fn``'s code names: globals (``helper(...)``) and attributes of
    imported modules (``module.helper(...)``)."""
    names = fn.__code__.co_names
    found = []
    for name in names:
        value = fn.__globals__.get(name)
        if _is_own_jit(value):
            found.append(value)
        elif inspect.ismodule(value):
            found += [getattr(value, attr) for attr in names if _is_own_jit(getattr(value, attr, None))]
    return found


def source_hash(kernel) -> str:
    """A hash of ``kernel``'s source and of every @triton.jit helper it calls, transitively: what a
    tuned config was measured for (the tuning cache's key; a changed helper invalidates it)."""
    digest = hashlib.sha256()
    seen, pending = set(), [kernel]
    while pending:
        fn = _python_function(pending.pop())
        if fn in seen:
            continue
        seen.add(fn)
        digest.update(f"{fn.__module__}.{fn.__qualname__}\n{inspect.getsource(fn)}".encode())
        pending += _called_jit_functions(fn)
    return digest.hexdigest()[:16]


class TunedKernel:
    """One @triton.jit kernel whose launch config is chosen once per bucket.

    ``candidates(bucket)`` returns the configs worth trying for a bucket (pruned, never empty);
    ``default`` (a config, or a function of the bucket giving one) is launched where nothing may
    be timed: FASTCORE5_TUNING=off, CUDA-graph capture, ``wrap`` tracing with fake tensors."""

    def __init__(self, kernel, title: str, candidates: Callable[[tuple], list],
                 default: triton.Config | Callable[[tuple], triton.Config]):
        self.kernel = kernel
        self.title = title
        self.candidates = candidates
        self.default = default
        self.chosen: dict[tuple, dict] = {}  # (bucket, device name) -> {"config", "source", "ms"}
        self._source_hash = source_hash(kernel)

    def default_for(self, bucket: tuple) -> triton.Config:
        return self.default if isinstance(self.default, triton.Config) else self.default(bucket)

    def _disk_key(self, bucket: tuple, device_name: str) -> str:
        return json.dumps([self.title, self._source_hash, triton.__version__, device_name, describe(bucket)])

    def known(self, bucket: tuple, device_name: str | None) -> triton.Config | None:
        """The config already chosen for ``bucket`` in this process; no timing."""
        entry = self.chosen.get((bucket, device_name))
        return entry["config"] if entry is not None else None

    def choose(self, bucket: tuple, device_name: str | None, runs: Callable[[triton.Config], Callable[[], object]]) -> triton.Config:
        """The config for ``bucket``: remembered, read from disk, or timed now with ``runs(config)``
        (a zero-argument launch of the kernel with that config on the caller's arguments).
        ``device_name`` (the GPU's name) keys the disk cache; None times without saving (the
        interpreter, scripts/compile_check.py's compile-only run)."""
        with _lock:
            entry = self.chosen.get((bucket, device_name))
            if entry is not None:
                return entry["config"]
            candidates = self.candidates(bucket)
            if len(candidates) == 1:
                entry = {"config": candidates[0], "source": "only candidate", "ms": None}
            elif device_name is None:
                timings = benchmark({c: runs(c) for c in candidates})
                entry = {"config": min(timings, key=timings.get), "source": "timed, not saved", "ms": None}
            elif not tuning_enabled():
                entry = {"config": self.default_for(bucket), "source": f"default ({TUNING_VAR}=off)", "ms": None}
            elif not tuning_budget_left():
                entry = {"config": self.default_for(bucket), "source": f"default ({BUDGET_VAR} spent)", "ms": None}
            else:
                entry = self._from_disk_or_tuned(bucket, device_name, candidates, runs)
            self.chosen[(bucket, device_name)] = entry
            return entry["config"]

    def _from_disk_or_tuned(self, bucket, device_name, candidates, runs) -> dict:
        disk_key = self._disk_key(bucket, device_name)
        saved = _load_disk().get(disk_key)
        if saved is not None:
            return {"config": config_from_dict(saved["config"]), "source": "disk cache", "ms": saved.get("ms")}
        print(f"fastcore5: tuning {self.title} for {describe(bucket)} ({len(candidates)} configs, once per shape "
              f"bucket, saved in {cache_path()}) ...", end="", file=sys.stderr, flush=True)
        global _tuning_spent
        start = time.perf_counter()
        try:
            timings = benchmark({c: runs(c) for c in candidates})
        finally:
            _tuning_spent += time.perf_counter() - start
        best = min(timings, key=timings.get)
        print(f" done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        if timings[best] == float("inf"):
            raise RuntimeError(f"{self.title}: no candidate config could launch for {describe(bucket)}")
        saved = {"config": config_to_dict(best), "ms": timings[best]}
        _load_disk()[disk_key] = saved
        _save_disk(disk_key, saved)
        return {"config": best, "source": "tuned", "ms": timings[best]}

    def report(self) -> list[dict]:
        """One row per bucket launched in this process: the bucket, the config, where it came from."""
        return [
            {"kernel": self.title, "device": device_name, "bucket": describe(bucket), **config_to_dict(entry["config"]),
             "source": entry["source"], "ms": entry["ms"]}
            for (bucket, device_name), entry in list(self.chosen.items())
        ]


def describe(bucket: tuple) -> str:
    """A bucket is a tuple of (name, value) pairs: "name=value ..." for messages and reports."""
    return " ".join(f"{name}={value}" for name, value in bucket)
