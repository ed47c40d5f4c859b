"""Static KV caches. Each is a module per layer, called by the attention as

    cache(q, k, v, g, input_pos) -> (B, Hq, T, D)

q: (B, Hq, T, D); k, v: (B, Hkv, T, D) with k after RoPE; g: (B, Hkv, T) admission scores or None;
input_pos: (T,) consecutive positions p..p+T-1, shared by the batch rows. Every call appends T >= 1 tokens
to a cache that holds positions 0..p-1 (p = 0: a new sequence): T > 1 is a prefill, a prefill chunk or a new
turn of a conversation (eager, host reads allowed); T == 1 is the decode step (no host sync, compiled
fullgraph), where input_pos may also be (B, 1), each row at its own position. Rows of different lengths are
appended one at a time through one_row(). Buffers are allocated once, lengths live on the device.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import kernels
from kernels import float32
from pages import (PagePool, dynamic_sizes, gather_store, pages_for, pages_in_use, pool_rows, reads_host, release_pages,
                   summarize_pages, take)


@contextlib.contextmanager
def one_row(caches: list[nn.Module], row: int):
    """Every cache as its batch row `row` alone (B = 1 views of its per-row buffers; a page pool stays shared),
    to append one prompt of a batch whose prompts differ in length. An Eviction then makes room among that
    row's stores only; its decode-time passes see every row."""
    saved = [{name: getattr(c, name) for name in c.batch_buffers if hasattr(c, name)} for c in caches]
    try:
        for c, buffers in zip(caches, saved):
            for name, buf in buffers.items():
                setattr(c, name, buf[row:row + 1])
        yield
    finally:
        for c, buffers in zip(caches, saved):
            for name, buf in buffers.items():
                setattr(c, name, buf)


