"""kernels/_tuning.py and the Linear+ReLU launchers' use of it: one config per shape bucket,
chosen once, remembered across processes, launched directly afterwards."""
import json

import pytest
import torch
import triton

from fastcore5.kernels import _tuning, gemm_launch
from fastcore5.kernels import linear_relu as lr


def _kernel_stand_in():
    """Source for TunedKernel's cache key; never launched."""


def _configs(*block_ms):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": 16}, num_warps=4, num_stages=2) for m in block_ms]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCORE5_CACHE_DIR", str(tmp_path))
    _tuning.forget_disk_cache()
    yield tmp_path
    _tuning.forget_disk_cache()


@pytest.fixture
def timed(monkeypatch):
    """Replace the GPU timing: candidate BLOCK_M=64 is fastest; record every timing round."""
    rounds = []

    def fake_benchmark(runs):
        rounds.append(list(runs))
        return {config: abs(config.kwargs["BLOCK_M"] - 64) + 1.0 for config in runs}

    monkeypatch.setattr(_tuning, "benchmark", fake_benchmark)
    return rounds


BUCKET = (("dtype", "bfloat16"), ("rows", 128), ("cols", 256))


def test_first_choice_is_timed_printed_once_and_saved(cache_dir, timed, capsys):
    tuned = _tuning.TunedKernel(_kernel_stand_in, "test kernel", lambda bucket: _configs(128, 64, 32), _configs(16)[0])
    first = tuned.choose(BUCKET, "test card", lambda config: None)
    assert first.kwargs["BLOCK_M"] == 64
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "tuning test kernel" in lines[0] and "rows=128" in lines[0] and "done in" in lines[0]
    assert tuned.choose(BUCKET, "test card", lambda config: None) is first
    assert len(timed) == 1 and capsys.readouterr().err == ""
    saved = json.loads((cache_dir / "tuning.json").read_text())["entries"]
    assert [entry["config"]["kwargs"]["BLOCK_M"] for entry in saved.values()] == [64]
    assert tuned.report()[0]["source"] == "tuned" and tuned.report()[0]["kwargs"]["BLOCK_M"] == 64


def test_a_new_process_reads_the_choice_instead_of_tuning(cache_dir, timed, capsys):
    first = _tuning.TunedKernel(_kernel_stand_in, "test kernel", lambda bucket: _configs(128, 64, 32), _configs(16)[0])
    first.choose(BUCKET, "test card", lambda config: None)
    _tuning.forget_disk_cache()  # what a fresh process starts with
    capsys.readouterr()
    later = _tuning.TunedKernel(_kernel_stand_in, "test kernel", lambda bucket: _configs(128, 64, 32), _configs(16)[0])
    assert later.choose(BUCKET, "test card", lambda config: None).kwargs["BLOCK_M"] == 64
    assert len(timed) == 1 and capsys.readouterr().err == ""
    assert later.report()[0]["source"] == "disk cache"
    # another card, or another bucket, is tuned afresh
    later.choose(BUCKET, "other card", lambda config: None)
    later.choose((("dtype", "bfloat16"), ("rows", 256), ("cols", 256)), "test card", lambda config: None)
    assert len(timed) == 3


def test_single_candidate_and_unnamed_device_write_nothing(cache_dir, timed):
    single = _tuning.TunedKernel(_kernel_stand_in, "test kernel", lambda bucket: _configs(32), _configs(16)[0])
    assert single.choose(BUCKET, "test card", lambda config: None).kwargs["BLOCK_M"] == 32
    several = _tuning.TunedKernel(_kernel_stand_in, "test kernel", lambda bucket: _configs(128, 64), _configs(16)[0])
    assert several.choose(BUCKET, None, lambda config: None).kwargs["BLOCK_M"] == 64
    assert len(timed) == 1
    assert not (cache_dir / "tuning.json").exists()


def test_an_unreadable_cache_file_means_tuning_again(cache_dir, timed):
    (cache_dir / "tuning.json").write_text("{not json")
    tuned = _tuning.TunedKernel(_kernel_stand_in, "test kernel", lambda bucket: _configs(128, 64), _configs(16)[0])
    assert tuned.choose(BUCKET, "test card", lambda config: None).kwargs["BLOCK_M"] == 64
    assert json.loads((cache_dir / "tuning.json").read_text())["format"] == 1


