"""Attention over the write-gated cache, op by op: each operation's plain-PyTorch reference, then its
Triton kernel and the kernel's launcher, as the Triton tutorials lay them out.

The references are the CPU path and the oracle of the Triton kernels. All attention math runs in
float32; partial results carry their log-sum-exp (lse) so two key sets merge exactly.
The launchers have the references' signatures and are PyTorch custom ops (BACKENDS["triton"]), so
torch.compile traces through them and a decode step that calls them is captured by a CUDA graph.
The pages the global stores live in, and their allocator, are pages.py's.

Visibility (DESIGN.md): query i sees key j iff j <= i and (i - j < W or g_j > tau).
"""
import math
import os
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter (the tests, and
# --attn-backend triton on a CPU). The choice is made when a kernel is defined, so it comes first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import triton                      # noqa: E402
import triton.language as tl       # noqa: E402
from torch.library import triton_op, wrap_triton   # noqa: E402
from triton.runtime.interpreter import InterpretedFunction   # noqa: E402

from pages import gather_store, pages_for, pages_in_use, pool_rows, reads_host, store_room, take   # noqa: E402


# The references' .item() (the keys in use) becomes a symbolic size in the compiled graph instead of a graph break.
torch._dynamo.config.capture_scalar_outputs = True


# --- attention in PyTorch: what the references and the dense cache share ---------------------

def float32(x: Tensor) -> Tensor:
    """x in float32; x itself when it is already (no call to dispatch in an eager step, where each costs microseconds)."""
    return x if x.dtype == torch.float32 else x.float()


def rounded(x: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 x rounded to dtype's precision, still in float32 (x itself for float32)."""
    return x if dtype == torch.float32 else x.to(dtype).float()


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float) -> Tensor:
    """Decode attention over the first `lengths` keys of each (batch, KV head): the dense cache's.

    q: (B, Hq, D); k, v: (B, Hkv, S, D); lengths: (B, Hkv) or () integer tensor.
    Returns (B, Hq, D) float32; an empty key set gives 0.
    """
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    # Only the filled slots (pages_in_use with pages of one slot: a host read on a CPU), at least two where there
    # are two, so that compiled code knows the keys are not one row (a layout question Inductor's bmm asks, which
    # it cannot answer of a data-dependent size).
    filled = pages_in_use(lengths, 1, k.shape[2], at_least=min(2, k.shape[2]))
    k, v = k[:, :, :filled], v[:, :, :filled]
    S = k.shape[2]
    qg = q.float().view(B, Hkv, Hq // Hkv, D)                                               # (B, Hkv, G, D)
    scores = (qg @ k.float().transpose(-1, -2)).mul_(scale)                                 # (B, Hkv, G, S)
    invalid = torch.arange(S, device=q.device) >= lengths.expand(B, Hkv)[..., None, None]  # (B, Hkv, 1, S)
    scores.masked_fill_(invalid, float("-inf"))
    # An empty key set (its softmax: NaN) gets weights 0.
    weights = torch.softmax(scores, dim=-1).masked_fill_(invalid.all(-1, keepdim=True), 0.0)   # (B, Hkv, G, S)
    return (weights @ v.float()).view(B, Hq, D)


def merge_attention(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the union of two disjoint key sets from their partial results.

    o: (..., D) float32, lse: (...) float32; either side may be empty (lse = -inf).
    """
    lse = torch.logaddexp(lse1, lse2)
    # Both sides empty: lse = -inf; a finite floor in its place keeps both weights at exp(-inf) = 0, not NaN.
    floor = lse.clamp(min=torch.finfo(torch.float32).min)
    w1, w2 = (lse1 - floor).exp_(), (lse2 - floor).exp_()
    return torch.addcmul(o1 * w1[..., None], o2, w2[..., None]), lse


def attention_lse(q: Tensor, k: Tensor, v: Tensor, scale: float, visible: Tensor | None = None,
                  causal: bool = False) -> tuple[Tensor, Tensor]:
    """Softmax attention with its lse, in float32: q (B, H, M, D), k, v (B, H, S, D); visible (M, S) bool, or
    causal (query i sees keys 0..i), or neither (every key). Every row must see a key. Returns o (B, H, M, D)
    and lse (B, H, M). On a CPU the fused kernel, which returns the lse (hence the private name) and skips
    the tiles a causal mask hides; elsewhere plain tensor ops.
    """
    q, k, v = q.float(), k.float(), v.float()
    if q.device.type == "cpu":
        mask = None if visible is None else torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                           scale=scale)[:2]
    if causal:
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    scores = q @ k.transpose(-1, -2) * scale                                                 # (B, H, M, S)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(-1)                                                               # (B, H, M)
    return scores.sub_(lse[..., None]).exp_() @ v, lse


# --- what the Triton kernels share -------------------------------------------------------------
# Scores are kept in log2 units (scale * log2 e folded in) so softmax uses exp2.
# On a GPU, bf16/fp16 tiles feed the tensor cores directly; the interpreter's tl.dot is wrong on
# bfloat16 operands, so there every tile is upcast to float32 first (UPCAST). Float arguments are
# cast to float32 on entry: Inductor passes a Python float as fp64, which would make the score
# arithmetic fp64 and compare g against a threshold other than PyTorch's float32 one.

LOG2E = 1.4426950408889634
# In the interpreter: small tiles, so that small tests cross tile edges; a search of several steps;
# and a grid of 3 programs, so that heads straddle programs.
INTERPRETER_PREFILL_TILES = dict(BLOCK_M=32, BLOCK_N=16, SEARCH_LANES=4)
INTERPRETER_DECODE_TILES = dict(BLOCK_N=16, programs_per_sm=3)
# On a GPU: prefill tiles of BLOCK_M query rows (positions x the group's query heads) by BLOCK_N keys;
# decode tiles of BLOCK_N keys, on a grid of programs_per_sm programs per multiprocessor. A launcher
# takes the first tile of its list meant for the head dim whose shared memory fits the device's block
# (tiles_for). The lists go by how the dots run. Hopper's wgmma reads its operands from shared memory,
# so at head dim 128 a 128 x 64 tile fits its registers; the mma of every other GPU (Ampere, Ada,
# consumer Blackwell) holds them in registers and spills there, so 128 x 32. Float32 runs as three tf32
# products of operands split in two halves (tf32x3), and spills at head dim 128 beyond 16 query rows.
# Decode's rows, one group's query heads, are too few for wgmma: its tiles are the same everywhere.
# The lists come from the compiler's reports (ptxas's registers and spills, Triton's shared memory)
# for sm_80, sm_89 and sm_90 with triton 3.6 and 3.9, not yet from timings: tests/test_kernels.py
# compiles every kernel at the tiles picked for an A100, an L40S and an H100, and fails on a spill or
# on shared memory beyond the estimate or the device. bench_gpu.py --sweep times alternatives.
GPU_TILES = {   # (op, dots): [(largest head dim, tiles), ...] best first
    ("prefill", "wgmma"): [(128, dict(BLOCK_M=128, BLOCK_N=64, SEARCH_LANES=128, num_warps=8, num_stages=3))],
    ("prefill", "mma"): [(64, dict(BLOCK_M=128, BLOCK_N=64, SEARCH_LANES=128, num_warps=8, num_stages=3)),
                         (128, dict(BLOCK_M=128, BLOCK_N=32, SEARCH_LANES=128, num_warps=8, num_stages=3))],
    ("prefill", "tf32x3"): [(64, dict(BLOCK_M=32, BLOCK_N=32, SEARCH_LANES=128, num_warps=4, num_stages=2)),
                            (128, dict(BLOCK_M=16, BLOCK_N=32, SEARCH_LANES=128, num_warps=4, num_stages=2))],
    ("decode", "wgmma"): [(128, dict(BLOCK_N=64, programs_per_sm=2, num_warps=4, num_stages=3))],
    ("decode", "mma"): [(128, dict(BLOCK_N=64, programs_per_sm=2, num_warps=4, num_stages=3))],
    ("decode", "tf32x3"): [(128, dict(BLOCK_N=32, programs_per_sm=2, num_warps=4, num_stages=3))],
}


class DeviceLimits(NamedTuple):
    """What a GPU gives a kernel: the shared memory a block may opt in to (bytes), its multiprocessors,
    its compute capability."""
    shared_memory: int
    multiprocessors: int
    capability: tuple[int, int]


def device_limits(device: torch.device | str) -> DeviceLimits:
    props = torch.cuda.get_device_properties(device)
    return DeviceLimits(props.shared_memory_per_block_optin, props.multi_processor_count, (props.major, props.minor))


def shared_memory(tiles: dict, dtype: torch.dtype, head_dim: int, capability: tuple[int, int]) -> int:
    """An upper bound of the shared memory (bytes) a kernel takes at these tiles, from where Triton puts
    things: the K and V tiles, num_stages - 1 deep (num_stages from Hopper on, where wgmma reads a tile
    in shared memory while the next one loads); the query rows and the softmax weights on their way to
    the dots, twice in float32 (tf32x3's halves); 4 KiB of scratch. tests/test_kernels.py checks it
    against the compiler's count."""
    rows = tiles.get("BLOCK_M", 16)      # decode: a group's query heads, padded to 16 (groups of up to 16)
    block_n, size = tiles["BLOCK_N"], dtype.itemsize
    buffers = tiles["num_stages"] - (0 if capability >= (9, 0) and rows >= 64 else 1)
    copies = 2 if dtype == torch.float32 else 1
    return size * (2 * buffers * block_n * head_dim + copies * rows * (head_dim + block_n)) + 4096


def tiles_for(op: str, dtype: torch.dtype, head_dim: int, limits: DeviceLimits) -> dict:
    """The tiles of op ("prefill" or "decode") on a GPU with these limits: the first of its GPU_TILES list
    meant for the head dim whose shared memory fits a block."""
    dots = "tf32x3" if dtype == torch.float32 else "wgmma" if limits.capability[0] == 9 else "mma"
    for largest_head_dim, tiles in GPU_TILES[op, dots]:
        fits = shared_memory(tiles, dtype, head_dim, limits.capability) <= limits.shared_memory
        if head_dim <= largest_head_dim and fits:
            return tiles
    major, minor = limits.capability
    raise ValueError(f"no {op} tile for head dim {head_dim} in {dtype} fits sm_{major}{minor} "
                     f"({limits.shared_memory // 1024} KiB of shared memory a block)")


def launch_tiles(op: str, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> dict:
    """The tiles op's launcher takes: on a GPU tiles_for the device, in the interpreter its own."""
    if torch.device(device).type != "cuda":
        return INTERPRETER_PREFILL_TILES if op == "prefill" else INTERPRETER_DECODE_TILES
    return tiles_for(op, dtype, head_dim, device_limits(device))


def _launch(kernel):
    """wrap_triton, except for the interpreter's kernels, which torch < 2.13 refuses to wrap (they only run eagerly)."""
    return kernel if isinstance(kernel, InterpretedFunction) else wrap_triton(kernel)


def _dot_options(x: Tensor) -> dict:
    """UPCAST in the interpreter. float32 inputs on a GPU use three tf32 products per dot (tf32x3), as
    accurate as float32 for these sums and on the tensor cores; plain tf32 would be 1e-3 off the references."""
    if x.device.type != "cuda":
        return dict(UPCAST=True, PRECISION="ieee")
    return dict(UPCAST=False, PRECISION="tf32x3" if x.dtype == torch.float32 else "tf32")


def _rows(x: Tensor) -> Tensor:
    """x with a unit stride in its last dimension, as the kernels index it."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_pool(pool_k: Tensor, pool_v: Tensor, pool_g: Tensor, page_table: Tensor, global_len: Tensor) -> None:
    assert pool_k.is_contiguous() and pool_v.is_contiguous() and pool_g.is_contiguous(), "the pool is indexed by flat row"
    assert page_table.stride(-1) == 1 and global_len.is_contiguous()


@triton.jit
def _attend(acc, l_i, m_i, q, k, v, visible, qk_scale,
            MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the online softmax. q: (M, D); k, v: (N, D); visible: (M, N) or broadcastable."""
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale                        # (M, N)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    # m_i starts finite (-1e30), so a row that sees nothing yet gets exp2(-inf) = 0, never NaN.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _count_at_most(ptr, n, limit, LANES: tl.constexpr, STEPS: tl.constexpr):
    """How many of the n ascending values at ptr are <= limit: a search that samples LANES values per
    step (the last of LANES equal chunks of the candidate range), so 400k values take 3 dependent loads."""
    lanes = tl.arange(0, LANES)
    lo = n * 0                       # the answer lies in [lo, lo + width]; values past it are > limit
    width = n
    for _ in tl.static_range(STEPS):
        step = tl.cdiv(width, LANES)
        last = lo + (lanes + 1) * step - 1
        below = tl.load(ptr + last, mask=last < n, other=0) <= limit
        lo += tl.sum((below & (last < n)).to(tl.int32), 0) * step   # whole chunks at or below the limit
        width = step
    return lo


# --- admission: prefill compaction ------------------------------------------------------------

def compact_admitted_ref(g: Tensor, threshold: float, window: int) -> tuple[Tensor, Tensor]:
    """Positions of the tokens of a sequence that leave the window admitted, ascending, per (batch, KV head).

    g: (B, Hkv, T). A token j < T - W with g_j > tau is admitted. Returns idx: (B, Hkv, T) int64 whose
    first count[b, h] entries are those positions (the rest is padding), and count: (B, Hkv) int64.
    Over an append's keys (what the cache holds, then the new tokens) these are the keys gated prefill
    attention reads beyond the band; over the ring's and the new tokens, those the global store takes.
    """
    T = g.shape[-1]
    admitted = (g > threshold) & (torch.arange(T, device=g.device) < T - window)           # (B, Hkv, T)
    # A stable sort of "not admitted" moves the admitted positions to the front in their order.
    idx = torch.sort((~admitted).to(torch.int8), dim=-1, stable=True).indices              # (B, Hkv, T)
    return idx, admitted.sum(-1)


@triton.jit
def _compact_kernel(G, IDX, COUNT, stride_gb, stride_gh, T, threshold, window,
                    HKV: tl.constexpr, BLOCK_T: tl.constexpr):
    bh = tl.program_id(0)
    threshold = tl.cast(threshold, tl.float32)
    g_row = G + (bh // HKV).to(tl.int64) * stride_gb + (bh % HKV) * stride_gh
    idx_row = IDX + bh.to(tl.int64) * T
    offs = tl.arange(0, BLOCK_T)
    count = 0
    for start in range(0, T, BLOCK_T):
        j = start + offs
        admitted = (tl.load(g_row + j, mask=j < T, other=0.0) > threshold) & (j < T - window)
        count += tl.sum(admitted.to(tl.int32))
    # A stable partition, as the reference's stable sort: admitted positions first, then the rest, each in order.
    before = 0
    for start in range(0, T, BLOCK_T):
        j = start + offs
        admitted = (tl.load(g_row + j, mask=j < T, other=0.0) > threshold) & (j < T - window)
        a = admitted.to(tl.int32)
        rank = before + tl.cumsum(a, 0) - a                                                  # admitted before j
        tl.store(idx_row + tl.where(admitted, rank, count + j - rank), j.to(tl.int64), mask=j < T)
        before += tl.sum(a)
    tl.store(COUNT + bh, count.to(tl.int64))


@triton_op("wgkv::compact_admitted", mutates_args=())
def compact_admitted(g: Tensor, threshold: float, window: int) -> tuple[Tensor, Tensor]:
    """compact_admitted_ref as one kernel: per (batch, KV head) a prefix sum over g > tau, two passes over g."""
    g = _rows(g)
    B, Hkv, T = g.shape
    idx = torch.empty(B, Hkv, T, dtype=torch.int64, device=g.device)                        # (B, Hkv, T)
    count = torch.empty(B, Hkv, dtype=torch.int64, device=g.device)                         # (B, Hkv)
    block = 1024 if g.device.type == "cuda" else 16
    _launch(_compact_kernel)[(B * Hkv,)](g, idx, count, g.stride(0), g.stride(1), T, threshold, window,
                                         HKV=Hkv, BLOCK_T=block)
    return idx, count


# --- gated prefill attention ------------------------------------------------------------------

def gated_prefill_attention_ref(q: Tensor, k: Tensor, v: Tensor, admitted_idx: Tensor, admitted_count: Tensor,
                                window: int, scale: float, block: int = 128) -> Tensor:
    """Causal attention of the last Tq of Tk tokens under the visibility rule, at cost Tq * (W + admitted).

    q: (B, Hq, Tq, D), the queries of key positions Tk - Tq .. Tk - 1 (a prefill: Tq = Tk; a chunk appended
    to a cache: the keys are what the cache holds in front of it, then the chunk); k, v: (B, Hkv, Tk, D);
    admitted_idx, admitted_count from compact_admitted_ref over the Tk keys. Each block of queries, head by
    head, makes two fused attention calls whose rows are the block's queries of all G heads of a KV group (so
    K and V are never repeated per query head), merged by their lse: the admitted keys at least W behind the
    block's first query, which every query of the block sees, with no mask; then the few admitted keys that
    only its later queries see and the band of its last W keys, under a mask of the block's size. So memory
    stays at about a block's queries and one head's admitted keys, however many are admitted.
    Returns (B, Hq, Tq, D) in q's dtype.
    """
    B, Hq, Tq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G, offset = Hq // Hkv, T - Tq
    pos = torch.arange(T, device=q.device)
    starts = torch.arange(0, Tq, block, device=q.device)                                      # (n_blocks,)
    ends = (starts + block).clamp(max=Tq)                                                     # (n_blocks,)
    counts = admitted_count.tolist()                                                          # host reads: prefill only
    out = torch.empty(B, Hkv, G, Tq, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        for h in range(Hkv):
            idx = admitted_idx[b, h, :counts[b][h]]                                           # (A,) ascending
            k_adm, v_adm = k[b, h, idx], v[b, h, idx]                                         # (A, D)
            # Far keys of a block: those every query sees (behind its first query by W), then those up to its last.
            seen_by_all = torch.searchsorted(idx, offset + starts - window, right=True).tolist()
            seen_by_last = torch.searchsorted(idx, offset + ends - 1 - window, right=True).tolist()
            for start, end, n_all, n_last in zip(starts.tolist(), ends.tolist(), seen_by_all, seen_by_last):
                rows = G * (end - start)
                qb = q[b, h * G:(h + 1) * G, start:end].reshape(1, 1, rows, D)               # (1, 1, G * Tb, D)
                qpos = pos[offset + start:offset + end]                                       # (Tb,)
                lo = max(0, offset + start - window + 1)
                kpos = pos[lo:offset + end]
                band = (kpos[None, :] <= qpos[:, None]) & (qpos[:, None] - kpos[None, :] < window)  # (Tb, Sb)
                edge = idx[None, n_all:n_last] <= qpos[:, None] - window                     # (Tb, n_last - n_all)
                visible = torch.cat((edge, band), dim=-1).repeat(G, 1)                       # (G * Tb, S); never an empty row
                keys = torch.cat((k_adm[n_all:n_last], k[b, h, lo:offset + end]))            # (S, D)
                values = torch.cat((v_adm[n_all:n_last], v[b, h, lo:offset + end]))         # (S, D)
                o, lse = attention_lse(qb, keys[None, None], values[None, None], scale, visible)
                if n_all:
                    o_all, lse_all = attention_lse(qb, k_adm[None, None, :n_all], v_adm[None, None, :n_all], scale)
                    o, lse = merge_attention(o, lse, o_all, lse_all)
                out[b, h, :, start:end] = o.view(G, end - start, D)
    return out.view(B, Hq, Tq, D).to(q.dtype)


@triton.jit
def _gated_prefill_kernel(Q, K, V, IDX, COUNT, OUT,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                          stride_ib, stride_ih, stride_ob, stride_oh, stride_ot,
                          T, offset, window, qk_scale,
                          HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          SEARCH_LANES: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # The tile's rows are (position, query head of the group) pairs, position-major, so every K/V
    # tile loaded serves the G query heads that share it. The last tiles, the longest, start first.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    qk_scale = tl.cast(qk_scale, tl.float32)
    b = tl.cast(bh // HKV, tl.int64)
    h = bh % HKV
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // G                                                                            # (M,) queries: rows of Q
    head = (h * G + rows % G).to(tl.int64)                                                   # (M,) query heads
    row_ok = t < T
    d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :],
                mask=row_ok[:, None], other=0.0)                                             # (M, D)
    tk = t + offset                                                                          # (M,) their key positions
    first = (tile * BLOCK_M) // G + offset
    last = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // G, T - 1) + offset
    k_head = K + b * stride_kb + h * stride_kh
    v_head = V + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    # Admitted keys at least W behind their query: a prefix of the ascending list. The first n_all
    # are seen by every query of the tile (no mask), the next ones up to n_any by some of them.
    idx_head = IDX + b * stride_ib + h * stride_ih
    count = tl.load(COUNT + bh).to(tl.int32)
    n_all = _count_at_most(idx_head, count, first - window, SEARCH_LANES, SEARCH_STEPS)
    n_any = _count_at_most(idx_head, count, last - window, SEARCH_LANES, SEARCH_STEPS)
    n_all_tiles = (n_all // BLOCK_N) * BLOCK_N
    for start in range(0, n_all_tiles, BLOCK_N):
        j = tl.load(idx_head + start + offs_n)                                               # (N,) key positions
        k = tl.load(k_head + j[:, None] * stride_kt + d[None, :])
        v = tl.load(v_head + j[:, None] * stride_vt + d[None, :])
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k, v, True, qk_scale, False, UPCAST, PRECISION)
    for start in range(n_all_tiles, n_any, BLOCK_N):
        a = start + offs_n
        j = tl.load(idx_head + a, mask=a < n_any, other=0)
        k = tl.load(k_head + j[:, None] * stride_kt + d[None, :], mask=(a < n_any)[:, None], other=0.0)
        v = tl.load(v_head + j[:, None] * stride_vt + d[None, :], mask=(a < n_any)[:, None], other=0.0)
        visible = (a < n_any)[None, :] & (j[None, :] <= tk[:, None] - window)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k, v, visible, qk_scale, True, UPCAST, PRECISION)

    # The band: each query's last W positions up to itself; every tile holds a key some query sees.
    for start in range(tl.maximum(first - window + 1, 0), last + 1, BLOCK_N):
        j = start + offs_n
        k = tl.load(k_head + j[:, None] * stride_kt + d[None, :], mask=(j <= last)[:, None], other=0.0)
        v = tl.load(v_head + j[:, None] * stride_vt + d[None, :], mask=(j <= last)[:, None], other=0.0)
        visible = (j[None, :] <= tk[:, None]) & (tk[:, None] - j[None, :] < window)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k, v, visible, qk_scale, True, UPCAST, PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]                                         # padding rows have l = 0
    tl.store(OUT + b * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_ot + d[None, :], out,
             mask=row_ok[:, None])


@triton_op("wgkv::gated_prefill_attention", mutates_args=())
def gated_prefill_attention(q: Tensor, k: Tensor, v: Tensor, admitted_idx: Tensor, admitted_count: Tensor,
                            window: int, scale: float) -> Tensor:
    """gated_prefill_attention_ref as one FlashAttention-style kernel over the band and the admitted keys.

    Each query tile reads only key tiles that hold a key one of its queries sees, so the cost grows
    as T * (W + admitted). (The reference's `block` is its own chunking; the kernel has its tiles.)
    Returns (B, Hq, T, D) in q's dtype, laid out as (B, T, Hq, D) so the output projection reads it as is.
    """
    tiles = launch_tiles("prefill", q.device, q.dtype, q.shape[-1])
    return gated_prefill_tiled(q, k, v, admitted_idx, admitted_count, window, scale, tiles)


def gated_prefill_tiled(q: Tensor, k: Tensor, v: Tensor, admitted_idx: Tensor, admitted_count: Tensor,
                        window: int, scale: float, tiles: dict) -> Tensor:
    """The gated prefill kernel with the given tiles (GPU_TILES' prefill keys)."""
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, Hq, T, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)          # (B, Hq, T, D)
    grid = (triton.cdiv(T * (Hq // Hkv), tiles["BLOCK_M"]), B * Hkv)
    search_steps = max(1, math.ceil(math.log(max(int(Tk), 2), tiles["SEARCH_LANES"]))) + 1
    _launch(_gated_prefill_kernel)[grid](
        q, k, v, admitted_idx, admitted_count, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        admitted_idx.stride(0), admitted_idx.stride(1), out.stride(0), out.stride(1), out.stride(2),
        T, Tk - T, window, scale * LOG2E, HKV=Hkv, G=Hq // Hkv, D=D, SEARCH_STEPS=search_steps, **tiles, **_dot_options(q))
    return out


# --- admission: prefill store -----------------------------------------------------------------

def kept_positions(g: Tensor, admitted_idx: Tensor, admitted_count: Tensor, room: Tensor) -> Tensor:
    """The positions of the admitted tokens a store with `room` free slots per head keeps, in the order to store them.

    g, admitted_idx: (B, Hkv, T); admitted_count, room: (B, Hkv). Returns (B, Hkv, T) int64 whose first
    min(count, room) entries are kept: every admitted position in order where they fit, else the admitted
    tokens by descending g (ties by position), so that the first `room` are the highest.
    """
    T = g.shape[-1]
    admitted = torch.arange(T, device=g.device) < admitted_count[..., None]                # (B, Hkv, T) in idx order
    ranked = torch.where(admitted, g.gather(2, admitted_idx), torch.full_like(g, -1.0))
    best = admitted_idx.gather(2, ranked.sort(dim=-1, descending=True, stable=True).indices)
    return torch.where((admitted_count <= room)[..., None], admitted_idx, best)


def store_admitted_ref(pool_k: Tensor, pool_v: Tensor, pool_g: Tensor, free_pages: Tensor, n_free: Tensor,
                       page_table: Tensor, global_len: Tensor, k: Tensor, v: Tensor, g: Tensor,
                       admitted_idx: Tensor, admitted_count: Tensor) -> None:
    """An append: add the admitted tokens to each head's store, taking the pages they need, in place.

    k, v: (B, Hkv, T, D); g: (B, Hkv, T); admitted_idx, admitted_count from compact_admitted_ref. A head
    whose capacity, or the pool, runs out keeps its highest-g admitted tokens that fit.
    """
    B, Hkv, T, D = k.shape
    P = pool_k.shape[1]
    room = store_room(free_pages, n_free, page_table, global_len, P, admitted_count)       # (B, Hkv)
    n_keep = admitted_count.minimum(room)
    keep = kept_positions(g, admitted_idx, admitted_count, room)                           # (B, Hkv, T)
    s = torch.arange(T, device=k.device)
    rows = pool_rows(page_table, global_len[..., None] + s, P)                             # (B, Hkv, T)
    rows = torch.where(s < n_keep[..., None], rows, (pool_k.shape[0] - 1) * P).flatten()    # the rest to scratch
    pool_k.view(-1, D)[rows] = k.gather(2, keep[..., None].expand(B, Hkv, T, D)).flatten(0, 2).to(pool_k.dtype)
    pool_v.view(-1, D)[rows] = v.gather(2, keep[..., None].expand(B, Hkv, T, D)).flatten(0, 2).to(pool_v.dtype)
    pool_g.view(-1)[rows] = g.gather(2, keep).flatten().to(pool_g.dtype)
    global_len.add_(n_keep)


@triton.jit
def _store_kernel(PK, PV, PG, TABLE, GLEN, K, V, GSRC, KEEP, NKEEP,
                  stride_tb, stride_th, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                  stride_gb, stride_gh, stride_keepb, stride_keeph,
                  HKV: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_S: tl.constexpr):
    bh = tl.program_id(1)
    b = tl.cast(bh // HKV, tl.int64)
    h = bh % HKV
    n = tl.load(NKEEP + bh)
    start = tl.load(GLEN + bh)                       # the store's length before this call; the wrapper adds n after
    i = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)                                   # kept tokens
    ok = i < n
    d = tl.arange(0, D)
    src = tl.load(KEEP + b * stride_keepb + h * stride_keeph + i, mask=ok, other=0)          # prompt positions
    slot = start + i
    page = tl.load(TABLE + b * stride_tb + h * stride_th + slot // PAGE, mask=ok, other=0)
    row = page * PAGE + slot % PAGE                                                          # (BLOCK_S,) pool rows
    from_k = b * stride_kb + h * stride_kh + src[:, None] * stride_kt + d[None, :]
    from_v = b * stride_vb + h * stride_vh + src[:, None] * stride_vt + d[None, :]
    tl.store(PK + row[:, None] * D + d[None, :], tl.load(K + from_k, mask=ok[:, None]), mask=ok[:, None])
    tl.store(PV + row[:, None] * D + d[None, :], tl.load(V + from_v, mask=ok[:, None]), mask=ok[:, None])
    tl.store(PG + row, tl.load(GSRC + b * stride_gb + h * stride_gh + src, mask=ok), mask=ok)


@triton_op("wgkv::store_admitted",
           mutates_args={"pool_k", "pool_v", "pool_g", "free_pages", "n_free", "page_table", "global_len"})
def store_admitted(pool_k: Tensor, pool_v: Tensor, pool_g: Tensor, free_pages: Tensor, n_free: Tensor,
                   page_table: Tensor, global_len: Tensor, k: Tensor, v: Tensor, g: Tensor,
                   admitted_idx: Tensor, admitted_count: Tensor) -> None:
    """store_admitted_ref with the copy as a kernel that writes only the kept tokens' rows.

    The pages and the choice of tokens stay in PyTorch (store_room, kept_positions: prefix sums, and a
    sort over g that matters only where a head runs out of room); the kernel then moves each head's
    kept rows straight from the prompt's K/V into its pages, where the reference gathers them first.
    """
    k, v, g = _rows(k), _rows(v), _rows(g)
    _check_pool(pool_k, pool_v, pool_g, page_table, global_len)
    B, Hkv, T, D = k.shape
    P = pool_k.shape[1]
    room = store_room(free_pages, n_free, page_table, global_len, P, admitted_count)       # (B, Hkv)
    n_keep = admitted_count.minimum(room).contiguous()                                     # (B, Hkv)
    keep = kept_positions(g, admitted_idx, admitted_count, room)                           # (B, Hkv, T)
    block = 64 if k.device.type == "cuda" else 16
    _launch(_store_kernel)[(triton.cdiv(T, block), B * Hkv)](
        pool_k, pool_v, pool_g, page_table, global_len, k, v, g, keep, n_keep,
        page_table.stride(0), page_table.stride(1),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        g.stride(0), g.stride(1), keep.stride(0), keep.stride(1),
        HKV=Hkv, D=D, PAGE=P, BLOCK_S=block)
    global_len.add_(n_keep)


# --- admission: ring-exit promotion -----------------------------------------------------------

def promote_ref(pool_k: Tensor, pool_v: Tensor, pool_g: Tensor, free_pages: Tensor, n_free: Tensor,
                page_table: Tensor, global_len: Tensor, k_out: Tensor, v_out: Tensor, g_out: Tensor,
                threshold: float) -> Tensor:
    """Decode: the token leaving the ring enters its head's store if g > tau, in place, no host sync.

    k_out, v_out: (B, Hkv, D); g_out: (B, Hkv) (an empty ring slot has g = -1, never admitted). A head
    whose last page is full takes a new page; when its capacity or the pool has none left, the token
    replaces the head's lowest-g entry, and only if its own g is higher. Returns the store slot each head
    wrote (B, Hkv) int64, -1 where none: the page whose summary (selection) must be recomputed.
    """
    B, Hkv, M = page_table.shape
    P, D = pool_k.shape[1:]
    admitted = g_out > threshold                                                            # (B, Hkv)
    room = store_room(free_pages, n_free, page_table, global_len, P, admitted.long()) > 0   # (B, Hkv)
    # The lowest entry matters only to an admitted token without room: run eagerly on a CPU, where that flag is
    # free to read (pages.reads_host), a step where every admitted token has room skips the scan of the stores.
    if reads_host(room) and not bool((admitted & ~room).any()):
        write, slot = admitted, global_len
    else:
        empty = torch.arange(M * P, device=g_out.device) >= global_len[..., None]          # (B, Hkv, C)
        held_g = gather_store(pool_g, page_table, M).masked_fill(empty, float("inf"))       # (B, Hkv, C)
        lowest_g, lowest = held_g.min(-1)                                                   # (B, Hkv)
        write = admitted & (room | (g_out > lowest_g))
        slot = torch.where(room, global_len, lowest)
    row = torch.where(write, pool_rows(page_table, slot[..., None], P)[..., 0], (pool_k.shape[0] - 1) * P).flatten()
    pool_k.view(-1, D).index_copy_(0, row, k_out.reshape(-1, D).to(pool_k.dtype))
    pool_v.view(-1, D).index_copy_(0, row, v_out.reshape(-1, D).to(pool_v.dtype))
    pool_g.view(-1).index_copy_(0, row, g_out.flatten().to(pool_g.dtype))
    written = torch.where(write, slot, -1)                                                  # before slot (global_len) grows
    global_len.add_(write & room)
    return written


@triton.jit
def _promote_kernel(PK, PV, PG, TABLE, GLEN, ROOM, KO, VO, GO, WRITTEN,
                    stride_tb, stride_th, stride_kob, stride_koh, stride_vob, stride_voh, stride_gob, stride_goh, threshold,
                    HKV: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_C: tl.constexpr):
    bh = tl.program_id(0)
    b = tl.cast(bh // HKV, tl.int64)
    h = bh % HKV
    n = tl.load(GLEN + bh)
    room = tl.load(ROOM + bh) != 0
    g_new = tl.load(GO + b * stride_gob + h * stride_goh)
    admit = g_new > tl.cast(threshold, tl.float32)
    table = TABLE + b * stride_tb + h * stride_th
    # The lowest g of a head without room, scanned only when it decides something (the loop is empty otherwise).
    offs = tl.arange(0, BLOCK_C)
    lane_g = tl.full([BLOCK_C], float("inf"), tl.float32)
    lane_i = offs.to(tl.int64)
    for start in range(0, tl.where(admit & ~room, n, 0), BLOCK_C):
        c = start + offs
        page = tl.load(table + c // PAGE, mask=c < n, other=0)
        gc = tl.load(PG + page * PAGE + c % PAGE, mask=c < n, other=float("inf")).to(tl.float32)
        lower = gc < lane_g                        # strict: each lane keeps its first minimum
        lane_i = tl.where(lower, c, lane_i)
        lane_g = tl.where(lower, gc, lane_g)
    lowest_g = tl.min(lane_g, 0)
    lowest = tl.min(tl.where(lane_g == lowest_g, lane_i, n), 0)   # the first slot holding the minimum, as torch.min
    write = admit & (room | (g_new > lowest_g))
    slot = tl.where(room, n, lowest).to(tl.int64)
    row = tl.load(table + slot // PAGE, mask=write, other=0) * PAGE + slot % PAGE
    d = tl.arange(0, D)
    write_row = d < tl.where(write, D, 0)          # (D,) all or nothing: the interpreter wants a vector mask
    tl.store(PK + row * D + d, tl.load(KO + b * stride_kob + h * stride_koh + d), mask=write_row)
    tl.store(PV + row * D + d, tl.load(VO + b * stride_vob + h * stride_voh + d), mask=write_row)
    tl.store(PG + row, g_new, mask=write)
    tl.store(GLEN + bh, n + (write & room).to(n.dtype))
    tl.store(WRITTEN + bh, tl.where(write, slot, -1))


@triton_op("wgkv::promote", mutates_args={"pool_k", "pool_v", "pool_g", "free_pages", "n_free", "page_table", "global_len"})
def promote(pool_k: Tensor, pool_v: Tensor, pool_g: Tensor, free_pages: Tensor, n_free: Tensor,
            page_table: Tensor, global_len: Tensor, k_out: Tensor, v_out: Tensor, g_out: Tensor,
            threshold: float) -> Tensor:
    """promote_ref as one launch of one program per (batch, KV head) after the page grant, no host sync.

    The reference scans every head's C gates on every step; here a head reads them only when it has no
    room and the leaving token is admitted, the only case the lowest entry matters.
    """
    k_out, v_out = _rows(k_out), _rows(v_out)
    _check_pool(pool_k, pool_v, pool_g, page_table, global_len)
    B, Hkv, D = k_out.shape
    P = pool_k.shape[1]
    admitted = g_out > threshold                                                            # (B, Hkv)
    room = (store_room(free_pages, n_free, page_table, global_len, P, admitted.long()) > 0).to(torch.int8)
    written = torch.empty(B, Hkv, dtype=torch.int64, device=k_out.device)                    # (B, Hkv)
    block = 1024 if k_out.device.type == "cuda" else 16
    _launch(_promote_kernel)[(B * Hkv,)](
        pool_k, pool_v, pool_g, page_table, global_len, room, k_out, v_out, g_out, written,
        page_table.stride(0), page_table.stride(1), k_out.stride(0), k_out.stride(1), v_out.stride(0), v_out.stride(1),
        g_out.stride(0), g_out.stride(1), threshold, HKV=Hkv, D=D, PAGE=P, BLOCK_C=block)
    return written


# --- dual-cache decode attention --------------------------------------------------------------

def decode_attention_ref(q: Tensor, ring_k: Tensor, ring_v: Tensor, ring_len: Tensor,
                         pool_k: Tensor, pool_v: Tensor, page_table: Tensor, global_len: Tensor, scale: float) -> Tensor:
    """One decode query over the ring (its first ring_len slots) and the paged global store (ragged): one softmax
    over both key sets, the ring's keys first.

    q: (B, Hq, D); ring_k, ring_v: (B, Hkv, W, D); ring_len: (B,) per batch row (rows at different positions),
    or () for all; pool_k, pool_v: (N + 1, P, D); page_table: (B, Hkv, M); global_len: (B, Hkv).
    Returns (B, Hq, D) in q's dtype; a head that sees no key gives 0. Eager, head by head over the keys each holds
    (attention_by_head); compiled, every head at once over the pages of the longest store (attention_padded).
    """
    if torch.compiler.is_compiling():
        return attention_padded(q, ring_k, ring_v, ring_len, pool_k, pool_v, page_table, global_len, scale)
    return attention_by_head(q, ring_k, ring_v, ring_len, pool_k, pool_v, page_table, global_len, scale)


def attention_by_head(q: Tensor, ring_k: Tensor, ring_v: Tensor, ring_len: Tensor,
                      pool_k: Tensor, pool_v: Tensor, page_table: Tensor, global_len: Tensor, scale: float) -> Tensor:
    """decode_attention_ref run eagerly: the lengths read on the host, then each (batch row, KV head) over exactly
    the keys it holds, its ring's first ring_len and its store's pages gathered (an index_select) and cut to its
    length, in matrix products of two dimensions. The gate admits very unequally across a layer's heads (SmolLM2's
    default gate at 8k: one head of a layer 7,906 tokens, the others 1,107 and 1,082), so padding every head to the
    longest, as attention_padded does, reads about twice the stored keys and masks them; this way a SmolLM2 layer's
    eager decode attention at 8k took a quarter to half the time where its stores are long, and about the same at
    1k (1 thread, BENCHMARKS.md). The operations grow with B * Hkv: a batch of four prompts runs four times the
    loop, and decoded 9% slower than padded (one run each, BENCHMARKS.md)."""
    B, Hkv, _ = page_table.shape
    Hq, (P, D) = q.shape[1], pool_k.shape[1:]
    G = Hq // Hkv
    ring_lens, lengths = ring_len.expand(B).tolist(), global_len.tolist()      # host reads: eager only
    qg = float32(q).view(B, Hkv, G, D)
    ring = qg @ float32(ring_k).transpose(-1, -2)                  # (B, Hkv, G, W); each row reads its first ring_len
    out = torch.empty(B, Hkv, G, D, dtype=torch.float32, device=q.device)
    # Each head's tensors as views from unbind, one call a row for all its heads (an index is a call a tensor).
    per_row = (x.unbind(0) for x in (qg, ring, float32(ring_v), page_table, out))
    for r, row, *heads in zip(ring_lens, lengths, *per_row):
        for n, q_h, ring_h, ring_v_h, table_h, out_h in zip(row, *(x.unbind(0) for x in heads)):
            pages = table_h[:pages_for(n, P)]                                                  # (pages,)
            keys = take(pool_k, pages).flatten(0, 1)[:n]                                       # (n, D)
            values = take(pool_v, pages).flatten(0, 1)[:n]                                     # (n, D)
            scores = torch.cat((ring_h[:, :r], q_h @ float32(keys).t()), dim=-1).mul_(scale)   # (G, r + n)
            weights = torch.softmax(scores, dim=-1)                # no key at all: (G, 0), and the products give 0
            # The store's weights rounded to its dtype, as the Triton kernel rounds them.
            stored = rounded(weights[:, r:], pool_v.dtype) @ float32(values)                   # (G, D)
            torch.addmm(stored, weights[:, :r], ring_v_h[:r], out=out_h)
    return out.view(B, Hq, D).to(q.dtype)


def attention_padded(q: Tensor, ring_k: Tensor, ring_v: Tensor, ring_len: Tensor,
                     pool_k: Tensor, pool_v: Tensor, page_table: Tensor, global_len: Tensor, scale: float) -> Tensor:
    """decode_attention_ref compiled: every head at once over the pages of the longest store, one graph for every
    length (pages_in_use: a symbolic size on a CPU, every column on a GPU); a store slot past its head's length
    is masked. Compiled for a CPU, the two products over the store read the pool in place: a product-sum over
    the rows picked from the pool is one fused loop over the keys (0.99 ms against 1.82 ms gathered first, one
    SmolLM2 layer at 1,792 stored tokens, BENCHMARKS.md), the values an embedding bag."""
    B, Hkv, M = page_table.shape
    Hq, W, (P, D) = q.shape[1], ring_k.shape[2], pool_k.shape[1:]
    # At least two slots where there are two, so that compiled code knows the keys are not one row (a layout
    # question Inductor asks, which it cannot answer of a data-dependent size).
    G, n = Hq // Hkv, pages_in_use(global_len, P, M, at_least=min(pages_for(2, P), M))
    S, pages = n * P, page_table[:, :, :n]                                                   # (B, Hkv, n) pages in use
    qg = float32(q).view(B, Hkv, G, D)
    ring = qg @ float32(ring_k).transpose(-1, -2)                                             # (B, Hkv, G, W)
    stored = (qg[:, :, :, None] * float32(gather_store(pool_k, pages, n))[:, :, None]).sum(-1)   # (B, Hkv, G, S)
    # Key j of the W + S is seen if it is a ring slot below ring_len or a store slot below global_len.
    j = torch.arange(W + S, device=q.device)
    ends = torch.where(j < W, ring_len.expand(B)[:, None, None], W + global_len[..., None])  # (B, Hkv, W + S)
    hidden = (j >= ends)[:, :, None]                                                         # (B, Hkv, 1, W + S)
    scores = torch.cat((ring, stored), dim=-1).mul_(scale).masked_fill_(hidden, float("-inf"))
    # A head that sees no key (its softmax: NaN) gets weights 0.
    weights = torch.softmax(scores, dim=-1).masked_fill_(hidden.all(-1, keepdim=True), 0.0)  # (B, Hkv, G, W + S)
    o_store = store_values(weights[..., W:], pool_v, pages)                                 # (B, Hkv, G, D)
    # The ring's weights copied out (G x W values): a slice of the data-dependent W + S row would leave Inductor a
    # stride it cannot read when B * Hkv is 1 (one KV head, as under tensor parallelism).
    o = torch.baddbmm(o_store.view(B * Hkv, G, D), weights[..., :W].contiguous().view(B * Hkv, G, W),
                      float32(ring_v).reshape(B * Hkv, W, D))                                # (B*Hkv, G, D)
    return o.view(B, Hq, D).to(q.dtype)


def store_values(weights: Tensor, pool_v: Tensor, pages: Tensor) -> Tensor:
    """Attention weights (B, Hkv, G, n * P) float32 over each head's pages (B, Hkv, n) times their values, the weights
    rounded to the store's dtype first, as the Triton kernel rounds them: (B, Hkv, G, D) float32. An embedding bag: a
    gather-reduce over the pool's rows, in place."""
    B, Hkv, G, S = weights.shape
    P, D = pool_v.shape[1:]
    rows = (pages[..., None] * P + torch.arange(P, device=pages.device)).flatten(2)           # (B, Hkv, S) pool rows
    bags = rows[:, :, None].expand(B, Hkv, G, S).reshape(B * Hkv * G, S)                      # (B*Hq, S) V rows per query
    o = F.embedding_bag(bags, pool_v.view(-1, D), mode="sum",
                        per_sample_weights=weights.reshape(B * Hkv * G, S).to(pool_v.dtype))   # (B*Hq, D)
    return float32(o.view(B, Hkv, G, D))


# Split-K over a fixed grid: the keys of all heads (ring, then global store) are cut into tiles
# of BLOCK_N, the tiles of all (batch, KV head) pairs are laid end to end and every program takes
# the same number of consecutive tiles, whatever the lengths, read on the device. A program emits
# one partial result (o, lse) per head its tiles touch; a second kernel merges each head's partials.

@triton.jit
def _decode_schedule(RLEN, GLEN, BH, HKV: tl.constexpr, BLOCK_N: tl.constexpr, BH_PAD: tl.constexpr, n_programs):
    """Tiles per head (its row's ring tiles, then its global tiles) and tiles per program."""
    lanes = tl.arange(0, BH_PAD)
    ring_len = tl.load(RLEN + lanes // HKV, mask=lanes < BH, other=0).to(tl.int32)        # (BH_PAD,) per batch row
    glen = tl.load(GLEN + lanes, mask=lanes < BH, other=0).to(tl.int32)
    tiles = tl.where(lanes < BH, tl.cdiv(ring_len, BLOCK_N) + tl.cdiv(glen, BLOCK_N), 0)     # (BH_PAD,)
    per_program = tl.maximum(tl.cdiv(tl.sum(tiles, 0), n_programs), 1)
    return lanes, tiles, per_program


@triton.jit
def _decode_split_kernel(Q, RK, RV, RLEN, PK, PV, TABLE, GLEN, PART_O, PART_LSE,
                         stride_qb, stride_qh, stride_rb, stride_rh, stride_rt, stride_tb, stride_th,
                         qk_scale, BH,
                         HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                         PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BH_PAD: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    qk_scale = tl.cast(qk_scale, tl.float32)
    lanes, tiles, per_program = _decode_schedule(RLEN, GLEN, BH, HKV, BLOCK_N, BH_PAD, n_programs)
    first_tile = pid * per_program
    rows = tl.arange(0, G_PAD)                        # the group's query heads, padded to a dot-sized tile
    d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    head_start = 0
    for bh in range(0, BH):
        n_tiles = tl.sum(tl.where(lanes == bh, tiles, 0), 0)
        lo = tl.maximum(first_tile - head_start, 0)              # this program's tiles of head bh: [lo, hi)
        hi = tl.minimum(first_tile + per_program - head_start, n_tiles)
        if lo < hi:
            b = tl.cast(bh // HKV, tl.int64)
            h = bh % HKV
            ring_len = tl.load(RLEN + b).to(tl.int32)
            ring_tiles = tl.cdiv(ring_len, BLOCK_N)
            q = tl.load(Q + b * stride_qb + (h * G + rows)[:, None] * stride_qh + d[None, :],
                        mask=(rows < G)[:, None], other=0.0)                                   # (G_PAD, D)
            m_i = tl.full([G_PAD], -1.0e30, tl.float32)
            l_i = tl.zeros([G_PAD], tl.float32)
            acc = tl.zeros([G_PAD, D], tl.float32)
            ring_k = RK + b * stride_rb + h * stride_rh
            ring_v = RV + b * stride_rb + h * stride_rh
            for tile in range(lo, tl.minimum(hi, ring_tiles)):
                j = tile * BLOCK_N + offs_n
                ok = j < ring_len
                k = tl.load(ring_k + j[:, None] * stride_rt + d[None, :], mask=ok[:, None], other=0.0)
                v = tl.load(ring_v + j[:, None] * stride_rt + d[None, :], mask=ok[:, None], other=0.0)
                acc, l_i, m_i = _attend(acc, l_i, m_i, q, k, v, ok[None, :], qk_scale, True, UPCAST, PRECISION)
            table = TABLE + b * stride_tb + h * stride_th
            glen = tl.load(GLEN + bh).to(tl.int32)
            for tile in range(tl.maximum(lo, ring_tiles), hi):
                j = (tile - ring_tiles) * BLOCK_N + offs_n
                ok = j < glen
                row = tl.load(table + j // PAGE, mask=ok, other=0) * PAGE + j % PAGE             # (BLOCK_N,) pool rows
                k = tl.load(PK + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
                v = tl.load(PV + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
                acc, l_i, m_i = _attend(acc, l_i, m_i, q, k, v, ok[None, :], qk_scale, True, UPCAST, PRECISION)
            # Every tile holds at least one key, so l_i >= 1.
            part = (bh * n_programs + pid) * G + rows                                          # (G_PAD,)
            tl.store(PART_O + part[:, None] * D + d[None, :], acc / l_i[:, None], mask=(rows < G)[:, None])
            tl.store(PART_LSE + part, m_i + tl.log2(l_i), mask=rows < G)
        head_start += n_tiles


@triton.jit
def _decode_merge_kernel(PART_O, PART_LSE, RLEN, GLEN, OUT, stride_ob, stride_oh, BH,
                         HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                         BLOCK_N: tl.constexpr, BH_PAD: tl.constexpr, N_PROGRAMS):
    bh = tl.program_id(0)
    lanes, tiles, per_program = _decode_schedule(RLEN, GLEN, BH, HKV, BLOCK_N, BH_PAD, N_PROGRAMS)
    head_start = tl.sum(tl.where(lanes < bh, tiles, 0), 0)
    n_tiles = tl.sum(tl.where(lanes == bh, tiles, 0), 0)
    first = head_start // per_program                          # the programs that hold a partial of this head
    end = tl.where(n_tiles > 0, (head_start + n_tiles - 1) // per_program + 1, first)
    rows = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    m_i = tl.full([G_PAD], -1.0e30, tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for p in range(first, end):
        part = (bh * N_PROGRAMS + p) * G + rows
        lse = tl.load(PART_LSE + part, mask=rows < G, other=-1.0e30)
        o = tl.load(PART_O + part[:, None] * D + d[None, :], mask=(rows < G)[:, None], other=0.0)
        m_new = tl.maximum(m_i, lse)
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha[:, None] + o * w[:, None]
        l_i = l_i * alpha + w
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]              # a head with no keys at all gives 0, as the reference
    b = tl.cast(bh // HKV, tl.int64)
    h = bh % HKV
    tl.store(OUT + b * stride_ob + (h * G + rows)[:, None] * stride_oh + d[None, :], out, mask=(rows < G)[:, None])


@triton_op("wgkv::decode_attention", mutates_args=())
def decode_attention(q: Tensor, ring_k: Tensor, ring_v: Tensor, ring_len: Tensor,
                     pool_k: Tensor, pool_v: Tensor, page_table: Tensor, global_len: Tensor, scale: float) -> Tensor:
    """decode_attention_ref as split-K flash decoding: two launches of fixed grids, whatever the lengths.

    The grid depends on shapes and the device only, so a CUDA graph replays it; lengths and page
    tables are read by the kernels. Heads whose lengths differ by 100x cost the programs the same:
    work is cut into equal runs of tiles across all heads, not into a fixed number of splits per head.
    """
    tiles = launch_tiles("decode", q.device, q.dtype, q.shape[-1])
    return decode_attention_tiled(q, ring_k, ring_v, ring_len, pool_k, pool_v, page_table, global_len, scale, tiles)


def decode_attention_tiled(q: Tensor, ring_k: Tensor, ring_v: Tensor, ring_len: Tensor, pool_k: Tensor,
                           pool_v: Tensor, page_table: Tensor, global_len: Tensor, scale: float, tiles: dict) -> Tensor:
    """The decode kernels with the given tiles (GPU_TILES' decode keys)."""
    q, ring_k, ring_v = (_rows(x) for x in (q, ring_k, ring_v))
    B, Hq, D = q.shape
    ring_len = ring_len.expand(B).contiguous()                                              # (B,) one per batch row
    Hkv = ring_k.shape[1]
    G = Hq // Hkv
    assert ring_k.stride() == ring_v.stride(), "the ring's k and v must share a layout"
    assert pool_k.is_contiguous() and pool_v.is_contiguous() and page_table.stride(-1) == 1 and global_len.is_contiguous()
    tiles = dict(tiles)
    multiprocessors = device_limits(q.device).multiprocessors if q.device.type == "cuda" else 1
    n_programs = tiles.pop("programs_per_sm") * multiprocessors
    shape = dict(HKV=Hkv, G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=tiles.pop("BLOCK_N"),
                 BH_PAD=triton.next_power_of_2(B * Hkv))
    part_o = torch.empty(B * Hkv, n_programs, G, D, dtype=torch.float32, device=q.device)   # (B*Hkv, P, G, D)
    part_lse = torch.empty(B * Hkv, n_programs, G, dtype=torch.float32, device=q.device)    # (B*Hkv, P, G)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)                              # (B, Hq, D)
    _launch(_decode_split_kernel)[(n_programs,)](
        q, ring_k, ring_v, ring_len, pool_k, pool_v, page_table, global_len, part_o, part_lse,
        q.stride(0), q.stride(1), ring_k.stride(0), ring_k.stride(1), ring_k.stride(2),
        page_table.stride(0), page_table.stride(1), scale * LOG2E, B * Hkv,
        PAGE=pool_k.shape[1], **shape, **_dot_options(q), **tiles)
    _launch(_decode_merge_kernel)[(B * Hkv,)](
        part_o, part_lse, ring_len, global_len, out, out.stride(0), out.stride(1), B * Hkv,
        **shape, N_PROGRAMS=n_programs)
    return out


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
    "triton": AttentionOps(compact_admitted, gated_prefill_attention, store_admitted, decode_attention, promote),
}
