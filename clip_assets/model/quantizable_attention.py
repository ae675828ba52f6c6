"""Self-attention whose projections are plain Linear layers, so int8 dynamic quantisation reaches them.

`torch.nn.MultiheadAttention` keeps its input projection as a bare weight (`in_proj_weight`) and its
output projection as a layer dynamic quantisation skips, so quantising an open_clip ViT's Linear
layers leaves a third of each block's matrix work (the query/key/value and output projections) in
float32. `SelfAttention` computes the same thing from two Linear layers holding the same weights,
with `scaled_dot_product_attention` between them; `swap_self_attention` puts one in place of each
self-attention module of open_clip's own transformer blocks (`ResidualAttentionBlock`), and nowhere
else: cross-attention (attentional pooling) and timm towers keep theirs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SelfAttention(nn.Module):
    """`nn.MultiheadAttention(q, q, q, need_weights=False)` from two Linear layers (same weights)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        d = mha.embed_dim
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.in_proj = nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None)
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None):
        if key is not query or value is not query or need_weights or key_padding_mask is not None:
            raise ValueError("SelfAttention computes self-attention only, without weights or a padding mask")
        x = query if self.batch_first else query.transpose(0, 1)  # (N, L, D)
        n, length, d = x.shape
        heads = self.num_heads
        q, k, v = self.in_proj(x).reshape(n, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # MultiheadAttention: True is masked out; SDPA: True attends
                masked = attn_mask
                attn_mask = torch.zeros(masked.shape, dtype=q.dtype, device=q.device).masked_fill(masked, float("-inf"))
            attn_mask = attn_mask.to(q.dtype)
            if attn_mask.dim() == 3:  # (N x heads, L, L)
                attn_mask = attn_mask.reshape(n, heads, length, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, H, L, D/H)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


def swap_self_attention(tower: nn.Module) -> set[str]:
    """Replace, in place, each self-attention module of open_clip's ResidualAttentionBlocks in `tower`
    by a SelfAttention; returns the names of the Linear layers that now hold its projections."""
    from open_clip.transformer import ResidualAttentionBlock  # deferred: open_clip loads only to build a model

    linear = set()
    for name, block in tower.named_modules():
        attn = getattr(block, "attn", None)
        if (type(block) is ResidualAttentionBlock and type(attn) is nn.MultiheadAttention
                and attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn
                and not hasattr(block, "ln_1_kv")):
            block.attn = SelfAttention(block.attn)
            linear |= {f"{name}.attn.in_proj", f"{name}.attn.out_proj"}
    return linear
