"""vaekern under DistributedDataParallel: 2 ranks with gloo on CPU, localhost only.

DDP averages gradients over ranks. With ``reduction="mean"`` each rank's loss is the mean
over its own rows, so with equal shares the average of the ranks' gradients is the
gradient of the mean over the whole batch: one process on the whole batch gets the same
step. With ``reduction="sum"`` each rank's gradient is the sum over its rows, and DDP's
average divides it by the world size: the full-batch sum's gradient divided by 2.
vaekern itself does no collective: its ops are per-row sums and a local reduction.
"""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vaekern

WORLD = 2
BATCH, D, Z = 8, 30, 4

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")


class TinyVAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Linear(D, 2 * Z)
        self.dec = torch.nn.Linear(Z, D)

    def forward(self, x, eps):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        z = vaekern.reparameterize(mu, logvar, eps=eps, backend="cpu")
        return self.dec(z), mu, logvar


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(BATCH, D, generator=g), torch.randn(BATCH, Z, generator=g)


def _grads(model, x, eps, reduction):
    logits, mu, logvar = model(x, eps)
    vaekern.vae_loss(logits, x, mu, logvar, beta=0.5, reduction=reduction, backend="cpu").backward()
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return {n: p.grad.clone() for n, p in inner.named_parameters()}


def _rank(rank, port, reduction, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(TinyVAE())
        x, eps = _data()
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)  # equal shares
        torch.save(_grads(ddp, x[rows], eps[rows], reduction), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("reduction, factor", [("mean", 1.0), ("sum", 1.0 / WORLD)])
def test_ddp_matches_one_process(tmp_path, reduction, factor):
    if "cpu" not in vaekern.available_backends(torch.device("cpu")):
        pytest.skip("the cpu backend is not built")
    ctx = mp.start_processes(_rank, args=(_free_port(), reduction, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn")
    # join returns True once every rank has exited, False while one still runs (it returns
    # as soon as any one exits), and raises if a rank failed.
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the DDP ranks did not finish within 120 s")
    x, eps = _data()
    whole = _grads(TinyVAE(), x, eps, reduction)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, want in whole.items():
        # Every rank holds the same averaged gradient after DDP's all-reduce.
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][name], want * factor, rtol=1e-5, atol=1e-6)