class DenseCache(nn.Module):
    """The baseline: every token's K/V is kept, gpt-fast style."""

    batch_buffers = ("k_cache", "v_cache")

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
        B, T = q.shape[0], q.shape[2]
        if T > 1:
            self.k_cache.index_copy_(2, input_pos, k)
            self.v_cache.index_copy_(2, input_pos, v)
            end = int(input_pos[-1]) + 1     # host read: an append of several tokens, never the decode step
            if end == T:    # a new sequence: the new tokens are all there is
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            if q.device.type == "cpu":
                start = end - T
                return attend_after(q, self.k_cache[:, :, :start], self.v_cache[:, :, :start], k, v, self.scale)
            visible = self.positions[None, :end] <= input_pos[:, None]                            # (T, end)
            return F.scaled_dot_product_attention(q, self.k_cache[:, :, :end], self.v_cache[:, :, :end],
                                                  attn_mask=visible, enable_gqa=True)
        pos = input_pos.expand(B, 1)[:, 0]                                                      # (B,) each row's position
        rows = torch.arange(B, device=pos.device)
        self.k_cache[rows, :, pos] = k[:, :, 0]
        self.v_cache[rows, :, pos] = v[:, :, 0]
        if q.device.type == "cpu":
            # The write-gated store's partial attention over the filled slots 0..p: on a CPU it reads only
            # those, and compiled it is plain tensor code for Inductor, where the fused SDPA kernel took
            # about a third of a compiled SmolLM2 step at 1k tokens (one query, a mask over every slot).
            o = kernels.prefix_attention(q[:, :, 0], self.k_cache, self.v_cache, (pos + 1)[:, None], self.scale)
            return o[:, :, None].to(q.dtype)                                                          # (B, Hq, 1, D)
        visible = self.positions[None, :] <= pos[:, None]                                           # (B, S)
        return F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=visible[:, None, None],
                                              enable_gqa=True)

    def bytes_allocated(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    def bytes_per_token(self) -> int:
        """K and V of one token of one (batch, KV head), as WriteGatedCache.bytes_per_token."""
        return 2 * self.k_cache.shape[-1] * self.k_cache.element_size()


def attend_after(q: Tensor, k_held: Tensor, v_held: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """T new tokens' causal attention over the P keys before them and over themselves, on a CPU.

    q: (B, Hq, T, D); k_held, v_held: (B, Hkv, P, D); k, v: (B, Hkv, T, D). The CPU's fused attention with a
    (T, P + T) mask computes every masked score; two unmasked calls (the held keys, all visible; the chunk,
    causal) merged by their lse skip them: one 16k-token chunk of 2048 took 1.83 s against 2.13 s (one
    SmolLM2 layer, one thread, an ad-hoc script).
    """
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    # A KV head's G query heads all see every held key: fold them into the query length instead of copying
    # the held keys G times; the chunk's own keys are few, so those are copied for the causal call.
    o_held, lse_held = kernels.attention_lse(q.reshape(B, -1, G * T, D), k_held, v_held, scale)
    o_new, lse_new = kernels.attention_lse(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), scale, causal=True)
    o, _ = kernels.merge_attention(o_held.reshape(B, Hq, T, D), lse_held.reshape(B, Hq, T), o_new, lse_new)
    return o.to(q.dtype)                                                                             # (B, Hq, T, D)


def may_promote(admitted: Tensor) -> bool:
    """Whether a decode step's promotion may have work: False only where no head admits its leaving token, and only
    where reading that flag is free (pages.reads_host: eager, on a CPU). Most steps admit nothing in most layers
    (the default gate admits about a fifth of the tokens), and promotion with nothing admitted changes nothing, so
    the eager step skips its ~60 small operations there. Compiled, or on a GPU, the step never reads the device and
    always promotes (a head that admits nothing writes only the scratch page)."""
    return not reads_host(admitted) or bool(admitted.any())


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The kernels.BACKENDS name to use: 'auto' is Triton on CUDA, else the PyTorch reference."""
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    if backend not in kernels.BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (available: auto, {', '.join(kernels.BACKENDS)})")
    return backend



class WriteGatedCache(nn.Module):
    """Write-Gated KV: a ring of the last W tokens and a paged global store of the admitted older ones.

    A token sits in ring slot pos % W for W steps (an empty slot has g = -1). When it leaves the ring it
    enters its (batch, KV head)'s global store if g > tau, else it is dropped; an append of several tokens
    does this at once for those that end up older than the last W. So a query sees exactly the keys of the DESIGN.md
    visibility rule: the ring (i - j < W) and the store (g_j > tau). The store's tokens live in pages of a
    PagePool (shared by all layers, or the cache's own, sized for `capacity` per head, when none is given),
    through a page table per head; lengths are device tensors. A head holds at most `capacity` tokens,
    rounded up to whole pages. When a head cannot take a page (its capacity, or the pool, is exhausted),
    an admitted token replaces the head's lowest-g entry if its g is higher: counted in `n_capacity_drops`.

    Selection (select_pages k > 0, on a pool with summaries): a decode step reads the ring and at most k pages
    of each head's store, chosen by their summaries (select, DESIGN.md's Selection); an append of several
    tokens reads the whole store.
    """

    batch_buffers = ("ring_k", "ring_v", "ring_g", "page_table", "global_len", "n_left", "n_admitted",
                     "n_capacity_drops", "n_evicted", "n_decoded", "n_scored", "n_read", "recent_q", "recent_pos")

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, window: int, threshold: float,
                 capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu", backend: str = "torch",
                 pool: PagePool | None = None, page_size: int = 16, observe: int = 0, n_heads: int = 0,
                 select_pages: int = 0):
        super().__init__()
        self.window, self.threshold = window, threshold
        self.backend = resolve_backend(backend, device)
        self.ops = kernels.BACKENDS[self.backend]
        self.scale = head_dim ** -0.5
        B, H, W, D = batch_size, n_kv_heads, window, head_dim
        if capacity < 1:
            raise ValueError(f"global capacity {capacity} must be at least 1")
        if pool is None:
            pool = PagePool(B * H * pages_for(capacity, page_size), page_size, head_dim, dtype, device)
        self.pool = pool
        M = pages_for(capacity, pool.page_size)
        if select_pages < 0 or (select_pages and not pool.summaries):
            raise ValueError(f"selecting {select_pages} pages needs a count >= 0 and a page pool with summaries")
        # A budget of at least the whole table reads every page in order: the same as no selection.
        self.select_pages = min(select_pages, M)

        def buffer(name, shape, dtype, fill=0.0):
            self.register_buffer(name, torch.full(shape, fill, dtype=dtype, device=device), persistent=False)

        buffer("ring_k", (B, H, W, D), dtype)
        buffer("ring_v", (B, H, W, D), dtype)
        buffer("ring_g", (B, H, W), torch.float32, -1.0)
        buffer("page_table", (B, H, M), torch.int64, pool.n_pages)                      # (B, Hkv, M) all scratch
        buffer("global_len", (B, H), torch.int64)
        # Statistics, read once at the end: tokens that left the ring, how many of them had g > tau,
        # and how many of those the capacity rule threw away (rejected, or evicted for a higher g).
        buffer("n_left", (B, H), torch.int64)
        buffer("n_admitted", (B, H), torch.int64)
        buffer("n_capacity_drops", (B, H), torch.int64)
        buffer("n_evicted", (B, H), torch.int64)
        # Decode steps, the store's pages scored (selection) and the tokens attended (ring and store) over them.
        buffer("n_decoded", (B, H), torch.int64)
        buffer("n_scored", (B, H), torch.int64)
        buffer("n_read", (B, H), torch.int64)
        # SnapKV eviction (evict) scores the store by the attention of the last `observe` queries: they are
        # kept in a ring of their own, with their positions (-1: empty).
        self.observe = observe
        self.eviction = None    # the Eviction serving this cache's pool, if any (it sets itself here)
        if observe:
            buffer("recent_q", (B, n_heads, observe, D), dtype)
            buffer("recent_pos", (B, observe), torch.int64, -1)
        dynamic_sizes((self.page_table, 2))

    @property
    def capacity(self) -> int:
        """Tokens a head may hold: whole pages, read off the page table so that compiled code sees a dynamic size."""
        return self.page_table.shape[-1] * self.pool.page_size

    def store(self) -> tuple[Tensor, ...]:
        """The paged store as the kernels take it: pool K, V, g, free stack and count, page table, lengths."""
        p = self.pool
        return p.k, p.v, p.g, p.free_pages, p.n_free, self.page_table, self.global_len

    def reset(self) -> None:
        """Empty the cache for the next sequence, giving its pages back to the pool (an append at position 0
        does this itself; a decode step never does)."""
        release_pages(self.pool.free_pages, self.pool.n_free, self.page_table, self.global_len, self.pool.page_size)
        self.ring_g.fill_(-1.0)
        for name in ("n_left", "n_admitted", "n_capacity_drops", "n_evicted", "n_decoded", "n_scored", "n_read"):
            getattr(self, name).zero_()
        if self.observe:
            self.recent_pos.fill_(-1)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, input_pos: Tensor) -> Tensor:
        if q.shape[2] > 1:
            return self.append(q, k, v, g, input_pos)
        return self.decode(q, k, v, g, input_pos)

    def held_sequence(self, start: int) -> tuple[Tensor, Tensor, Tensor, int]:
        """What the cache holds before position `start`, as one key sequence: the store's slots (admitted, all
        at least W + 1 behind `start`), then the ring's tokens in position order. Returns k, v (B, Hkv, L + R, D),
        g (B, Hkv, L + R) float32 (-1 on a store slot past its head's length, so nobody sees it) and R."""
        R = min(start, self.window)
        ring = torch.arange(start - R, start, device=self.ring_g.device) % self.window        # (R,) slots, oldest first
        L = int(self.global_len.max()) if start > self.window else 0                           # host read: not decode
        k_store, v_store, g_store = (x[:, :, :L] for x in self.store_contents(pages_for(L, self.pool.page_size)))
        g_store = self.where_stored(g_store, -1.0)
        return (torch.cat((k_store, self.ring_k[:, :, ring]), dim=2), torch.cat((v_store, self.ring_v[:, :, ring]), dim=2),
                torch.cat((g_store.float(), self.ring_g[:, :, ring]), dim=2), R)

    def append(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, input_pos: Tensor) -> Tensor:
        """T tokens at positions p..p+T-1 into a cache that holds positions 0..p-1 (p = 0: a new sequence, the
        cache starts afresh): a prefill, a chunk of one, or a new turn of a conversation.

        The new tokens attend to the store, the ring and each other under the visibility rule, as one causal
        gated attention whose keys are the held sequence followed by the chunk. Then the tokens older than the
        last W (from the ring and the chunk) leave: the admitted ones are appended to the store in position
        order, the others dropped; the last W tokens are in the ring. Eager (host reads), never the decode step.
        """
        T, W = q.shape[2], self.window
        start = int(input_pos[0])
        if start == 0:
            self.reset()
        held_k, held_v, held_g, R = self.held_sequence(start)                                  # (B, Hkv, L + R, ...)
        keys, values = torch.cat((held_k, k), dim=2), torch.cat((held_v, v), dim=2)             # (B, Hkv, L + R + T, D)
        idx, count = self.ops.compact_admitted(torch.cat((held_g, g.float()), dim=2), self.threshold, W)
        y = self.ops.gated_prefill_attention(q, keys, values, idx, count, W, self.scale)      # (B, Hq, T, D)

        # Leaving: the first R + T - W of the ring's and the chunk's tokens.
        L = held_g.shape[2] - R
        recent_k, recent_v, recent_g = keys[:, :, L:], values[:, :, L:], torch.cat((held_g[:, :, L:], g.float()), dim=2)
        idx, count = self.ops.compact_admitted(recent_g, self.threshold, W)                    # (B, Hkv, R + T), (B, Hkv)
        # Admitted tokens that do not fit (a head's capacity, or with an Eviction the pool) compete for the room.
        if self.eviction is not None:
            stored_idx, stored_count = self.eviction.make_room(self, q, recent_k, recent_g, idx, count, fresh=start == 0)
        else:
            stored_idx, stored_count = self.within_capacity(recent_g, idx, count)
        before = self.global_len.clone()
        self.ops.store_admitted(*self.store(), recent_k, recent_v, recent_g, stored_idx, stored_count)
        # The pages written: from the one that held the old last slot, as many as R + T tokens span, and one.
        P = self.pool.page_size
        self.summarize(before[..., None] // P + torch.arange(pages_for(R + T, P) + 1, device=before.device))
        self.n_left.add_((recent_g[:, :, :max(R + T - W, 0)] >= 0).sum(-1))
        self.n_admitted.add_(count)
        self.n_capacity_drops.add_(count - (self.global_len - before))
        last = slice(max(T - W, 0), T)
        slots = input_pos[last] % W                                                             # (min(T, W),)
        self.ring_k.index_copy_(2, slots, k[:, :, last])
        self.ring_v.index_copy_(2, slots, v[:, :, last])
        self.ring_g.index_copy_(2, slots, g[:, :, last].float())
        if self.observe:
            last = slice(max(T - self.observe, 0), T)
            self.recent_q.index_copy_(2, input_pos[last] % self.observe, q[:, :, last])
            self.recent_pos.index_copy_(1, input_pos[last] % self.observe, input_pos[last].expand(q.shape[0], -1))
        return y

    def within_capacity(self, g: Tensor, idx: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """Admitted tokens idx, count (compact_admitted over g (B, Hkv, S)) to append: where a head's store and
        they exceed its capacity, the highest-g of both stay (the rule of a one-shot prefill and of decode's
        promote, so any chunking keeps the same tokens). Returns those to store, as compact_admitted does."""
        if not bool((self.global_len + count > self.capacity).any()):                         # host read: not decode
            return idx, count
        pages = self.global_len.numel() * pages_for(self.capacity, self.pool.page_size)        # no pool limit
        contenders = self.with_candidates(self.where_stored(self.store_contents()[2]), g, idx, count)
        kept, = keep_highest([contenders], [self.capacity], pages, self.pool.page_size)
        # Displaced store tokens count as capacity drops, as promote's replacements do.
        return self.settle(kept, g, "n_capacity_drops")

    def with_candidates(self, held: Tensor, score: Tensor, idx: Tensor, count: Tensor) -> Tensor:
        """This store and the admitted candidates (idx, count over S tokens) as one store's scores for keep_highest:
        held (B, Hkv, C) scores the store's slots, score (B, Hkv, S) the candidates; -inf where a token is not one.
        Returns (B, Hkv, C + S), the store's slots first."""
        candidates = score.float().masked_fill(~admitted_by_position(idx, count), float("-inf"))
        return torch.cat((held, candidates), dim=-1)

    def settle(self, kept: Tensor, g: Tensor, counter: str = "n_evicted") -> tuple[Tensor, Tensor]:
        """Apply what keep_highest kept (B, Hkv, C + S) of with_candidates' scores: the store's tokens not kept are
        dropped (counted in `counter`). Returns the candidates kept (g: (B, Hkv, S)), to store, as compact_admitted
        gives them."""
        C = self.capacity
        self.drop(kept[..., :C], counter)
        return self.ops.compact_admitted(torch.where(kept[..., C:], g, -1.0), self.threshold, self.window)

    def where_stored(self, score: Tensor, empty: float = float("-inf")) -> Tensor:
        """score (B, Hkv, C) over the store's slots, with `empty` on each slot past its head's length."""
        return score.masked_fill(torch.arange(score.shape[-1], device=score.device) >= self.global_len[..., None], empty)

    def decode(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, input_pos: Tensor) -> Tensor:
        """One token per row at position p (each row its own): promote the token leaving slot p % W, write the
        new one there, attend."""
        (B, H, W, D), tau = self.ring_k.shape, self.threshold
        pos = input_pos.expand(B, 1)[:, 0]                                                     # (B,)
        # Each (row, head)'s slot p % W as a row of the flat ring (B*Hkv*W, ...): one index for every read and
        # write below, each an index_select or index_copy_ (pages.take), a few times cheaper eager than indexing.
        slots = torch.arange(0, B * H * W, W, device=pos.device).view(B, H) + (pos % W)[:, None]  # (B, Hkv)
        ring_k, ring_v, ring_g = self.ring_k.view(-1, D), self.ring_v.view(-1, D), self.ring_g.view(-1)
        g_out = take(ring_g, slots)                                                            # (B, Hkv)
        admitted = g_out > tau                                                                 # (B, Hkv)
        self.n_left.add_(g_out >= 0)                                                           # bools add as 0/1
        self.n_admitted.add_(admitted)
        if may_promote(admitted):
            before = self.global_len.clone()
            written = self.ops.promote(*self.store(), take(ring_k, slots), take(ring_v, slots), g_out, tau)  # (B, Hkv)
            self.summarize(written[..., None] // self.pool.page_size)                          # -1: the scratch page
            # An admitted token that did not lengthen the store either replaced an entry or was rejected:
            # either way one admitted token is gone.
            self.n_capacity_drops.add_(admitted & (self.global_len == before))
        # Written after the reads of the old slot above (Inductor keeps that order: the writes are in place).
        rows = slots.flatten()
        ring_k.index_copy_(0, rows, k.reshape(B * H, D))
        ring_v.index_copy_(0, rows, v.reshape(B * H, D))
        ring_g.index_copy_(0, rows, float32(g).reshape(B * H))
        if self.observe:
            batch = torch.arange(B, device=pos.device)
            self.recent_q[batch, :, pos % self.observe] = q[:, :, 0]
            self.recent_pos[batch, pos % self.observe] = pos
        ring_len = (pos + 1).clamp(max=W)                                                      # (B,)
        page_table, global_len = self.select(q[:, :, 0]) if self.select_pages else (self.page_table, self.global_len)
        self.n_decoded.add_(1)
        self.n_read.add_(ring_len[:, None] + global_len)
        y = self.ops.decode_attention(q[:, :, 0], self.ring_k, self.ring_v, ring_len,
                                      self.pool.k, self.pool.v, page_table, global_len, self.scale)  # (B, Hq, D)
        return y[:, :, None]

    def select(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Quest's selection of each head's store pages for the decode query q (B, Hq, D), after RoPE, unscaled.

        A page scores max over the head's query heads of sum_d max(q_d * kmax_d, q_d * kmin_d), in float32: an
        upper bound of the page's logits. A head holding at most k = select_pages pages keeps them all; else its
        partly filled last page (if any) and its highest-scored others (ties: the lower page), k in all. Returns
        their page table (B, Hkv, k) in store order and the tokens they hold (B, Hkv), the decode attention's
        page_table and global_len. No host sync where it would be a device sync; only the columns of the longest
        store are scored (pages_in_use: a host read on a CPU, all M compiled on a GPU), not the table sized for the
        whole context.
        """
        P, k = self.pool.page_size, self.select_pages
        B, Hkv, M = self.page_table.shape
        G, D = q.shape[1] // Hkv, q.shape[-1]
        M = pages_in_use(self.global_len, P, M, at_least=k)       # the columns of the longest store, at least k
        table = self.page_table[:, :, :M]                                                      # (B, Hkv, M)
        held = pages_for(self.global_len, P)                                                   # (B, Hkv)
        partial = self.global_len % P != 0                                                     # (B, Hkv) last page not full
        qg = q.float().view(B, Hkv, G, 1, D)
        kmin = take(self.pool.kmin, table).float()[:, :, None]                                 # (B, Hkv, 1, M, D)
        kmax = take(self.pool.kmax, table).float()[:, :, None]                                 # (B, Hkv, 1, M, D)
        score = torch.maximum(qg * kmax, qg * kmin).sum(-1).amax(2)                            # (B, Hkv, M)
        col = torch.arange(M, device=q.device)
        score = score.masked_fill(col >= held[..., None], float("-inf"))                       # no page there
        score = score.masked_fill((col == held[..., None] - 1) & partial[..., None], float("inf"))   # always kept
        # A stable sort puts the lower page first among equal scores; the chosen k go back to store order.
        chosen = score.sort(dim=-1, descending=True, stable=True).indices[..., :k].sort(dim=-1).values  # (B, Hkv, k)
        n = held.clamp(max=k)                                                                  # pages chosen
        length = torch.where(partial, (n - 1) * P + self.global_len % P, n * P)                # (B, Hkv)
        self.n_scored.add_(held)
        return table.gather(2, chosen), length

    def summarize(self, columns: Tensor) -> None:
        """Recompute the summaries of the pages at these page-table columns (B, Hkv, J), where the pool keeps them."""
        if self.pool.summaries:
            summarize_pages(self.pool, self.page_table, self.global_len, columns)

    def snapkv_scores(self, pooling: int) -> Tensor:
        """SnapKV's importance of every store slot (B, Hkv, C) (snapkv_importance): the attention the observed
        queries pay it, each query's softmax taken over the ring and the store, summed over the queries and the KV
        head's query heads, then max-pooled over `pooling` neighbouring slots. Empty slots score 0."""
        B, H, W, D = self.ring_k.shape
        k_store = self.store_contents()[0]                                                     # (B, Hkv, C, D)
        C = k_store.shape[2]
        Hq, O = self.recent_q.shape[1], self.observe
        q = self.recent_q.view(B, H, (Hq // H) * O, D)                                         # (B, Hkv, G*O, D)
        keys = torch.cat((self.ring_k, k_store), dim=2)                                        # (B, Hkv, W + C, D)
        stored = torch.arange(C, device=q.device) < self.global_len[..., None]                 # (B, Hkv, C)
        observed = (self.recent_pos >= 0).repeat(1, Hq // H)                                   # (B, G*O)
        visible = torch.cat((self.ring_g >= 0, stored), dim=-1)[:, :, None] & observed[:, None, :, None]  # (B, Hkv, G*O, W + C)
        return snapkv_importance(q, keys, visible, self.scale, pooling, skip=W)[..., :C].masked_fill(~stored, 0.0)

    def drop(self, kept: Tensor, counter: str = "n_evicted") -> None:
        """Keep only the stored tokens where kept (B, Hkv, C) is true: the survivors move up in their order,
        the pages left empty go back to the pool, and the others are counted in `counter`."""
        P, N = self.pool.page_size, self.pool.n_pages
        C = kept.shape[-1]
        slots = torch.arange(C, device=kept.device)
        kept = kept & (slots < self.global_len[..., None])                                     # (B, Hkv, C)
        keep = kept.sum(-1)                                                                    # (B, Hkv)
        order = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices                # survivors first, in order
        src = pool_rows(self.page_table, order, P)                                             # (B, Hkv, C)
        dst = torch.where(slots < keep[..., None], pool_rows(self.page_table, slots.expand_as(order), P), N * P)
        for rows in (self.pool.k.view(-1, self.pool.k.shape[-1]), self.pool.v.view(-1, self.pool.v.shape[-1]),
                     self.pool.g.view(-1)):
            rows[dst.flatten()] = rows[src.flatten()]
        getattr(self, counter).add_(self.global_len - keep)
        release_pages(self.pool.free_pages, self.pool.n_free, self.page_table, self.global_len, P, keep)
        self.summarize(torch.arange(self.page_table.shape[-1], device=kept.device).expand_as(self.page_table))

    def store_contents(self, n_pages: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The global store (its first n_pages pages per head, default all) as contiguous tensors: k, v
        (B, Hkv, C, D) and g (B, Hkv, C); slot s of a head holds a token for s < global_len, anything after."""
        M = self.page_table.shape[-1] if n_pages is None else n_pages
        return tuple(gather_store(x, self.page_table, M) for x in (self.pool.k, self.pool.v, self.pool.g))

    def counts(self) -> dict[str, Tensor]:
        """Per (batch, KV head) token counts, as device tensors (B, Hkv): read them after generation."""
        in_ring = (self.ring_g >= 0).sum(-1)
        return {
            "seen": self.n_left + in_ring,
            "held": self.global_len + in_ring,
            "admitted": self.n_admitted + (self.ring_g > self.threshold).sum(-1),
            "capacity_drops": self.n_capacity_drops,
            "evicted": self.n_evicted,
            "decoded": self.n_decoded,
            "scored": self.n_scored,
            "read": self.n_read,
        }

    def bytes_allocated(self) -> int:
        """The ring, the page table and the counters; the pool is counted once, apart (it is shared)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if not name.startswith("pool."))

    def bytes_per_token(self) -> int:
        """K and V of one token of one (batch, KV head)."""
        return 2 * self.ring_k.shape[-1] * self.ring_k.element_size()


def summed_counts(caches: list[WriteGatedCache], row: int | None = None) -> list[dict[str, Tensor]]:
    """Each cache's counts (WriteGatedCache.counts) summed over its KV heads and batch rows, or over the heads of
    batch row `row` alone: one dict of scalar device tensors per cache."""
    return [{name: (n if row is None else n[row]).sum() for name, n in c.counts().items()} for c in caches]


def allocated_bytes(caches: list[nn.Module]) -> int:
    """What a model's caches allocate: each layer's own buffers, and every page pool they draw on once."""
    pools = {id(c.pool): c.pool for c in caches if isinstance(c, WriteGatedCache)}
    return sum(c.bytes_allocated() for c in caches) + sum(p.bytes_allocated() for p in pools.values())


def snapkv_importance(q: Tensor, k: Tensor, visible: Tensor, scale: float, pooling: int, skip: int = 0) -> Tensor:
    """SnapKV's importance of keys: the attention the observed queries pay each, every query's softmax taken over
    the keys it sees, summed over the queries, then max-pooled over `pooling` neighbouring keys. q: (B, Hkv, N, D),
    the observed queries of each KV head's query heads; k: (B, Hkv, S, D); visible: bool, broadcast to
    (B, Hkv, N, S) (a query that sees no key adds nothing). The first `skip` keys take part in the softmax but
    are not scored. Returns (B, Hkv, S - skip) float32."""
    logits = (q.float() @ k.float().transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))  # (B, Hkv, N, S)
    score = torch.softmax(logits, dim=-1).nan_to_num(0.0)[..., skip:].sum(2)                          # (B, Hkv, S - skip)
    return F.max_pool1d(score, pooling, stride=1, padding=pooling // 2)


def prompt_snapkv_scores(q: Tensor, k: Tensor, scale: float, observe: int, pooling: int) -> Tensor:
    """SnapKV's importance of every key of a prompt (snapkv_importance): the attention the last `observe` queries
    pay it under the causal mask. q: (B, Hq, Tq, D), the queries of the last Tq of the keys k: (B, Hkv, T, D)
    (a prompt: Tq = T) -> (B, Hkv, T) float32."""
    B, Hq, Tq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    n = min(observe, Tq)
    qo = q[:, :, Tq - n:].reshape(B, Hkv, Hq // Hkv * n, D)                                     # (B, Hkv, G*n, D)
    pos = torch.arange(T, device=q.device)
    causal = (pos[None, :] <= pos[T - n:, None]).repeat(Hq // Hkv, 1)                           # (G*n, T)
    return snapkv_importance(qo, k, causal, scale, pooling)


def admitted_by_position(idx: Tensor, count: Tensor) -> Tensor:
    """(B, Hkv, S) bool: the positions that idx's first count entries (compact_admitted's form) name."""
    first = torch.arange(idx.shape[-1], device=idx.device) < count[..., None]                # (B, Hkv, S) in idx order
    return torch.zeros_like(first).scatter_(2, idx, first)


def keep_highest(scores: list[Tensor], capacity: list[int], pages: int, page_size: int) -> list[Tensor]:
    """Which tokens a pool of `pages` pages keeps when it keeps the highest-scored ones wherever they are.

    scores: one (B, Hkv, S) tensor per store, -inf where there is no token; capacity: the tokens one head of
    each store may hold. Taken in descending score (ties: earlier store, batch row, head, slot), every token
    is kept that fits: in a page its head already opened, or in a new one while pages are left.
    Returns one bool tensor per store, shaped as its scores. On the device, no host read.
    """
    device = scores[0].device
    heads = [s.shape[0] * s.shape[1] for s in scores]
    flat = torch.cat([s.flatten().float() for s in scores])                                    # (n,)
    head = torch.cat([torch.arange(h, device=device).add(sum(heads[:i])).repeat_interleave(s.shape[-1])
                      for i, (h, s) in enumerate(zip(heads, scores))])                         # (n,) global head id
    cap = torch.cat([torch.full((h,), c, device=device) for h, c in zip(heads, capacity)])    # (heads,)
    ranked, order = flat.sort(descending=True, stable=True)                                    # (n,)
    owner = head[order]
    by_head = owner.sort(stable=True).indices                                                  # sorted order, grouped by head
    start = owner.bincount(minlength=len(cap)).cumsum(0) - owner.bincount(minlength=len(cap))  # (heads,)
    rank = torch.empty_like(order)
    rank[by_head] = torch.arange(order.numel(), device=device) - start[owner[by_head]]         # (n,) rank within its head
    wanted = (ranked > float("-inf")) & (rank < cap[owner])
    opens = wanted & (rank % page_size == 0)                                                   # needs a page of its own
    used = opens.cumsum(0)                                                                     # pages taken up to here
    opener = by_head[start[owner] + rank - rank % page_size]                                   # the token that opened its page
    kept = torch.empty_like(wanted)
    kept[order] = wanted & (used[opener] <= pages)
    return [part.view_as(s) for part, s in zip(kept.split([h * s.shape[-1] for h, s in zip(heads, scores)]), scores)]


class Eviction:
    """--evict: what makes room in a model's page pool, shared by its layers' caches, when it runs short.

    - lowest-g: the admitted tokens with the lowest g anywhere in the pool give up their slots (keep_highest
      on g over every layer, batch row and head).
    - snapkv, the paper's composition with admission: tokens are scored by the attention the recent queries
      pay them (SnapKV, max-pooled); in decode every head gives up the `share` of its stored tokens scored
      lowest, in prefill the lowest-scored anywhere in the pool give way, as lowest-g's do.
    In a prefill (eager, host reads allowed) a layer whose admitted tokens do not fit makes room at once; its
    own candidates compete, so a new token lower than everything held is the one not stored. In decode the
    free count is read from the host once every `every` steps, never per token, and a pass runs when fewer
    pages are left than all heads could take in that many steps (the low-water mark); between passes a head
    without room keeps its highest-g tokens (WriteGatedCache).
    """

    def __init__(self, caches: list["WriteGatedCache"], policy: str = "lowest-g", every: int = 32,
                 share: float = 0.1, pooling: int = 7):
        if policy not in ("lowest-g", "snapkv"):
            raise ValueError(f"eviction policy {policy!r}: expected lowest-g or snapkv")
        if every < 1 or not 0 < share <= 1 or pooling < 1 or pooling % 2 == 0:
            raise ValueError(f"eviction needs every >= 1, 0 < share <= 1 and an odd pooling, not "
                             f"{every}, {share}, {pooling}")
        if policy == "snapkv" and not all(c.observe for c in caches):
            raise ValueError("snapkv eviction needs caches that keep their recent queries (observe > 0)")
        if len({id(c.pool) for c in caches}) != 1:
            raise ValueError("an Eviction serves caches that share one page pool")
        self.caches, self.policy, self.every, self.share, self.pooling = caches, policy, every, share, pooling
        self.pool = caches[0].pool
        heads = sum(c.global_len.numel() for c in caches)
        self.low_water = heads * pages_for(every, self.pool.page_size)
        self.passes = 0
        for cache in caches:
            cache.eviction = self

    def stored_scores(self, cache: "WriteGatedCache") -> Tensor:
        """(B, Hkv, C) the policy's score of every stored token of one cache, -inf where the slot is empty."""
        return cache.where_stored(cache.snapkv_scores(self.pooling) if self.policy == "snapkv" else
                                  cache.store_contents()[2])

    def after_step(self, step: int) -> None:
        """Call after decode step `step` (1, 2, ...): one host read every `every` steps, of the free count and
        of the pages the stores could still take (their page tables' free entries): a pool that can give
        every store all it may still take needs no pass, however low it runs."""
        if step % self.every:
            return
        P = self.pool.page_size
        claimable = sum((c.page_table.shape[-1] - pages_for(c.global_len, P)).sum() for c in self.caches)
        free, claimable = torch.stack((self.pool.n_free[0], claimable)).tolist()
        if free >= min(self.low_water, claimable):
            return
        if self.policy == "snapkv":
            for cache in self.caches:
                score = self.stored_scores(cache)                                              # (B, Hkv, C)
                keep = cache.global_len - torch.ceil(self.share * cache.global_len.double()).long()
                rank = score.argsort(dim=-1, descending=True, stable=True)
                slots = torch.arange(score.shape[-1], device=score.device)
                cache.drop(torch.zeros_like(score, dtype=torch.bool).scatter_(2, rank, slots < keep[..., None]))
        else:
            # Until the low-water mark is free again, but never more than half the pool in one pass.
            N = self.pool.n_pages
            pages = max(N - self.low_water, N // 2)
            scores = [self.stored_scores(c) for c in self.caches]
            for cache, kept in zip(self.caches, self.keep(self.caches, scores, pages)):
                cache.drop(kept)
        self.passes += 1

    def make_room(self, cache: "WriteGatedCache", q: Tensor, k: Tensor, g: Tensor, idx: Tensor, count: Tensor,
                  fresh: bool = True) -> tuple[Tensor, Tensor]:
        """An append to `cache`: idx, count (compact_admitted over g) are the admitted tokens of k (B, Hkv, S, D),
        the tokens leaving the ring, to be appended to its store; q are the new queries, the last of k's tokens.
        When their pages are not free, then in a new sequence (fresh: the cache's store just emptied) the layers
        after it, still holding the previous sequence, give theirs back; if that is not enough, the candidates
        compete with everything the pool holds of this sequence (this cache's own store included) by the
        policy's score. Returns the admitted tokens to store (idx, count as compact_admitted gives them)."""
        P = self.pool.page_size
        held = pages_for(cache.global_len, P)                                                  # (B, Hkv)
        need = int((pages_for((cache.global_len + count).clamp(max=cache.capacity), P) - held).sum())
        if need <= int(self.pool.n_free):
            return cache.within_capacity(g, idx, count)
        i = self.caches.index(cache)
        if fresh:
            for later in self.caches[i + 1:]:
                later.reset()
            if need <= int(self.pool.n_free):
                return cache.within_capacity(g, idx, count)
        own = prompt_snapkv_scores(q, k, cache.scale, cache.observe, self.pooling) if self.policy == "snapkv" else g
        others = self.caches[:i] if fresh else [c for c in self.caches if c is not cache]
        self.passes += 1
        # The cache's own store and its candidates compete as one store: its slots, then the candidates.
        contenders = cache.with_candidates(self.stored_scores(cache), own, idx, count)
        *kept_others, kept_own = self.keep([*others, cache], [*(self.stored_scores(c) for c in others), contenders],
                                           self.pool.n_pages)
        for other, kept in zip(others, kept_others):
            other.drop(kept)
        return cache.settle(kept_own, g)

    def keep(self, caches: list["WriteGatedCache"], scores: list[Tensor], pages: int) -> list[Tensor]:
        """keep_highest over the stores of these caches of the pool, scored by scores (one (B, Hkv, S) each), for
        `pages` pages: each head of a cache holds at most that cache's capacity."""
        return keep_highest(scores, [c.capacity for c in caches], pages, self.pool.page_size)
