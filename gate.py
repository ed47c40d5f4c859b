"""The write gate: per layer, per KV head, one admission score g in [1e-3, 1] for each new token.

    x = concat(RMSNorm_pre(k_pre), RMSNorm_post(k_post))       # (2D,), float32
    g = max(sigmoid(w2_h . gelu(W1_h x + b1_h) + b2_h), 1e-3)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import RMSNorm

GATE_NORM_EPS = 1e-6
MIN_GATE = 1e-3


class WriteGate(nn.Module):
    """One layer's gates: an independent two-layer MLP per KV head over the normed pre/post-RoPE key."""

    def __init__(self, n_kv_heads: int, head_dim: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or 4 * head_dim
        self.n_kv_heads, self.head_dim, self.hidden = n_kv_heads, head_dim, hidden
        self.pre_key_norm = RMSNorm(head_dim, GATE_NORM_EPS)
        self.post_key_norm = RMSNorm(head_dim, GATE_NORM_EPS)
        # Initialised as PyTorch's Conv1d would be (uniform +-1/sqrt(fan_in)), like the authors' gates.
        bound1, bound2 = (2 * head_dim) ** -0.5, hidden ** -0.5
        self.w1 = nn.Parameter(torch.empty(n_kv_heads, hidden, 2 * head_dim).uniform_(-bound1, bound1))  # (Hkv, hidden, 2D)
        self.b1 = nn.Parameter(torch.empty(n_kv_heads, hidden).uniform_(-bound1, bound1))                # (Hkv, hidden)
        self.w2 = nn.Parameter(torch.empty(n_kv_heads, hidden).uniform_(-bound2, bound2))                # (Hkv, hidden)
        self.b2 = nn.Parameter(torch.empty(n_kv_heads).uniform_(-bound2, bound2))                        # (Hkv,)

    def forward(self, k_pre: Tensor, k_post: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """k_pre, k_post: (B, Hkv, T, D) -> g: (B, Hkv, T) float32."""
        x = torch.cat((self.pre_key_norm(k_pre.float()), self.post_key_norm(k_post.float())), dim=-1)   # (B, Hkv, T, 2D)
        h = F.gelu(torch.einsum("bhtd,hkd->bhtk", x, self.w1) + self.b1[:, None, :])                      # (B, Hkv, T, hidden)
        logit = torch.einsum("bhtk,hk->bht", h, self.w2) + self.b2[:, None]                               # (B, Hkv, T)
        return torch.sigmoid(logit).clamp_min(MIN_GATE)
