"""Optimizers and learning-rate schedule of the Lynx recipe (LLM Foundry's DecoupledLionW, Composer's cosine).

Both work on FSDP2's sharded DTensor parameters: every operation is elementwise, so each rank updates its shard.
"""

from __future__ import annotations

import math

import torch


class DecoupledLionW(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) with weight decay decoupled from the learning rate, as LLM Foundry defines it.

    Per step, with g the gradient and m the momentum:
        p <- p * (1 - wd * lr / initial_lr)       (decay follows the schedule, not the lr's magnitude)
        p <- p - lr * sign(beta1 * m + (1 - beta1) * g)
        m <- beta2 * m + (1 - beta2) * g
    `initial_lr` is each group's lr when the optimizer is built (the peak lr, before any schedule).
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"DecoupledLionW: lr must be > 0, got {lr}")
        if not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"DecoupledLionW: betas must lie in [0, 1], got {betas}")
        if weight_decay < 0:
            raise ValueError(f"DecoupledLionW: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, initial_lr = group["lr"], group["weight_decay"], group["initial_lr"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                if wd != 0:
                    p.mul_(1 - wd * (lr / initial_lr if initial_lr else 1.0))
                update = exp_avg.lerp(p.grad, 1 - beta1).sign_()
                p.add_(update, alpha=-lr)
                exp_avg.lerp_(p.grad, 1 - beta2)
        return loss


def build_optimizer(params, name: str, *, lr: float, betas, weight_decay: float, eps: float = 1e-8):
    """'lionw' (the Lynx recipe) or 'adamw' (torch's, decoupled weight decay scaled by lr as usual).

    AdamW runs torch's fused kernel (torchtitan's and the transformers Trainer's default): one pass over all tensors
    per step instead of torch's per-tensor Python loop, which on CPU costs a tenth of a small model's step
    (benchmarks/bench_train_step.py)."""
    if name == "lionw":
        return DecoupledLionW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps, fused=True)
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
        return opt
    raise ValueError(f"optim.name: unknown optimizer {name!r} (choose 'lionw' or 'adamw')")


def cosine_with_warmup(step: int, *, warmup_steps: int, total_steps: int, alpha_f: float) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based), as Composer's CosineAnnealingWithWarmup.

    Linear from 0 to 1 over `warmup_steps`, then a half cosine from 1 down to `alpha_f` at `total_steps`
    (held at alpha_f afterwards). As in Composer and transformers, step 0 runs at multiplier 0.
    """
    if step < warmup_steps:
        return step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    tau = min(1.0, (step - warmup_steps) / decay_steps)
    return alpha_f + (1 - alpha_f) * 0.5 * (1 + math.cos(math.pi * tau))


def set_lr(optimizer, step: int, *, warmup_steps: int, total_steps: int, alpha_f: float) -> float:
    """Set every group's lr for optimizer step `step` from its peak `initial_lr`; return the first group's lr.

    The schedule is a pure function of the step, so a checkpoint's step is all the scheduler state there is."""
    scale = cosine_with_warmup(step, warmup_steps=warmup_steps, total_steps=total_steps, alpha_f=alpha_f)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * scale
    return optimizer.param_groups[0]["lr"]
