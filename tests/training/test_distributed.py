"""2 CPU processes (gloo) give the loss and gradients of 1 process on the same global batch."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from emcl_nb.model.loss import EMCLLoss, gather_features
from emcl_nb.training.build import build_model
from emcl_nb.training.engine import unwrap
from emcl_nb.training.runtime import seed_everything
from tests.training.test_engine import RandomClips, tiny_params

GLOBAL_BATCH = 8


def _global_batch(params):
    data = RandomClips(GLOBAL_BATCH, params, seed=3)
    return {key: torch.stack([data[i][key] for i in range(GLOBAL_BATCH)]) for key in data[0]}


def _loss_and_grads(model, batch):
    model.train()
    loss = EMCLLoss()(unwrap(model), *model(batch))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _worker(rank, world, init_file, params, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    seed_everything(params.seed)
    model = DistributedDataParallel(build_model(params))
    share = GLOBAL_BATCH // world
    batch = {k: v[rank * share:(rank + 1) * share] for k, v in _global_batch(params).items()}
    loss, grads = _loss_and_grads(model, batch)
    grads = {name.removeprefix("module."): g for name, g in grads.items()}
    if rank == 0:
        torch.save({"loss": loss, "grads": grads}, out_file)
    dist.destroy_process_group()


def _relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_two_processes_match_one_process(tmp_path):
    params = tiny_params(tmp_path)
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), params, str(tmp_path / "ddp.pt")),
             nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt")

    torch.set_num_threads(1)
    seed_everything(params.seed)
    loss, grads = _loss_and_grads(build_model(params), _global_batch(params))

    assert abs(ddp["loss"].item() - loss.item()) <= 1e-5 * abs(loss.item())
    assert ddp["grads"].keys() == grads.keys()
    errors = {name: _relative_error(ddp["grads"][name], g) for name, g in grads.items()}
    assert max(errors.values()) <= 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def _gather_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered, = gather_features(x)                                      # [4, 3]
    weights = torch.arange(12.0).reshape(4, 3)
    (gathered * weights).sum().backward()
    torch.save({"gathered": gathered.detach(), "grad": x.grad}, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_gather_orders_by_global_rank_and_sums_gradients(tmp_path):
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path / "g")), nprocs=2, join=True)
    weights = torch.arange(12.0).reshape(4, 3)
    for rank in range(2):
        out = torch.load(f"{tmp_path / 'g'}.{rank}")
        assert torch.equal(out["gathered"][:2], torch.ones(2, 3))
        assert torch.equal(out["gathered"][2:], torch.full((2, 3), 2.0))
        # each rank computed the same loss, so the summed gradient is 2x its slice
        assert torch.equal(out["grad"], 2 * weights[2 * rank:2 * rank + 2])
