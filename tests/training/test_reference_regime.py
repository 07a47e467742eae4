"""The reference code's training regime, reproduced: its fp16 CLIP and fp16 BertAdam
(clip_dtype=fp16) and its 1/W multi-process gradients (ddp_gradients=reference), checked
against a transcription of the reference's update written here (the oracle), not against
our own code. The transcription follows the published code line by line in what it computes
(`BertAdam.step` of its optimization.py, the global clip and logit_scale clamp of its
training loop, its warmup_cosine schedule, its AllGather backward); it was checked once
by hand against that code."""
import math
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from emcl_nb.evaluation.run import load_for_evaluation
from emcl_nb.model.loss import EMCLLoss
from emcl_nb.params import ParamsError, load_params
from emcl_nb.training.build import build_model
from emcl_nb.training.checkpoint import read_checkpoint
from emcl_nb.training.engine import fit, train_step
from emcl_nb.training.optim import BertAdam, build_optimizer
from emcl_nb.training.runtime import autocast, autocast_dtype, grad_scaler, seed_everything
from tests.training.test_engine import RandomClips, tiny_params

# The CLIP tensors the reference's convert_weights casts to fp16 (every Linear and Conv weight
# and bias, the attention in-projections, proj and text_projection), by name.
REFERENCE_FP16 = re.compile(
    r"^(visual\.)?transformer\.resblocks\.\d+\.(attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|"
    r"out_proj\.bias)|mlp\.(c_fc|c_proj)\.(weight|bias))$|^visual\.conv1\.weight$|^text_projection$|^visual\.proj$")
REFERENCE_RATES = dict(lr=1e-4, coef_lr=1e-3)          # the reference's: CLIP at 1e-7
REFERENCE_REGIME = dict(clip_dtype="fp16", ddp_gradients="reference", decay_exempt="reference",
                        grad_clip=1.0, optimizer="bertadam", warmup_proportion=0.1, weight_decay=0.2)


def on_fp16_grid(tensor: torch.Tensor) -> bool:
    return torch.equal(tensor.float().half().float(), tensor.float())


# ---------------------------------------------------------------------------------------
# The oracle: a transcription of the reference's update
# ---------------------------------------------------------------------------------------

def reference_warmup_cosine(x: float, warmup: float) -> float:
    if x < warmup:
        return x / warmup
    return 0.5 * (1.0 + math.cos(math.pi * x))


class TranscribedBertAdam:
    """The reference's BertAdam (optimization.py) for one parameter group list: per tensor,
    clip_grad_norm_(p, max_grad_norm), next_m, next_v in the parameter's dtype, update =
    next_m / (sqrt(next_v) + e), + weight_decay * p, times the scheduled lr (warmup_cosine of
    the tensor's own step / t_total), subtracted from p."""

    def __init__(self, groups: list[dict], *, t_total: int, warmup: float, b1=0.9, b2=0.98, e=1e-6,
                 max_grad_norm=1.0):
        self.groups, self.t_total, self.warmup = groups, t_total, warmup
        self.b1, self.b2, self.e, self.max_grad_norm = b1, b2, e, max_grad_norm
        self.state = {}

    @torch.no_grad()
    def step(self) -> None:
        for group in self.groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state.setdefault(id(p), {"step": 0, "next_m": torch.zeros_like(p),
                                                      "next_v": torch.zeros_like(p)})
                if self.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(p, self.max_grad_norm)
                state["next_m"].mul_(self.b1).add_(grad, alpha=1 - self.b1)
                state["next_v"].mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
                update = state["next_m"] / (state["next_v"].sqrt() + self.e)
                if group["weight_decay"] > 0.0:
                    update += group["weight_decay"] * p
                lr = group["lr"] * reference_warmup_cosine(state["step"] / self.t_total, self.warmup)
                p.add_(-(lr * update))
                state["step"] += 1


