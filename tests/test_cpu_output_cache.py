"""The cache of the CPU kernels' large outputs (csrc/output_buffers.cpp, fastcore5.cpu_cache): a
freed output of at least 1 MiB is reused by the next output of its byte size, within the limit;
values stay right on reused memory (every output is NaN-poisoned under the test suite, so a
kernel that leaves any element unwritten fails); the limit, ``empty()`` and the environment
variable do what they say; a cached tensor behaves like any CPU tensor."""
import io
import os
import subprocess
import sys
import threading

import pytest
import torch

import fastcore5
from fastcore5 import cpu_cache

from helpers import fused_fwd_bwd, random_indices, random_tables, reference_fwd_bwd
from native_cpu import require_cpu_kernel

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU kernels' tests make CPU tensors only")

# A users' table whose fp32 gradient (5000 x 64 x 4 bytes = 1.2 MiB) is cached; the rest are not.
N_USERS, N_ITEMS, FACTORS, BATCH = 5000, 300, 64, 4096
CACHED_GRADIENT_BYTES = N_USERS * FACTORS * 4


@pytest.fixture(autouse=True)
def cpu_backend():
    require_cpu_kernel("embedding_dot_bias")
    limit = cpu_cache.stats()["limit_bytes"]
    with fastcore5.use_backend("cpu"):
        yield
    cpu_cache.set_limit(limit)


def backward_on_fresh_inputs(tables):
    """Gradients of a backward on fresh random indices, with the float64 reference's."""
    users, items = random_indices(N_USERS, BATCH), random_indices(N_ITEMS, BATCH)
    grad_out = torch.randn(BATCH)
    _, grads = fused_fwd_bwd(users, items, tables, (0.0, 5.5), grad_out)
    _, expected = reference_fwd_bwd(users, items, tables, (0.0, 5.5), grad_out)
    return grads, expected


def assert_matches(grads, expected):
    for grad, exact in zip(grads, expected):
        torch.testing.assert_close(grad.double(), exact, atol=1e-4, rtol=1e-4)


def test_a_freed_gradient_is_reused_with_right_values():
    tables = random_tables(N_USERS, N_ITEMS, FACTORS)
    grads, expected = backward_on_fresh_inputs(tables)
    assert_matches(grads, expected)
    first_address = grads[0].data_ptr()
    del grads
    before = cpu_cache.stats()
    assert before["held_bytes"] >= CACHED_GRADIENT_BYTES

    grads, expected = backward_on_fresh_inputs(tables)
    after = cpu_cache.stats()
    assert grads[0].data_ptr() == first_address
    assert after["hits"] == before["hits"] + 1
    assert after["held_bytes"] == before["held_bytes"] - CACHED_GRADIENT_BYTES
    assert_matches(grads, expected)


def test_small_outputs_bypass_the_cache():
    tables = random_tables(200, 300, 16)
    before = cpu_cache.stats()
    fused_fwd_bwd(random_indices(200, 64), random_indices(300, 64), tables, None, torch.randn(64))
    after = cpu_cache.stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_limit_zero_keeps_nothing_and_empty_frees_what_is_kept():
    tables = random_tables(N_USERS, N_ITEMS, FACTORS)
    backward_on_fresh_inputs(tables)
    assert cpu_cache.stats()["held_bytes"] >= CACHED_GRADIENT_BYTES
    cpu_cache.empty()
    assert cpu_cache.stats()["held_bytes"] == 0
    assert cpu_cache.stats()["limit_bytes"] > 0, "empty() keeps the limit"

    cpu_cache.set_limit(0)
    before = cpu_cache.stats()
    grads, expected = backward_on_fresh_inputs(tables)
    assert_matches(grads, expected)
    del grads
    after = cpu_cache.stats()
    assert after["held_bytes"] == 0 and after["hits"] == before["hits"] and after["misses"] == before["misses"] + 1


def test_lowering_the_limit_frees_down_to_it():
    tables = random_tables(N_USERS, N_ITEMS, FACTORS)
    backward_on_fresh_inputs(tables)
    held = cpu_cache.stats()["held_bytes"]
    assert held >= CACHED_GRADIENT_BYTES
    cpu_cache.set_limit(held - 1)
    assert cpu_cache.stats()["held_bytes"] <= held - CACHED_GRADIENT_BYTES


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("256", TypeError)])
def test_set_limit_names_a_bad_argument(bad, error):
    with pytest.raises(error, match="limit_bytes"):
        cpu_cache.set_limit(bad)


