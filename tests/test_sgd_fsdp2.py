"""Real use: FSDP2 (torch.distributed.fsdp.fully_shard, gloo, CPU, 2 processes) training with
fastcore5.optim.SGD, and its state saved and loaded through torch.distributed.checkpoint.

fully_shard turns every parameter into a DTensor sharded on dim 0 (uneven shards included: the
last Linear's 3 rows split 2 + 1); the optimizer steps the four local shards in one launch
(checked) and keeps DTensor momentum buffers. Each rank trains on its half of a batch; FSDP2
averages the gradients in its reduce-scatter, so the sharded model must equal one process
training on the whole batch with torch.optim.SGD. Halfway, the model and optimizer state go
through DCP (get_state_dict / dcp.save, then a fresh model and optimizer, dcp.load /
set_state_dict) and training continues from the loaded copy. Float64 keeps the comparison
tight. The Triton kernel runs through the interpreter (TRITON_INTERPRET=1, set by conftest and
inherited by the spawned processes).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastcore5 import backends
from fastcore5.optim import SGD

from distributed_setup import CONFIG, WORLD, batches, free_port, small_model, train

STEPS = 4
SAVE_AFTER = 2


def _sharded():
    from torch.distributed.fsdp import fully_shard

    model = small_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, SGD(model.parameters(), **CONFIG)


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        data = batches(STEPS)
        model, optimizer = _sharded()
        train(model, optimizer, data[:SAVE_AFTER], shard=rank)
        buffers = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
        kinds = sorted({type(b).__name__ for b in buffers})
        launches = [(len(launch.members), launch.dtensor, launch.prepared.backend)
                    for launch in optimizer._plans[0].launches]
        saved_buffers = [b.full_tensor() for b in buffers]  # before training goes on in place
        model_state, optim_state = get_state_dict(model, optimizer)
        checkpoint = os.path.join(out_dir, "checkpoint")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint)

        restored, restored_optimizer = _sharded()
        with torch.no_grad():
            for p in restored.parameters():
                p.zero_()  # the load must bring the trained values back
        model_state, optim_state = get_state_dict(restored, restored_optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(restored, restored_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        loaded_buffers = [restored_optimizer.state[p]["momentum_buffer"].full_tensor() for p in restored.parameters()]

        train(model, optimizer, data[SAVE_AFTER:], shard=rank)
        train(restored, restored_optimizer, data[SAVE_AFTER:], shard=rank)
        result = {
            "kinds": kinds,
            "launches": launches,
            "saved_buffers": saved_buffers,
            "loaded_buffers": loaded_buffers,
            "continued": [p.full_tensor() for p in model.parameters()],
            "restored": [p.full_tensor() for p in restored.parameters()],
        }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks reach the teardown together: a rank destroying its gloo group while the other still
        # talks to it aborted the process once in CI ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_training_and_checkpoint_match_unsharded_torch_sgd(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = small_model()
    start = [p.detach().clone() for p in single.parameters()]
    torch_opt = torch.optim.SGD(single.parameters(), foreach=False, **CONFIG)
    train(single, torch_opt, batches(STEPS)[:SAVE_AFTER])
    torch_buffers = [torch_opt.state[p]["momentum_buffer"].clone() for p in single.parameters()]
    train(single, torch_opt, batches(STEPS)[SAVE_AFTER:])
    expected = [p.detach() for p in single.parameters()]

    for result in ranks:
        assert result["kinds"] == ["DTensor"]
        # the four local shards: one launch, on the backend a CPU step picks (the C++ kernel when
        # it is built, else Triton under the interpreter)
        assert result["launches"] == [(4, True, backends.select("sgd", "cpu", torch.float32))]
        for saved, loaded, want in zip(result["saved_buffers"], result["loaded_buffers"], torch_buffers):
            torch.testing.assert_close(saved, want, rtol=0, atol=1e-12)
            assert torch.equal(loaded, saved)
        for got, restored, want, before in zip(result["continued"], result["restored"], expected, start):
            assert not torch.equal(got, before)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
            assert torch.equal(restored, got)
