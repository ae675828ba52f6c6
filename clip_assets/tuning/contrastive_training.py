"""The optimiser, schedule and temperature clamp of a CLIP contrastive training loop.

Used by fine-tuning (clip_assets.tuning.fine_tuning) and the demo's from-scratch training
(clip_assets.demo.train): AdamW with weight decay on matrices only (fused: on a CPU its step is
several times faster), a linear warm-up then a cosine decay, and the learned logit scale kept
within [0, log 100] as CLIP does.
"""

from __future__ import annotations

import math

import torch

MAX_LOGIT_SCALE = math.log(100)


def adamw(model: torch.nn.Module, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no decay on biases, norms, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and "embedding" not in name else no_decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr,
        fused=True,
    )


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_share: float = 0.05):
    """Linear warm-up over `warmup_share` of the steps, then a cosine decay to zero; step it once per batch."""
    warmup = max(1, int(total_steps * warmup_share))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module) -> None:
    """Keep the temperature where CLIP keeps it (a scale of at most 100) after each step."""
    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def contrastive_step(model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor, loss_fn,
                     optimizer: torch.optim.Optimizer, schedule) -> float:
    """One optimiser step on a batch of (image, caption) pairs; returns the batch's contrastive loss."""
    image_features, text_features, logit_scale = model(pixels, tokens)[:3]
    loss = loss_fn(image_features, text_features, logit_scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    clamp_logit_scale(model)
    return loss.item()
