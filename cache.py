"""Static KV caches. Each is a module per layer, called by the attention as

    cache(q, k, v, g, input_pos) -> (B, Hq, T, D)

q: (B, Hq, T, D); k, v: (B, Hkv, T, D) with k after RoPE; g: (B, Hkv, T) admission scores or None;
input_pos: (T,) positions. A call with T > 1 is a prefill of an empty cache (positions 0..T-1);
a call with T == 1 is one decode step. Buffers are allocated once, lengths live on the device.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class DenseCache(nn.Module):
    """The baseline: every token's K/V is kept, gpt-fast style."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)  # (B, Hkv, S, D)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)  # (B, Hkv, S, D)
        self.register_buffer("positions", torch.arange(max_seq_len, device=device), persistent=False)       # (S,)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, input_pos: Tensor) -> Tensor:
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        if q.shape[2] > 1:   # prefill: the new tokens are all there is
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        visible = self.positions[None, :] <= input_pos[:, None]                                     # (1, S)
        return F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=visible, enable_gqa=True)

    def bytes_allocated(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()
