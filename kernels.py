"""Attention over the write-gated cache: the plain-PyTorch reference of every kernel.

The references are the CPU path and the oracle of the Triton kernels. All attention math runs in
float32; partial results carry their log-sum-exp (lse) so two key sets merge exactly.

Visibility (SPEC.md): query i sees key j iff j <= i and (i - j < W or g_j > tau).
"""
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
