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

import kernels

# One compiled decode step for every cache size (--max-seq-len): the size dims of the caches' buffers are
# marked dynamic below, which torch.compile honours for module buffers only with this flag off (it treats
# buffers as parameters, whose shapes it otherwise fixes). Parameters keep their static shapes: nothing
# marks them dynamic and they never change size.
torch._dynamo.config.force_parameter_static_shapes = False


def dynamic_sizes(*dims: tuple[Tensor, int]) -> None:
    """Mark the (buffer, dim) pairs dynamic for torch.compile; a size of 0 or 1 may still be specialised."""
    for tensor, dim in dims:
        torch._dynamo.maybe_mark_dynamic(tensor, dim)


class DenseCache(nn.Module):
    """The baseline: every token's K/V is kept, gpt-fast style."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)  # (B, Hkv, S, D)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)  # (B, Hkv, S, D)
        self.register_buffer("positions", torch.arange(max_seq_len, device=device), persistent=False)       # (S,)
        self.scale = head_dim ** -0.5
        dynamic_sizes((self.k_cache, 2), (self.v_cache, 2), (self.positions, 0))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, input_pos: Tensor) -> Tensor:
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        if q.shape[2] > 1:   # prefill: the new tokens are all there is
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if q.device.type == "cpu":
            # The write-gated store's partial attention over the filled slots 0..p: on a CPU it reads only
            # those, and compiled it is plain tensor code for Inductor, where the fused SDPA kernel took
            # about a third of a compiled SmolLM2 step at 1k tokens (one query, a mask over every slot).
            o, _ = kernels.partial_attention_ref(q[:, :, 0], self.k_cache, self.v_cache, input_pos[0] + 1, self.scale)
            return o[:, :, None].to(q.dtype)                                                          # (B, Hq, 1, D)
        visible = self.positions[None, :] <= input_pos[:, None]                                     # (1, S)
        return F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=visible, enable_gqa=True)

    def bytes_allocated(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    def bytes_per_token(self) -> int:
        """K and V of one token of one (batch, KV head), as WriteGatedCache.bytes_per_token."""
        return 2 * self.k_cache.shape[-1] * self.k_cache.element_size()


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The kernels.BACKENDS name to use: 'auto' is Triton on CUDA when it is there, else the PyTorch reference."""
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" and "triton" in kernels.BACKENDS else "torch"
    if backend == "triton" and backend not in kernels.BACKENDS:
        raise ValueError("attention backend 'triton': the Triton kernels are not available here "
                         f"(available: {', '.join(kernels.BACKENDS)})")
    if backend not in kernels.BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (available: auto, {', '.join(kernels.BACKENDS)})")
    return backend


