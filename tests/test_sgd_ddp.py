"""Real use: DistributedDataParallel (gloo, CPU, 2 processes) training with fastcore5.optim.SGD.

Each rank trains on its half of a batch; DDP averages the gradients, so after every step both
replicas must be identical and equal to one process training on the whole batch (mean loss over
the full batch = average of the two half-batch means). Float64 keeps the comparison tight. Both
the normal and the contiguous mode run, in the same two processes (one spawn: starting a
process and importing torch is most of this test's time).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from fastcore5.optim import SGD

from distributed_setup import CONFIG, WORLD, batches, free_port, small_model, train

STEPS = 3


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for contiguous in (False, True):
            ddp = DistributedDataParallel(small_model())
            optimizer = SGD(ddp.parameters(), contiguous=contiguous, **CONFIG)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train(ddp, optimizer, batches(STEPS), shard=rank)
            results[contiguous] = [p.detach().clone() for p in ddp.module.parameters()]
            # DDP copies the averaged gradients into .grad in place, so the flat views survive
            results[("warnings", contiguous)] = [str(w.message) for w in caught]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks reach the teardown together: a rank destroying its gloo group while the other still
        # talks to it aborted the process once in CI ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_replicas_stay_identical_and_match_one_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = small_model()
    train(single, SGD(single.parameters(), **CONFIG), batches(STEPS))
    expected = list(single.parameters())
    start = list(small_model().parameters())

    for contiguous in (False, True):
        assert not any("copied back" in m for r in ranks for m in r[("warnings", contiguous)])
        replicas = [r[contiguous] for r in ranks]
        for a, b in zip(*replicas):
            assert torch.equal(a, b), "replicas diverged"
        for got, want, before in zip(replicas[0], expected, start):
            assert not torch.equal(got, before)
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-12)
