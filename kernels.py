"""Attention over the write-gated cache: the plain-PyTorch reference of every kernel.

The references are the CPU path and the oracle of the Triton kernels. All attention math runs in
float32; partial results carry their log-sum-exp (lse) so two key sets merge exactly.

Visibility (SPEC.md): query i sees key j iff j <= i and (i - j < W or g_j > tau).
"""
from typing import Callable, NamedTuple

import torch
from torch import Tensor


def partial_attention_ref(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Decode attention over the first `lengths` keys of each (batch, KV head).

    q: (B, Hq, D); k, v: (B, Hkv, S, D); lengths: (B, Hkv) or () integer tensor.
    Returns o: (B, Hq, D) float32 and lse: (B, Hq) float32; an empty key set gives o = 0, lse = -inf.
    """
    B, Hq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qg = q.float().view(B, Hkv, Hq // Hkv, D)                                               # (B, Hkv, G, D)
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, k.float()) * scale                          # (B, Hkv, G, S)
    valid = torch.arange(S, device=q.device) < lengths.expand(B, Hkv)[..., None]             # (B, Hkv, S)
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                                    # (B, Hkv, G)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)                               # (B, Hkv, G, S)
    o = torch.einsum("bhgs,bhsd->bhgd", probs, v.float())                                    # (B, Hkv, G, D)
    return o.reshape(B, Hq, D), lse.reshape(B, Hq)


def merge_attention(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the union of two disjoint key sets from their partial results.

    o: (..., D) float32, lse: (...) float32; either side may be empty (lse = -inf).
    """
    lse = torch.logaddexp(lse1, lse2)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w1 = torch.where(finite, torch.exp(lse1 - safe), torch.zeros_like(lse))
    w2 = torch.where(finite, torch.exp(lse2 - safe), torch.zeros_like(lse))
    return o1 * w1[..., None] + o2 * w2[..., None], lse


def decode_attention_ref(q: Tensor, ring_k: Tensor, ring_v: Tensor, ring_len: Tensor,
                         global_k: Tensor, global_v: Tensor, global_len: Tensor, scale: float) -> Tensor:
    """One decode query over the ring (its first ring_len slots) and the global store (ragged).

    q: (B, Hq, D); ring_k, ring_v: (B, Hkv, W, D); ring_len: () ; global_k, global_v: (B, Hkv, C, D);
    global_len: (B, Hkv). Returns (B, Hq, D) in q's dtype.
    """
    o_ring, lse_ring = partial_attention_ref(q, ring_k, ring_v, ring_len, scale)
    o_glob, lse_glob = partial_attention_ref(q, global_k, global_v, global_len, scale)
    return merge_attention(o_ring, lse_ring, o_glob, lse_glob)[0].to(q.dtype)


def compact_admitted_ref(g: Tensor, threshold: float, window: int) -> tuple[Tensor, Tensor]:
    """Positions of the prompt tokens that leave the window admitted, ascending, per (batch, KV head).

    g: (B, Hkv, T). A token j < T - W with g_j > tau is admitted. Returns idx: (B, Hkv, T) int64 whose
    first count[b, h] entries are those positions (the rest is padding), and count: (B, Hkv) int64.
    These are both the keys that gated prefill reads beyond the band and the tokens the global store keeps.
    """
    T = g.shape[-1]
    admitted = (g > threshold) & (torch.arange(T, device=g.device) < T - window)           # (B, Hkv, T)
    # A stable sort of "not admitted" moves the admitted positions to the front in their order.
    idx = torch.sort((~admitted).to(torch.int8), dim=-1, stable=True).indices              # (B, Hkv, T)
    return idx, admitted.sum(-1)


def gated_prefill_attention_ref(q: Tensor, k: Tensor, v: Tensor, admitted_idx: Tensor, admitted_count: Tensor,
                                window: int, scale: float, block: int = 256) -> Tensor:
    """Causal prefill attention under the visibility rule, at cost T * (W + admitted), never T x T.

    q: (B, Hq, T, D); k, v: (B, Hkv, T, D); admitted_idx, admitted_count from compact_admitted_ref.
    Each query reads the band of its last W keys, then the admitted keys at least W behind it.
    Returns (B, Hq, T, D) in q's dtype.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qg = q.float().view(B, Hkv, G, T, D)                                                     # (B, Hkv, G, T, D)
    pos = torch.arange(T, device=q.device)
    # Admitted keys, compacted and padded to the largest count (a host read: prefill only).
    A = int(admitted_count.max()) if admitted_count.numel() else 0
    idx = admitted_idx[..., :A]                                                              # (B, Hkv, A)
    k_adm = k.float().gather(2, idx[..., None].expand(B, Hkv, A, D))                          # (B, Hkv, A, D)
    v_adm = v.float().gather(2, idx[..., None].expand(B, Hkv, A, D))                          # (B, Hkv, A, D)
    adm_valid = torch.arange(A, device=q.device) < admitted_count[..., None]                 # (B, Hkv, A)
    out = torch.empty(B, Hkv, G, T, D, dtype=torch.float32, device=q.device)
    for start in range(0, T, block):
        end = min(start + block, T)
        qb, qpos = qg[:, :, :, start:end], pos[start:end]                                     # (B, Hkv, G, Tb, D)
        lo = max(0, start - window + 1)
        kpos = pos[lo:end]
        band = (kpos[None, :] <= qpos[:, None]) & (qpos[:, None] - kpos[None, :] < window)  # (Tb, Sb)
        s_band = torch.einsum("bhgtd,bhsd->bhgts", qb, k.float()[:, :, lo:end]) * scale
        s_band = s_band.masked_fill(~band, float("-inf"))
        s_adm = torch.einsum("bhgtd,bhad->bhgta", qb, k_adm) * scale                          # (B, Hkv, G, Tb, A)
        far = adm_valid[:, :, None, :] & (idx[:, :, None, :] <= qpos[None, None, :, None] - window)  # (B, Hkv, Tb, A)
        s_adm = s_adm.masked_fill(~far[:, :, None], float("-inf"))
        probs = torch.softmax(torch.cat((s_band, s_adm), dim=-1), dim=-1)                    # the band is never empty
        out[:, :, :, start:end] = (torch.einsum("bhgts,bhsd->bhgtd", probs[..., :end - lo], v.float()[:, :, lo:end])
                                   + torch.einsum("bhgta,bhad->bhgtd", probs[..., end - lo:], v_adm))
    return out.view(B, Hq, T, D).to(q.dtype)


def store_admitted_ref(global_k: Tensor, global_v: Tensor, global_g: Tensor, global_len: Tensor,
                       k: Tensor, v: Tensor, g: Tensor, admitted_idx: Tensor, admitted_count: Tensor) -> None:
    """Prefill: write the admitted prompt tokens into an empty global store, in place.

    global_k, global_v: (B, Hkv, C, D); global_g: (B, Hkv, C); global_len: (B, Hkv);
    k, v: (B, Hkv, T, D); g: (B, Hkv, T); admitted_idx, admitted_count from compact_admitted_ref.
    When more than C tokens are admitted the store keeps the C with the highest g.
    """
    B, Hkv, C, D = global_k.shape
    T = k.shape[2]
    if C >= T:   # shapes, not data: everything admitted fits
        idx = torch.cat((admitted_idx, admitted_idx.new_zeros(B, Hkv, C - T)), dim=-1)      # (B, Hkv, C)
    else:
        admitted = torch.arange(T, device=g.device) < admitted_count[..., None]            # (B, Hkv, T) in idx order
        ranked = torch.where(admitted, g.gather(2, admitted_idx), torch.full_like(g, -1.0))
        best = ranked.topk(C, dim=-1).indices                                              # (B, Hkv, C)
        idx = admitted_idx.gather(2, best)
    global_k.copy_(k.gather(2, idx[..., None].expand(B, Hkv, C, D)))
    global_v.copy_(v.gather(2, idx[..., None].expand(B, Hkv, C, D)))
    global_g.copy_(g.gather(2, idx).to(global_g.dtype))
    global_len.copy_(admitted_count.clamp(max=C))


def promote_ref(global_k: Tensor, global_v: Tensor, global_g: Tensor, global_len: Tensor,
                k_out: Tensor, v_out: Tensor, g_out: Tensor, threshold: float) -> None:
    """Decode: the token leaving the ring enters the global store if g > tau, in place, no host sync.

    k_out, v_out: (B, Hkv, D); g_out: (B, Hkv) (an empty ring slot has g = -1, never admitted).
    A full store admits the token in place of its lowest-g entry, and only if the token's g is higher.
    """
    B, Hkv, C, D = global_k.shape
    full = global_len >= C                                                                  # (B, Hkv)
    slot_in_store = torch.arange(C, device=global_len.device) < global_len[..., None]     # (B, Hkv, C)
    lowest_g, lowest = torch.where(slot_in_store, global_g, torch.full_like(global_g, float("inf"))).min(-1)
    write = (g_out > threshold) & (~full | (g_out > lowest_g))                              # (B, Hkv)
    slot = torch.where(full, lowest, global_len.clamp(max=C - 1))                           # (B, Hkv)
    # Rows that do not write get their own old value back, so the scatter is unconditional.
    old_k = global_k.gather(2, slot[..., None, None].expand(B, Hkv, 1, D)).squeeze(2)      # (B, Hkv, D)
    old_v = global_v.gather(2, slot[..., None, None].expand(B, Hkv, 1, D)).squeeze(2)
    old_g = global_g.gather(2, slot[..., None]).squeeze(2)
    new_k = torch.where(write[..., None], k_out.to(global_k.dtype), old_k)
    new_v = torch.where(write[..., None], v_out.to(global_v.dtype), old_v)
    new_g = torch.where(write, g_out.to(global_g.dtype), old_g)
    global_k.scatter_(2, slot[..., None, None].expand(B, Hkv, 1, D), new_k[:, :, None])
    global_v.scatter_(2, slot[..., None, None].expand(B, Hkv, 1, D), new_v[:, :, None])
    global_g.scatter_(2, slot[..., None], new_g[..., None])
    global_len.add_((write & ~full).to(global_len.dtype))


class AttentionOps(NamedTuple):
    """The five operations the write-gated cache needs; one implementation per backend, same signatures."""
    compact_admitted: Callable
    gated_prefill_attention: Callable
    store_admitted: Callable
    decode_attention: Callable
    promote: Callable


BACKENDS = {
    "torch": AttentionOps(compact_admitted_ref, gated_prefill_attention_ref, store_admitted_ref,
                          decode_attention_ref, promote_ref),
}
