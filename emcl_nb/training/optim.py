"""The optimiser and learning-rate schedule of the reference recipe (docs/reference-recipe.md):
parameter groups, BertAdam (or AdamW) and the warm-up + cosine schedule."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from emcl_nb.params import Params

# Parameters exempt from weight decay (docs/reference-differences.md #11): biases and norm gains
# (all 1-D tensors), embeddings and CLIP's logit scale.
NO_DECAY_NAME_PARTS = ("embedding", "class_embedding", "logit_scale")
# The reference's exemptions (decay_exempt=reference): names holding one of these. CLIP's
# norms are named ln_*, so its norm gains, embeddings and logit scale are decayed there.
REFERENCE_NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def param_groups(model: nn.Module, params: Params) -> list[dict]:
    """Four groups: CLIP / new modules x decay / no decay (params.decay_exempt says which
    parameters get none). CLIP gets lr * coef_lr.
    Frozen parameters (the patch embedding, see EMCLNet) are left out."""
    groups = {(is_clip, decay): [] for is_clip in (True, False) for decay in (True, False)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if params.decay_exempt == "reference":
            decay = not any(part in name for part in REFERENCE_NO_DECAY)
        else:
            decay = param.ndim >= 2 and not any(part in name for part in NO_DECAY_NAME_PARTS)
        groups[(name.startswith("clip."), decay)].append(param)
    return [
        {"params": members, "name": f"{'clip' if is_clip else 'new'}_{'decay' if decay else 'no_decay'}",
         "lr": params.lr * (params.coef_lr if is_clip else 1.0),
         "weight_decay": params.weight_decay if decay else 0.0}
        for (is_clip, decay), members in groups.items() if members
    ]


# A step count at which 0.9^step and 0.98^step are 0 in float32 (the fused kernel's bias
# corrections 1 - beta^step are then exactly 1).
NO_BIAS_CORRECTION_STEP = 2.0 ** 40


class BertAdam(torch.optim.Optimizer):
    """The reference's optimiser (BertAdam): Adam without bias correction.

    Per update and tensor: the gradient is clipped to norm `max_grad_norm` (after the global
    clip in the training loop), m = b1 m + (1-b1) g, v = b2 v + (1-b2) g², the update
    u = m / (sqrt(v) + eps) gets `weight_decay * p` added, and p -= lr * u. The group's
    "lr" is the scheduled rate (build_optimizer drives it with `warmup_cosine`).

    fp32 tensors go through torch's fused AdamW kernel (the same update, one pass). fp16
    tensors (clip_dtype=fp16) are updated op by op in fp16 with fp16 state, as the reference's
    BertAdam updates its fp16 CLIP: each intermediate rounded to fp16, so small second
    moments underflow and steps below half an fp16 step are lost, as there
    (`reference_update`).
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.98), eps: float = 1e-6,
                 weight_decay: float = 0.0, max_grad_norm: float = 1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      max_grad_norm=max_grad_norm))
        self._steps: dict[torch.device, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
            grads = [p.grad for p in params]
            if group["max_grad_norm"] > 0:   # the reference's per-tensor clip (eps 1e-6), in place as there
                norms = torch._foreach_add(torch._foreach_norm(grads), 1e-6)   # out of place: see reference_update
                scales = torch._foreach_div([torch.full_like(n, group["max_grad_norm"]) for n in norms], norms)
                torch._foreach_clamp_max_(scales, 1.0)
                # After the loop's global clip to the same norm no tensor is over it: on the
                # CPU (where reading a scale costs no device sync) the pass that scales by
                # exactly 1 is left out.
                clipped = [(g, s) for g, s in zip(grads, scales) if s.device.type != "cpu" or s < 1.0]
                if clipped:
                    torch._foreach_mul_(*map(list, zip(*clipped)))
            beta1, beta2 = group["betas"]
            # torch's fused AdamW kernel (one pass over p, g, m, v) is this update when its
            # bias corrections are 1: they are 1 - beta^step, and beta^NO_BIAS_CORRECTION_STEP
            # is 0 in float. Its decoupled decay p *= 1 - lr wd equals adding wd p to the update.
            # The kernel takes tensors of one device and dtype per call.
            tensors = [params, grads, [self.state[p]["exp_avg"] for p in params],
                       [self.state[p]["exp_avg_sq"] for p in params]]
            for (device, dtype), (same_kind, _) in self._group_tensors_by_device_and_dtype(tensors).items():
                if dtype == torch.float16:
                    reference_update(*same_kind, lr=group["lr"], beta1=beta1, beta2=beta2,
                                     eps=group["eps"], weight_decay=group["weight_decay"])
                    continue
                torch._fused_adamw_(
                    *same_kind, [], [self._no_bias_correction_step(device)] * len(same_kind[0]),
                    lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                    eps=group["eps"], amsgrad=False, maximize=False)
        return loss

    def __setstate__(self, state: dict) -> None:       # copy.deepcopy and unpickling keep only the state
        super().__setstate__(state)
        self._steps = {}

    def _no_bias_correction_step(self, device: torch.device) -> torch.Tensor:
        """The step count handed to the fused kernel: large enough that beta^step is 0."""
        if device not in self._steps:
            self._steps[device] = torch.tensor(NO_BIAS_CORRECTION_STEP, dtype=torch.float32, device=device)
        return self._steps[device]


def reference_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                     exp_avg_sqs: list[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float) -> None:
    """BertAdam's update (after its per-tensor clip) op by op, in the tensors' own dtype, in
    the reference's order: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g g; u = m / (sqrt(v) + eps);
    u += wd p (wd > 0); p -= lr u. In place on params and the moments. In fp16 every step
    rounds to fp16 as the reference's fp16 run does (the foreach ops round like the single
    tensor ops it calls; tested bit for bit against a transcription of the reference)."""
    # Out-of-place foreach ops with scalars: in place, the CPU's foreach path rounds the scalar
    # to fp16 first (0.9 -> 0.8999), which the reference's single-tensor ops do not.
    torch._foreach_copy_(exp_avgs, torch._foreach_add(torch._foreach_mul(exp_avgs, beta1), grads, alpha=1 - beta1))
    torch._foreach_copy_(exp_avg_sqs, torch._foreach_addcmul(torch._foreach_mul(exp_avg_sqs, beta2), grads, grads,
                                                              value=1 - beta2))
    updates = torch._foreach_div(exp_avgs, torch._foreach_add(torch._foreach_sqrt(exp_avg_sqs), eps))
    if weight_decay > 0:
        updates = torch._foreach_add(updates, torch._foreach_mul(params, weight_decay))
    torch._foreach_sub_(params, torch._foreach_mul(updates, lr))


def build_optimizer(model: nn.Module, params: Params, total_steps: int):
    """(optimizer, scheduler) of the run: `optimizer.step(); scheduler.step()` once per update.

    bertadam: the reference update (BertAdam above; its per-tensor clip is params.grad_clip,
    1.0 as in the reference). adamw: torch's AdamW (bias-corrected, decoupled decay).
    Both: betas (0.9, 0.98), eps 1e-6, the groups of `param_groups` and the reference
    schedule `warmup_cosine` over `total_steps` updates.
    """
    groups = param_groups(model, params)
    if params.optimizer == "bertadam":
        optimizer = BertAdam(groups, lr=params.lr, max_grad_norm=params.grad_clip)
    else:
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, params.warmup_proportion))
    return optimizer, scheduler


def warmup_cosine(total_steps: int, warmup_proportion: float) -> Callable[[int], float]:
    """The reference schedule: lr factor of update `step` (0 = the first update).

    With progress x = step / total_steps: x / warmup_proportion during warm-up, then
    0.5 (1 + cos(pi x)), the cosine of the whole run (not restarted after warm-up). The
    first update has lr 0.
    """
    def factor(step: int) -> float:
        x = step / total_steps
        if x < warmup_proportion:
            return x / warmup_proportion
        return 0.5 * (1.0 + math.cos(math.pi * x))
    return factor