def test_a_cached_tensor_behaves_like_any_cpu_tensor():
    tables = random_tables(N_USERS, N_ITEMS, FACTORS)
    (grad, *_), expected = backward_on_fresh_inputs(tables)
    kept = grad.clone()
    grad.resize_(2 * N_USERS, FACTORS)  # a resize reallocates through the tensor's allocator
    assert torch.equal(grad[:N_USERS], kept)
    grad[N_USERS:] = 1.0  # the grown rows are uninitialised (a reused buffer may hold NaN)
    saved = io.BytesIO()
    torch.save(grad, saved)
    saved.seek(0)
    assert torch.equal(torch.load(saved), grad)
    assert torch.equal(torch.from_numpy(grad.numpy()), grad)
    grad.share_memory_()
    assert grad.is_shared() and torch.equal(grad[:N_USERS], kept)


def test_a_storage_freed_by_resizing_goes_back_to_the_cache():
    """resize_(0) of the storage (what FSDP does to free a parameter) gives the buffer back at
    once; the empty storage left behind is ordinary memory, not a cached buffer of 0 bytes."""
    tables = random_tables(N_USERS, N_ITEMS, FACTORS)
    (grad, *_), _ = backward_on_fresh_inputs(tables)
    cpu_cache.empty()
    grad.untyped_storage().resize_(0)
    assert cpu_cache.stats()["held_bytes"] == CACHED_GRADIENT_BYTES
    grad.untyped_storage().resize_(1024)
    del grad
    assert cpu_cache.stats()["held_bytes"] == CACHED_GRADIENT_BYTES


def test_the_sparse_sgd_step_keeps_its_scratch_in_the_cache():
    """The sparse step's buckets (nnz x (8 + row bytes), here 1.03 MiB) come from the cache: kept
    after a step, taken again by the next, freed by empty()."""
    require_cpu_kernel("sgd")
    rows, factors, nnz = 2000, 64, 4096
    param = torch.nn.Parameter(torch.randn(rows, factors))
    param.grad = torch.sparse_coo_tensor(
        random_indices(rows, nnz).unsqueeze(0), torch.randn(nnz, factors), (rows, factors), check_invariants=True
    )
    optimizer = fastcore5.optim.SGD([param], lr=0.1)
    scratch_bytes = nnz * (8 + factors * 4)
    cpu_cache.empty()
    optimizer.step()
    after_first = cpu_cache.stats()
    assert after_first["held_bytes"] == scratch_bytes
    optimizer.step()
    after_second = cpu_cache.stats()
    assert after_second["hits"] == after_first["hits"] + 1 and after_second["held_bytes"] == scratch_bytes
    cpu_cache.empty()
    assert cpu_cache.stats()["held_bytes"] == 0


def run_python(code, **environment):
    env = {**os.environ, **environment}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("value, limit_bytes", [("0", 0), ("12", 12 << 20), ("", 256 << 20)])
def test_environment_sets_the_limit(value, limit_bytes):
    done = run_python("from fastcore5 import cpu_cache; print(cpu_cache.stats()['limit_bytes'])",
                      FASTCORE5_CPU_CACHE_MB=value)
    assert int(done.stdout) == limit_bytes


def test_a_bad_environment_value_warns_and_keeps_the_default():
    done = run_python("from fastcore5 import cpu_cache; print(cpu_cache.stats()['limit_bytes'])",
                      FASTCORE5_CPU_CACHE_MB="lots")
    assert int(done.stdout) == 256 << 20
    assert "FASTCORE5_CPU_CACHE_MB=lots" in done.stderr


def test_threads_sharing_the_cache_each_get_right_values():
    """Backward passes on four threads take and return buffers of one size concurrently (the
    cache's lock); every gradient still matches its own reference."""
    tables = random_tables(N_USERS, N_ITEMS, FACTORS)
    failures = []

    def worker():
        for _ in range(5):
            grads, expected = backward_on_fresh_inputs(tables)
            try:
                assert_matches(grads, expected)
            except AssertionError as err:
                failures.append(err)

    workers = [threading.Thread(target=worker) for _ in range(4)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert not failures, failures[0]