def reference_groups(model, lr: float, coef_lr: float, weight_decay: float) -> list[dict]:
    """The reference's four groups (prep_optimizer): names holding 'bias', 'LayerNorm.bias' or
    'LayerNorm.weight' get no decay, names holding 'clip.' get lr * coef_lr."""
    no_decay = ("bias", "LayerNorm.bias", "LayerNorm.weight")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for decay in (True, False):
        for clip in (True, False):
            members = [p for n, p in named if any(nd in n for nd in no_decay) != decay and ("clip." in n) == clip]
            groups.append({"params": members, "weight_decay": weight_decay if decay else 0.0,
                           "lr": lr * (coef_lr if clip else 1.0)})
    return groups


def batch_of(params, n: int, seed: int = 0) -> dict:
    clips = RandomClips(n, params, seed=seed)
    return {key: torch.stack([clips[i][key] for i in range(n)])
            for key in ("text_ids", "text_mask", "video", "frame_mask")}


# ---------------------------------------------------------------------------------------
# Parameters and storage
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["msrvtt", "msvd", "lsmdc", "activity", "didemo"])
def test_the_dataset_files_default_to_the_reference_regime(dataset):
    params = load_params(dataset, use_env=False)
    assert (params.clip_dtype, params.ddp_gradients, params.decay_exempt) == ("fp16", "reference", "reference")
    assert params.reference_selection and params.temporal_ln_eps == 1e-12


def test_fp16_goes_only_with_the_update_it_reproduces(tmp_path):
    params = tiny_params(tmp_path)
    with pytest.raises(ParamsError, match="optimizer=bertadam"):
        params.replace(clip_dtype="fp16", optimizer="adamw")
    with pytest.raises(ParamsError, match="precision=auto"):
        params.replace(clip_dtype="fp16", precision="bf16")


def test_fp16_stores_exactly_the_tensors_the_reference_converts(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_params(tmp_path, clip_dtype="fp16"))
    fp16 = {name for name, tensor in model.clip.state_dict().items() if tensor.dtype == torch.float16}
    expected = {name for name in model.clip.state_dict() if REFERENCE_FP16.match(name)}
    assert fp16 == expected and "token_embedding.weight" not in fp16 and "ln_final.weight" not in fp16
    assert all(t.dtype == torch.float32 for n, t in model.state_dict().items() if not n.startswith("clip."))
    assert autocast_dtype(torch.device("cpu"), "auto", model.clip.dtype) == torch.float16


def test_an_fp16_clip_stays_on_the_fp16_grid_and_an_fp32_one_leaves_it(tmp_path):
    """After training (and a resume), every value of the converted tensors in the fp16 run's
    checkpoint is an fp16 number; in the fp32 run (same rates) some are not. Evaluated on a
    CPU, the fp16 run's CLIP computes in fp32 from exactly those values."""
    def killed_after_epoch_1(record):
        raise KeyboardInterrupt

    kept = {}
    for dtype in ("fp16", "fp32"):
        params = tiny_params(tmp_path / dtype, epochs=2, clip_dtype=dtype, lr=1e-3, coef_lr=1.0)
        with pytest.raises(KeyboardInterrupt):
            fit(params, RandomClips(24, params), on_epoch_end=killed_after_epoch_1)
        result = fit(params, RandomClips(24, params))                             # resumes epoch 2
        state = read_checkpoint(result.last_checkpoint)["model"]
        assert read_checkpoint(result.last_checkpoint)["epoch"] == 2
        kept[dtype] = {name: on_fp16_grid(t) for name, t in state.items()
                       if name.startswith("clip.") and REFERENCE_FP16.match(name.removeprefix("clip."))}
        assert kept[dtype]
    assert all(kept["fp16"].values())
    assert not all(kept["fp32"].values())
    fp16_run = tiny_params(tmp_path / "fp16", epochs=2, clip_dtype="fp16", lr=1e-3, coef_lr=1.0)
    last = fp16_run.out_dir / "checkpoints" / "last.pt"
    model, run_params, _ = load_for_evaluation(last, fp16_run, torch.device("cpu"))
    assert model.clip.dtype == torch.float32 and run_params.clip_dtype == "fp32"
    for name, value in read_checkpoint(last)["model"].items():
        assert torch.equal(model.state_dict()[name], value.float()), name