def test_tuning_off_launches_the_default_untimed_and_unsaved(cache_dir, timed, monkeypatch):
    monkeypatch.setenv("FASTCORE5_TUNING", "off")
    tuned = _tuning.TunedKernel(_kernel_stand_in, "test kernel", lambda bucket: _configs(128, 64), _configs(16)[0])
    assert tuned.choose(BUCKET, "test card", lambda config: None).kwargs["BLOCK_M"] == 16
    assert timed == [] and not (cache_dir / "tuning.json").exists()
    assert tuned.report()[0]["source"] == "default (FASTCORE5_TUNING=off)"
    monkeypatch.setenv("FASTCORE5_TUNING", "sometimes")
    with pytest.raises(ValueError, match="FASTCORE5_TUNING='sometimes'.*'on' or 'off'"):
        tuned.choose((("dtype", "float16"),), "test card", lambda config: None)


def _bucket(launcher, dtype, M, N, K, strides=(64, 1, 64, 1, 32, 1)):
    return launcher.bucket((dtype, "ieee", True), (M, N, K), strides)


def test_batch_sizes_share_a_power_of_two_bucket():
    forward = lr._forward
    assert _bucket(forward, torch.bfloat16, 33, 256, 64) == _bucket(forward, torch.bfloat16, 63, 256, 64)
    assert dict(_bucket(forward, torch.bfloat16, 33, 256, 64))["rows"] == 64
    # M divisible by 16 or not compiles differently (Triton specialises it): separate buckets
    assert _bucket(forward, torch.bfloat16, 48, 256, 64) != _bucket(forward, torch.bfloat16, 33, 256, 64)
    assert dict(_bucket(forward, torch.bfloat16, 65, 256, 64))["rows"] == 128
    # the batch dimension is the reduction of the grad_W kernel
    assert dict(lr._backward_weight.bucket((torch.float32, "ieee", True, True), (256, 64, 1000), (1,) * 8))["reduction"] == 1024
    # a stride that is neither 1 nor a multiple of 16 compiles differently: another bucket
    odd = _bucket(forward, torch.bfloat16, 64, 256, 64, strides=(64, 2, 64, 1, 32, 1))
    assert odd != _bucket(forward, torch.bfloat16, 64, 256, 64)
    same_class = _bucket(forward, torch.bfloat16, 64, 256, 64, strides=(128, 1, 64, 1, 32, 1))
    assert same_class == _bucket(forward, torch.bfloat16, 64, 256, 64)


def _tiles(configs):
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages) for c in configs}


def test_candidates_fit_shared_memory_and_the_problem():
    big_bf16 = gemm_launch.hopper_candidates(_bucket(lr._forward, torch.bfloat16, 8192, 4096, 1024))
    assert len(big_bf16) == len(gemm_launch.hopper_tiles(gemm_launch.PORTABLE))
    big_fp32 = _tiles(gemm_launch.hopper_candidates(_bucket(lr._forward, torch.float32, 8192, 4096, 1024)))
    assert big_fp32 and not big_fp32 & {(128, 256, 64, 3), (256, 128, 64, 3), (128, 128, 64, 4)}
    for m, n, k, stages in big_fp32:
        assert stages * (m * k + k * n) * 4 <= 232448
    tiny = _tiles(gemm_launch.hopper_candidates(_bucket(lr._forward, torch.bfloat16, 20, 10, 784)))
    assert tiny == {(64, 64, 32, 5)}
    skinny = _tiles(gemm_launch.hopper_candidates(_bucket(lr._forward, torch.bfloat16, 60, 4096, 4096)))
    assert skinny and all(m == 64 for m, _, _, _ in skinny) and max(n for _, n, _, _ in skinny) == 256