class WriteGatedCache(nn.Module):
    """Write-Gated KV: a ring of the last W tokens and a global store of the admitted older ones.

    A token sits in ring slot pos % W for W steps (an empty slot has g = -1). When it leaves the ring it
    enters its (batch, KV head)'s global store if g > tau, else it is dropped; a prefill does this at
    once for the prompt tokens older than the last W. So a query sees exactly the keys of the SPEC
    visibility rule: the ring (i - j < W) and the store (g_j > tau). The store holds C tokens per
    (batch, KV head), its lengths are device tensors. When it is full, an admitted token replaces the
    lowest-g entry if its g is higher: the simplest eviction rule, counted in `n_capacity_drops`.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, window: int, threshold: float,
                 capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu", backend: str = "torch"):
        super().__init__()
        self.window, self.threshold = window, threshold
        self.backend = resolve_backend(backend, device)
        self.ops = kernels.BACKENDS[self.backend]
        self.scale = head_dim ** -0.5
        B, H, W, C, D = batch_size, n_kv_heads, window, capacity, head_dim

        def buffer(name, shape, dtype, fill=0.0):
            self.register_buffer(name, torch.full(shape, fill, dtype=dtype, device=device), persistent=False)

        buffer("ring_k", (B, H, W, D), dtype)
        buffer("ring_v", (B, H, W, D), dtype)
        buffer("ring_g", (B, H, W), torch.float32, -1.0)
        buffer("global_k", (B, H, C, D), dtype)
        buffer("global_v", (B, H, C, D), dtype)
        buffer("global_g", (B, H, C), torch.float32)
        buffer("global_len", (B, H), torch.int64)
        # Statistics, read once at the end: tokens that left the ring, how many of them had g > tau,
        # and how many of those the capacity rule threw away (rejected, or evicted for a higher g).
        buffer("n_left", (B, H), torch.int64)
        buffer("n_admitted", (B, H), torch.int64)
        buffer("n_capacity_drops", (B, H), torch.int64)
        dynamic_sizes((self.global_k, 2), (self.global_v, 2), (self.global_g, 2))

    @property
    def capacity(self) -> int:
        """C, read off the store so that compiled code sees it as the buffer's (dynamic) size, not a constant."""
        return self.global_g.shape[-1]

    def reset(self) -> None:
        """Empty the cache for the next prompt (a prefill does this itself)."""
        self.ring_g.fill_(-1.0)
        for name in ("global_len", "n_left", "n_admitted", "n_capacity_drops"):
            getattr(self, name).zero_()

    def forward(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, input_pos: Tensor) -> Tensor:
        if q.shape[2] > 1:
            return self.prefill(q, k, v, g, input_pos)
        return self.decode(q, k, v, g, input_pos)

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, input_pos: Tensor) -> Tensor:
        """Positions 0..T-1 into an empty cache: compact the admitted old tokens, ring the last W."""
        T, W = q.shape[2], self.window
        self.reset()
        idx, count = self.ops.compact_admitted(g, self.threshold, W)                           # (B, Hkv, T), (B, Hkv)
        self.ops.store_admitted(self.global_k, self.global_v, self.global_g, self.global_len, k, v, g, idx, count)
        recent = slice(max(T - W, 0), T)
        slots = input_pos[recent] % W                                                           # (min(T, W),)
        self.ring_k.index_copy_(2, slots, k[:, :, recent])
        self.ring_v.index_copy_(2, slots, v[:, :, recent])
        self.ring_g.index_copy_(2, slots, g[:, :, recent].float())
        self.n_left.fill_(max(T - W, 0))
        self.n_admitted.copy_(count)
        self.n_capacity_drops.copy_((count - self.capacity).clamp(min=0))
        return self.ops.gated_prefill_attention(q, k, v, idx, count, W, self.scale)

    def decode(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, input_pos: Tensor) -> Tensor:
        """One token at position p: promote the token leaving slot p % W, write the new one there, attend."""
        slot = input_pos % self.window                                                          # (1,)
        k_out = self.ring_k.index_select(2, slot).squeeze(2)                                   # (B, Hkv, D)
        v_out = self.ring_v.index_select(2, slot).squeeze(2)                                   # (B, Hkv, D)
        g_out = self.ring_g.index_select(2, slot).squeeze(2)                                   # (B, Hkv)
        admitted = g_out > self.threshold                                                      # (B, Hkv)
        self.n_left.add_((g_out >= 0).long())
        self.n_admitted.add_(admitted.long())
        self.n_capacity_drops.add_((admitted & (self.global_len >= self.capacity)).long())
        self.ops.promote(self.global_k, self.global_v, self.global_g, self.global_len, k_out, v_out, g_out, self.threshold)
        # Indexing (index_put_), which Inductor writes in place after the reads of the old slot above.
        self.ring_k[:, :, slot] = k
        self.ring_v[:, :, slot] = v
        self.ring_g[:, :, slot] = g.float()
        ring_len = (input_pos[0] + 1).clamp(max=self.window)                                   # ()
        y = self.ops.decode_attention(q[:, :, 0], self.ring_k, self.ring_v, ring_len,
                                      self.global_k, self.global_v, self.global_len, self.scale)  # (B, Hq, D)
        return y[:, :, None]

    def counts(self) -> dict[str, Tensor]:
        """Per (batch, KV head) token counts, as device tensors (B, Hkv): read them after generation."""
        in_ring = (self.ring_g >= 0).sum(-1)
        return {
            "seen": self.n_left + in_ring,
            "held": self.global_len + in_ring,
            "admitted": self.n_admitted + (self.ring_g > self.threshold).sum(-1),
            "capacity_drops": self.n_capacity_drops,
        }

    def bytes_allocated(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def bytes_per_token(self) -> int:
        """K and V of one token of one (batch, KV head)."""
        return 2 * self.ring_k.shape[-1] * self.ring_k.element_size()