# ---------------------------------------------------------------------------------------
# The fp16 update
# ---------------------------------------------------------------------------------------

def test_fp16_bertadam_is_bit_identical_to_the_transcription_over_20_steps():
    """fp16 tensors of very different gradient scales (tiny ones underflow in fp16: v ~ g^2),
    weight decay and a warm-up + cosine rate: after 20 steps on the same gradients our
    weights equal the transcription's bit for bit."""
    generator = torch.Generator().manual_seed(0)
    shapes, scales = [(64, 48), (48,), (32, 16), (200,)], [1e-5, 8e-5, 1e-3, 1e-2]
    start = [(torch.randn(s, generator=generator) * 0.02).half() for s in shapes]
    grads = [[(torch.randn(s, generator=generator) * scale).half() for s, scale in zip(shapes, scales)]
             for _ in range(20)]
    total, warmup, lr = 20, 0.1, 1e-4
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    optimizer = BertAdam([{"params": ours[:2], "weight_decay": 0.2, "lr": lr},
                          {"params": ours[2:], "weight_decay": 0.0, "lr": lr}], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: reference_warmup_cosine(s / total, warmup))
    oracle = TranscribedBertAdam([{"params": theirs[:2], "weight_decay": 0.2, "lr": lr},
                                  {"params": theirs[2:], "weight_decay": 0.0, "lr": lr}], t_total=total, warmup=warmup)
    for step in range(total):
        for mine, reference, grad in zip(ours, theirs, grads[step]):
            mine.grad, reference.grad = grad.clone(), grad.clone()
        optimizer.step()
        scheduler.step()
        oracle.step()
    for mine, reference in zip(ours, theirs):
        assert mine.dtype == torch.float16 and torch.equal(mine, reference)
    assert all(state["exp_avg"].dtype == torch.float16 for state in optimizer.state.values())
    assert all(not torch.equal(mine, first) for mine, first in zip(ours, start))


def test_the_fp16_update_is_not_the_fp32_update_rounded():
    """The phenomenon the regime reproduces (the issue's table): at the reference's CLIP rate
    (1e-7) and gradients of std 8e-5, fp16 moves some elements far more than fp32 and most
    not at all."""
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(256, 192, generator=generator) * 0.02
    changes = {}
    for dtype in (torch.float16, torch.float32):
        p = start.to(dtype).clone().requires_grad_()
        optimizer = BertAdam([{"params": [p], "weight_decay": 0.0, "lr": 1e-7}], lr=1e-7)
        g = torch.Generator().manual_seed(2)
        for _ in range(100):
            p.grad = (torch.randn(p.shape, generator=g) * 8e-5).to(dtype)
            optimizer.step()
        changes[dtype] = (p.detach().float() - start.to(dtype).float()).abs()
    assert float((changes[torch.float16] > 0).float().mean()) < 0.9        # many stay put
    assert float((changes[torch.float32] > 0).float().mean()) > 0.99       # fp32 moves them all
    assert float(changes[torch.float16].mean()) > 5 * float(changes[torch.float32].mean())


# ---------------------------------------------------------------------------------------
# Training side by side with the transcription, one process
# ---------------------------------------------------------------------------------------

