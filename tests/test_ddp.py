"""DistributedDataParallel over a converted model: 2 processes, gloo, CPU.

Checks: DDP wraps it and trains (gradients all-reduced, so equal on both ranks); each rank draws its
own noise by default (effective seed ``seed + rank·0x9E3779B97F4A7C15``), reproducible from a
single process; ``set_per_rank_noise(model, False)`` makes the ranks share noise.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import noisyops
from noisyops import LayerConfig
from noisyops.nn.base import RANK_SEED_STRIDE

WORLD = 2
SEED = 11
CFG = LayerConfig(eta=0.05, w_range=2.0)


def _worker(rank: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = noisyops.convert(noisyops.models.lenet5(), CFG, seed=SEED)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x = torch.randn(4, 1, 28, 28)  # the same batch on every rank (same torch seed)
        y = ddp(x)
        y.square().mean().backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        ys, grads = [torch.empty_like(y) for _ in range(WORLD)], [torch.empty_like(grad) for _ in range(WORLD)]
        dist.all_gather(ys, y.detach())
        dist.all_gather(grads, grad)
        noisyops.set_per_rank_noise(model, False)
        with torch.no_grad():
            y_shared = ddp(x)
        shared = [torch.empty_like(y_shared) for _ in range(WORLD)]
        dist.all_gather(shared, y_shared)
        torch.save(dict(y=y.detach(), ys=ys, grads=grads, shared=shared,
                        eff_seed=model.conv1.effective_seed() if rank == 0 else None,
                        calls=int(model.conv1.calls)), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_ddp_two_ranks_gloo(tmp_path):
    init_file = str(tmp_path / "init")
    mp.spawn(_worker, args=(init_file, str(tmp_path)), nprocs=WORLD, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(WORLD)]
    ys, grads, shared = r[0]["ys"], r[0]["grads"], r[0]["shared"]
    assert not torch.equal(ys[0], ys[1])  # each rank its own noise, same input
    assert torch.equal(grads[0], grads[1])  # DDP all-reduced the gradients
    assert torch.equal(shared[0], shared[1])  # per_rank_noise=False: shared noise
    assert r[0]["calls"] == 2 and r[1]["calls"] == 2
    # each rank's noise is reproducible in one process from its effective seed
    for rank in range(WORLD):
        torch.manual_seed(0)
        single = noisyops.convert(noisyops.models.lenet5(), CFG,
                                  seed=(SEED + rank * RANK_SEED_STRIDE) % (1 << 64))
        x = torch.randn(4, 1, 28, 28)
        assert torch.equal(single(x), r[rank]["y"]), rank
    assert r[0]["eff_seed"] == SEED
