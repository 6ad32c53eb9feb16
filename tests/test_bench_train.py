"""`python -m bench --train` on this device: the pipeline end to end at tiny sizes, the agreement
check on the validation MSEs, the synthetic data and the eager model the speed is compared with."""
from __future__ import annotations

import json
import math

import pytest
import torch

import fastcore5
from fastcore5.bench import runner, train, train_data
from fastcore5.nn import EmbeddingDotBias

from test_bench_runner import assert_git_ignores_as_results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def tiny(monkeypatch):
    """Sizes that train in a second, and torch.compile without inductor's minutes of CPU compiling."""
    monkeypatch.setitem(train.COLLAB, DEVICE, train_data.CollabSize(12_000, 150, 90, 8, 1_024, lr=2.0))
    monkeypatch.setitem(train.MLP, DEVICE, train_data.MLPSize(32, (16, 24, 24, 8), 6))
    if DEVICE == "cpu":
        monkeypatch.setattr(train, "COMPILE_BACKEND", "eager")


def test_train_run_writes_table_json_and_plot(tmp_path, capsys, tiny):
    assert runner.main(["--train", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    [json_path] = tmp_path.glob("train-*.json")
    report = json.loads(json_path.read_text())
    assert report["kind"] == "train" and report["device"] == DEVICE and report["torch"] == torch.__version__
    assert report["problems"] == []
    rows = report["results"]
    assert [(r["task"], r["variant"]) for r in rows] == [(t, v) for t in ("collab", "mlp") for v in train.VARIANTS]
    steps = 12_000 * 9 // 10 // 1_024
    for row in rows:
        assert "error" not in row and row["seconds"] > 0 and row["warmup_s"] > 0
        assert row["steps"] == (steps if row["task"] == "collab" else 6)
        assert math.isfinite(row["mean_train_loss"])
    collab = {r["variant"]: r for r in rows if r["task"] == "collab"}
    mlp = {r["variant"]: r for r in rows if r["task"] == "mlp"}
    # the same start and batches in every way: the results agree to rounding
    for variant in train.VARIANTS:
        assert collab[variant]["valid_mse"] == pytest.approx(collab["eager"]["valid_mse"], rel=1e-4)
        assert mlp[variant]["final_loss"] == pytest.approx(mlp["eager"]["final_loss"], rel=1e-2)
        assert collab[variant]["samples_per_s"] == pytest.approx(steps * 1_024 / collab[variant]["seconds"])
    # and training happened: clearly better than predicting the mean rating
    valid_y = train_data.synthetic_ratings(train.COLLAB[DEVICE], DEVICE)[3]
    assert collab["eager"]["valid_mse"] < 0.9 * float(valid_y.var())
    ours = collab["fastcore5"]
    assert set(ours["speedup"]) == set(train.VARIANTS) - {"fastcore5"}
    assert ours["speedup"]["eager"] == pytest.approx(collab["eager"]["seconds"] / ours["seconds"])
    if DEVICE == "cpu":
        assert report["fastcore5_backend"] == {"embedding_dot_bias": "torch", "linear_relu": "torch"}
        assert any("not the point" in note for note in report["notes"])
        assert "peak_mem_MiB" not in ours and report["target_results"] == []
    else:
        assert ours["peak_mem_MiB"] > 0 and len(report["target_results"]) == 3
    assert "samples/s" in printed and "steps/s" in printed and "torch.compile reduce-overhead" in printed
    [png] = tmp_path.glob("train-*.png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert_git_ignores_as_results([json_path, png])



def test_train_run_fails_when_a_way_misses_eager_validation_mse(tmp_path, monkeypatch, tiny):
    """The agreement is an assertion of the run: a way 5% off eager ends it with exit status 1."""
    real_run = train.collab_run

    def fastcore5_off(variant, *args):
        row = real_run(variant, *args)
        if variant == train.OURS:
            row["valid_mse"] *= 1.05
        return row

    monkeypatch.setattr(train, "collab_run", fastcore5_off)
    monkeypatch.setattr(train, "mlp_task", lambda size, device: [])
    assert runner.main(["--train", "--out", str(tmp_path), "--no-plots"]) == 1
    [json_path] = tmp_path.glob("train-*.json")
    [problem] = json.loads(json_path.read_text())["problems"]
    assert problem.startswith("collab: fastcore5 validation MSE") and "differs from eager" in problem

@pytest.mark.parametrize("variant", train.VARIANTS)
def test_one_cycle_schedules_the_lr_and_holds_the_stated_momentum(variant):
    params = [torch.nn.Parameter(torch.zeros(3))]
    hyper = {"lr": 2.0, "momentum": 0.9, "weight_decay": 1e-4}
    optimizer, schedule = train.optimizer_for(variant, params, hyper, "cpu", one_cycle_steps=20)
    assert isinstance(optimizer, fastcore5.optim.SGD) == (variant == train.OURS)
    seen = []
    for _ in range(20):
        seen.append(dict(optimizer.param_groups[0]))
        params[0].grad = torch.ones(3)
        optimizer.step()
        schedule.step()
    lrs = [group["lr"] for group in seen]
    assert lrs[0] == pytest.approx(2.0 / 25) and max(lrs) == pytest.approx(2.0) and lrs[-1] < lrs[0] / 100
    assert all(group["momentum"] == 0.9 and group["weight_decay"] == 1e-4 for group in seen)
    assert train.optimizer_for(variant, params, hyper, "cpu")[1] is None

def _rows(**mse):
    return [{"task": "collab", "variant": variant, "valid_mse": value} for variant, value in mse.items()]


def test_mse_check_flags_a_way_that_disagrees_or_fails():
    assert train.check_collab_mse(_rows(fastcore5=0.801, eager=0.8, compiled=0.7995)) == []
    [problem] = train.check_collab_mse(_rows(fastcore5=0.9, eager=0.8, compiled=0.8))
    assert "fastcore5" in problem and "eager" in problem
    assert len(train.check_collab_mse(_rows(fastcore5=float("nan"), eager=0.8))) == 1
    assert "no finite eager" in train.check_collab_mse(_rows(fastcore5=0.8))[0]


def test_zipf_ids_are_skewed_and_in_range():
    generator = torch.Generator().manual_seed(0)
    ids = train_data.zipf_ids(200_000, 1_000, 1.0, 5.0, generator, "cpu")
    assert ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < 1_000
    counts = torch.bincount(ids, minlength=1_000).sort(descending=True).values.double()
    weights = (torch.arange(1_000, dtype=torch.float64) + 6).reciprocal()
    expected = weights / weights.sum() * 200_000
    assert float(counts[0]) == pytest.approx(float(expected[0]), rel=0.05)  # the head: ~1/6 of the harmonic mass
    assert counts[:10].sum() > 10 * counts[500:510].sum()
    assert (counts > 0).sum() > 990  # and the tail is still drawn


def test_eager_model_computes_the_same_as_fastcore5():
    fused = EmbeddingDotBias(6, 20, 15, (0.0, 5.5))
    eager = train_data.EagerDotBias(6, 20, 15, (0.0, 5.5))
    eager.load_state_dict(fused.state_dict())
    x = torch.stack([torch.randint(0, 20, (33,)), torch.randint(0, 15, (33,))], dim=1)
    with fastcore5.use_backend("torch"):
        torch.testing.assert_close(eager(x), fused(x))


def test_mlp_ways_share_their_parameters_layout():
    eager, fused = train_data.mlp((5, 7, 3), fused=False, device="cpu"), train_data.mlp((5, 7, 3), fused=True, device="cpu")
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(4, 5)
    with fastcore5.use_backend("torch"):
        torch.testing.assert_close(fused(x), eager(x))
    assert type(fused) is fastcore5.nn.MLP and type(eager) is torch.nn.Sequential
    assert [type(m).__name__ for m in fused] == [type(m).__name__ for m in eager] == ["Linear", "ReLU", "Linear"]