def test_one_process_trains_as_the_reference_update_does(tmp_path):
    """20 steps of train_step in the reference regime beside a loop that uses the transcribed
    update (same model start, same batches, same forward): the same tensors move and the same
    stay put, the moved share of each tensor agrees, and the losses agree within fp16
    tolerance."""
    params = tiny_params(tmp_path, batch_size=8, **REFERENCE_RATES, **REFERENCE_REGIME)
    steps, device = 20, torch.device("cpu")
    torch.manual_seed(0)
    ours = build_model(params).train()
    theirs = build_model(params).train()
    theirs.load_state_dict(ours.state_dict())
    start = {name: p.detach().clone() for name, p in ours.named_parameters()}
    optimizer, scheduler = build_optimizer(ours, params, steps)
    oracle = TranscribedBertAdam(reference_groups(theirs, params.lr, params.coef_lr, params.weight_decay),
                                 t_total=steps, warmup=params.warmup_proportion)
    dtype = autocast_dtype(device, params.precision, ours.clip.dtype)
    scaler = grad_scaler(device, dtype, params.clip_dtype)
    losses = {"ours": [], "theirs": []}
    for step in range(steps):
        batch = batch_of(params, 8, seed=step % 3)
        loss = train_step(ours, batch, optimizer, scheduler, scaler, dtype=dtype, grad_clip=params.grad_clip,
                          loss_fn=EMCLLoss("reference"))
        losses["ours"].append(float(loss.detach()))
        with autocast(device, dtype):
            loss = EMCLLoss()(theirs, *theirs(batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        oracle.step()
        theirs.zero_grad()
        with torch.no_grad():
            theirs.clip.logit_scale.clamp_(max=math.log(100))
        losses["theirs"].append(float(loss.detach()))
    assert losses["ours"] == pytest.approx(losses["theirs"], rel=2e-3, abs=2e-3)
    assert losses["ours"][0] != pytest.approx(losses["ours"][-1], abs=1e-3)       # it trained
    ours_now, theirs_now = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for name, first in start.items():
        moved_ours, moved_theirs = (ours_now[name] != first), (theirs_now[name] != first)
        assert bool(moved_ours.any()) == bool(moved_theirs.any()), name
        assert ours_now[name].dtype == theirs_now[name].dtype
        if first.dtype == torch.float16:
            share = float(moved_theirs.float().mean())
            assert float(moved_ours.float().mean()) == pytest.approx(share, abs=0.02), name
    fp16_shares = [float((ours_now[n] != first).float().mean()) for n, first in start.items()
                   if first.dtype == torch.float16 and n != "clip.visual.conv1.weight"]
    assert min(fp16_shares) < 0.5 and max(fp16_shares) > 0      # at CLIP's rate many fp16 elements stay put
    assert torch.equal(ours_now["clip.visual.conv1.weight"], start["clip.visual.conv1.weight"])   # frozen


# ---------------------------------------------------------------------------------------
# Two processes: the 1/W regime
# ---------------------------------------------------------------------------------------

GLOBAL_BATCH, UPDATES = 8, 3


def _regime_worker(rank, world, init_file, params, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    seed_everything(params.seed)
    model = build_model(params).train()
    optimizer, scheduler = build_optimizer(model, params, 100)
    ddp = DistributedDataParallel(model)
    share = GLOBAL_BATCH // world
    seen = []                               # what the optimiser is handed at update 0 (after the global clip)
    optimizer.register_step_pre_hook(lambda *_: seen.append(
        {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}))
    for update in range(UPDATES):
        batch = {k: v[rank * share:(rank + 1) * share] for k, v in batch_of(params, GLOBAL_BATCH, seed=update).items()}
        train_step(ddp, batch, optimizer, scheduler, grad_scaler(torch.device("cpu"), None, params.clip_dtype),
                   dtype=None, grad_clip=params.grad_clip, loss_fn=EMCLLoss(params.ddp_gradients))
    if rank == 0:
        torch.save({"grads": seen[0], "weights": {n: p.detach().clone() for n, p in model.named_parameters()}},
                   out_file)
    dist.destroy_process_group()


def _single_process_update(params, *, scale: dict, grad_clip: float, eps: float) -> tuple[dict, dict]:
    """One process on the global batch: its gradients (times `scale[name]`, default 1), then
    UPDATES steps of the transcribed reference update (global clip at `grad_clip`, per-tensor
    clip at `grad_clip`, eps `eps`). Returns (the first update's gradients, scaled and globally
    clipped, and the final weights)."""
    seed_everything(params.seed)
    model = build_model(params).train()
    oracle = TranscribedBertAdam(reference_groups(model, params.lr, params.coef_lr, params.weight_decay),
                                 t_total=100, warmup=params.warmup_proportion, e=eps, max_grad_norm=grad_clip)
    first = None
    for update in range(UPDATES):
        loss = EMCLLoss()(model, *model(batch_of(params, GLOBAL_BATCH, seed=update)))
        loss.backward()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.grad is not None:
                    p.grad.mul_(scale.get(name, 1.0))
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if first is None:
            first = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        oracle.step()
        model.zero_grad()
        with torch.no_grad():
            model.clip.logit_scale.clamp_(max=math.log(100))
    return first, {n: p.detach().clone() for n, p in model.named_parameters()}


def _update_disagreement(weights: dict, expected: dict, start: dict) -> float:
    """The share of elements whose change from `start` differs from the expected change by
    more than 1 % of it (over the elements the expected update moves)."""
    differ = moved = 0
    for name, end in expected.items():
        step = end - start[name]
        mask = step != 0
        differ += int(((weights[name] - start[name] - step).abs() > 0.01 * step.abs())[mask].sum())
        moved += int(mask.sum())
    return differ / moved


def test_two_processes_get_the_reference_one_over_w_gradients(tmp_path):
    """W = 2 (gloo): with ddp_gradients=reference each process's parameters get 1/W of the
    single-process gradient of the global batch, logit_scale its whole gradient (it is used
    after the gather), and the updates of 3 steps are the transcribed update's on those
    gradients (clip 1, eps 1e-6). Emulating the regime otherwise is told apart: halving
    logit_scale's gradient too, or the true gradient clipped at W with eps unscaled (eps treated
    like the other constants instead of becoming W x 1e-6)."""
    params = tiny_params(tmp_path, lr=1e-4, coef_lr=1.0,       # one rate: every update well above an ulp
                         **{**REFERENCE_REGIME, "clip_dtype": "fp32", "warmup_proportion": 0.0})
    mp.spawn(_regime_worker, args=(2, str(tmp_path / "rdzv"), params, str(tmp_path / "w2.pt")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "w2.pt")
    torch.set_num_threads(1)
    seed_everything(params.seed)
    start = {n: p.detach().clone() for n, p in build_model(params).named_parameters()}
    half = {name: 0.5 for name in start if name != "clip.logit_scale"}
    expected_grads, expected = _single_process_update(params, scale=half, grad_clip=1.0, eps=1e-6)

    def gradient_errors(grads: dict) -> dict:
        return {name: float((ddp["grads"][name] - grad).norm() / grad.norm().clamp_min(1e-12))
                for name, grad in grads.items()}

    assert ddp["grads"].keys() == expected_grads.keys()
    errors = gradient_errors(expected_grads)
    assert max(errors.values()) <= 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    ours = _update_disagreement(ddp["weights"], expected, start)
    assert ours < 0.001, ours
    # logit_scale halved like the others: its gradient is told apart (Adam's update hides a scale)
    all_halved, _ = _single_process_update(params, scale={n: 0.5 for n in start}, grad_clip=1.0, eps=1e-6)
    assert gradient_errors(all_halved)["clip.logit_scale"] > 0.4
    # the true gradient clipped at W: the same updates only with eps W x 1e-6, not with 1e-6
    _, eps_unscaled = _single_process_update(params, scale={}, grad_clip=2.0, eps=1e-6)
    _, eps_scaled = _single_process_update(params, scale={}, grad_clip=2.0, eps=2e-6)
    assert _update_disagreement(eps_unscaled, expected, start) > 10 * max(ours, 0.001)
    assert _update_disagreement(eps_scaled, expected, start) < 0.001