def test_hopper_tiles_are_one_table_for_both_gemm_families():
    """Every tile of gemm_launch.HOPPER_TILES is timed by a family that exists, and the TMA
    kernels' tiles fill whole warpgroups (4 or 8 warps), which their wgmma needs: a 2-warp tile
    would compile them to the older mma path."""
    from fastcore5.kernels import linear_relu_hopper

    families = {gemm_launch.PORTABLE, gemm_launch.TMA}
    assert all(tile_families and set(tile_families) <= families for tile_families in gemm_launch.HOPPER_TILES.values())
    tma = gemm_launch.hopper_tiles(gemm_launch.TMA)
    assert tma == linear_relu_hopper._TILES and all(warps in (4, 8) for *_, warps in tma)


def test_launcher_chooses_once_per_bucket_then_launches_directly(monkeypatch):
    calls = []
    choose = lr._forward.tuned.choose

    def counting_choose(bucket, device_name, runs):
        calls.append(dict(bucket)["rows"])
        return choose(bucket, device_name, runs)

    monkeypatch.setattr(lr._forward.tuned, "choose", counting_choose)
    weight, bias = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    shapes = [(1001, 5), (1001, 5), (1003, 5), (1001, 5), (1030, 5)]  # buckets 1024, 1024, 1024, 1024, 2048
    for shape in shapes:
        x = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(lr.linear_relu_forward(x, weight, bias), torch.relu(x @ weight.T + bias))
    # one plan per exact shape; the bucket's config is looked up by the first of each shape
    assert calls == [1024, 1024, 2048]
    rows = [r for r in lr.tuned_configs() if r["kernel"] == "Linear+ReLU forward" and "rows=1024" in r["bucket"]]
    assert rows and {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= set(rows[0]["kwargs"]) and rows[0]["num_warps"] >= 1


def test_wrap_launches_through_the_wrapper_without_reading_tensors():
    """Traced as torch.library.triton_op does it: fake tensors (data_ptr() raises) and a wrapper
    that receives each kernel object and returns what gets launched."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    launches = []

    def wrap(kernel):
        class Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((kernel, grid, args, kwargs))

        return Launch()

    with FakeTensorMode():
        x, w, b = torch.randn(37, 12), torch.randn(9, 12), torch.randn(9)
        out = lr.linear_relu_forward(x, w, b, wrap=wrap)
        grads = lr.linear_relu_backward(torch.randn(37, 9), out, x, w, True, True, True, wrap=wrap)
    assert out.shape == (37, 9) and [g.shape for g in grads] == [(37, 12), (9, 12), (9,)]
    kernels = [launch[0] for launch in launches]
    assert kernels == [lr._linear_relu_fwd_kernel, lr._linear_relu_bwd_input_kernel, lr._linear_relu_bwd_weight_kernel]
    for kernel, grid, args, kwargs in launches:
        assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"} <= set(kwargs)
        assert len(grid) == 1 and grid[0] >= 1


def test_wrap_launch_computes_the_same_result():
    x, w, b = torch.randn(23, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    wrapped = []

    def wrap(kernel):
        wrapped.append(kernel)
        return kernel

    torch.testing.assert_close(lr.linear_relu_forward(x, w, b, wrap=wrap), torch.relu(x @ w.T + b))
    assert wrapped == [lr._linear_relu_fwd_kernel]


_TRAIN_LIKE = """
import torch
from fastcore5.kernels import linear_relu as lr
w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
b = torch.randn(512, device="cuda", dtype=torch.bfloat16)
for M in (1000, 1003, 1000, 617):  # batch sizes of one power-of-two bucket, the last a partial batch
    x = torch.randn(M, 256, device="cuda", dtype=torch.bfloat16)
    out = lr.linear_relu_forward(x, w, b)
    lr.linear_relu_backward(torch.randn_like(out), out, x, w, True, True, True)
torch.cuda.synchronize()
print(sorted({row["source"] for row in lr.tuned_configs()}))
"""


@pytest.mark.gpu
def test_gpu_tunes_once_per_bucket_and_later_processes_reuse_it(tmp_path):
    """On a GPU: one stderr line per (kernel, bucket) tuned, batch sizes of one bucket tuned once
    (1000 and 1003 share div16=0; 617 too), and a second process reads every choice from disk."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "FASTCORE5_CACHE_DIR": str(tmp_path), "FASTCORE5_TUNING": "on"}
    first = subprocess.run([sys.executable, "-c", _TRAIN_LIKE], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    tuning_lines = [line for line in first.stderr.splitlines() if line.startswith("fastcore5: tuning")]
    assert len(tuning_lines) == 3 and all("done in" in line for line in tuning_lines), first.stderr
    assert "tuned" in first.stdout
    second = subprocess.run([sys.executable, "-c", _TRAIN_LIKE], capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "fastcore5: tuning" not in second.stderr
    assert second.stdout.strip() == "['disk cache']"


def test_a_candidate_that_fails_for_another_reason_than_resources_raises(monkeypatch):
    """Out of shared memory or registers: that config is skipped (infinitely slow). Any other error
    (a compile error in the kernel) is a bug and must not pass for a skipped config."""
    import triton.testing
    from triton.runtime.errors import OutOfResources

    def run_or_raise(error):
        def run():
            raise error
        return run

    monkeypatch.setattr(triton.testing, "do_bench", lambda run, **_: run() or [1.0])
    fits, too_big = _configs(32, 64)
    timings = _tuning.benchmark({fits: lambda: None, too_big: run_or_raise(OutOfResources(300000, 232448, "shared memory"))})
    assert timings == {fits: 1.0, too_big: float("inf")}
    with pytest.raises(ValueError, match="a real compile error"):
        _tuning.benchmark({fits: run_or_raise(ValueError("a real compile error"))})


def _kernel_module(folder, helper_body: str):
    """Module ``tuning_key_mod`` in ``folder``: a @triton.jit kernel calling a @triton.jit helper
    whose body is ``helper_body``."""
    import importlib.util

    folder.mkdir()
    path = folder / "tuning_key_mod.py"
    path.write_text(
        "import triton\n\n"
        "@triton.jit\ndef helper(x):\n    return " + helper_body + "\n\n"
        "@triton.jit\ndef kernel(ptr):\n    helper(ptr)\n"
    )
    spec = importlib.util.spec_from_file_location("tuning_key_mod", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tuning_cache_key_changes_with_a_called_helper(tmp_path, monkeypatch):
    """A tuned config was measured for the kernel and everything it calls: editing only a helper
    must give another disk-cache key instead of reusing the old choice (the key hashed the
    kernel's own source alone)."""
    monkeypatch.setattr(_tuning, "_PACKAGE", "tuning_key_mod")
    before = _kernel_module(tmp_path / "a", "x + 1")
    same = _kernel_module(tmp_path / "b", "x + 1")
    edited = _kernel_module(tmp_path / "c", "x + 2")
    assert _tuning.source_hash(before.kernel) == _tuning.source_hash(same.kernel)
    assert _tuning.source_hash(before.kernel) != _tuning.source_hash(edited.kernel)


def test_a_spent_tuning_budget_launches_defaults(cache_dir, timed, monkeypatch):
    """FASTCORE5_TUNING_SECONDS caps the time a process spends tuning (the GPU check sets it):
    once spent, a new bucket gets the default config untimed."""
    monkeypatch.setenv("FASTCORE5_TUNING_SECONDS", "5")
    monkeypatch.setattr(_tuning, "_tuning_spent", 0.0)
    tuned = _tuning.TunedKernel(_kernel_stand_in, "test kernel", lambda bucket: _configs(128, 64), _configs(16)[0])
    assert tuned.choose(BUCKET, "test card", lambda config: None).kwargs["BLOCK_M"] == 64  # timed
    monkeypatch.setattr(_tuning, "_tuning_spent", 5.0)
    other = (("dtype", "float16"),)
    assert tuned.choose(other, "test card", lambda config: None).kwargs["BLOCK_M"] == 16
    assert len(timed) == 1
    assert tuned.report()[1]["source"] == "default (FASTCORE5_TUNING_SECONDS spent)"
    monkeypatch.setenv("FASTCORE5_TUNING_SECONDS", "soon")
    with pytest.raises(ValueError, match="FASTCORE5_TUNING_SECONDS='soon' is not a number"):
        tuned.choose((("dtype", "float64"),), "test card", lambda config: None)
