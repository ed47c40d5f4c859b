"""The one append path: T >= 1 tokens into a cache that may already hold tokens (prefill chunks, new turns).

Chunked prefill must give the one-shot prefill's logits and the visibility-rule oracle (DESIGN.md)'s, for the dense and the
write-gated cache, both attention backends, GQA and MHA, and any chunking.
"""
import pytest
import torch
import torch.nn.functional as F

import gate
from cache import DenseCache, Eviction, PagePool, WriteGatedCache, attend_after
from generate import reset_caches
from test_gated_cache import oracle_logits, random_gates, setup_learned, tiny_model, visibility_mask

WINDOW = 8


def chunks_of(sizes: list[int] | int, total: int) -> list[int]:
    """Chunk lengths covering `total`: a fixed size repeated (the last one shorter), or the given sizes."""
    if isinstance(sizes, int):
        return [min(sizes, total - s) for s in range(0, total, sizes)]
    assert sum(sizes) == total
    return sizes


def feed(model, tokens: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Append the tokens (B, T) chunk by chunk from position 0; returns every position's logits (B, T, V)."""
    logits, start = [], 0
    reset_caches(model)   # a one-token first chunk is a decode step, which does not start afresh itself
    for n in sizes:
        logits.append(model(tokens[:, start:start + n], torch.arange(start, start + n)))
        start += n
    return torch.cat(logits, 1)


CHUNKINGS = [1, 7, WINDOW - 1, WINDOW, WINDOW + 1, [3, 20, 1, 2, 9, 5]]


@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("chunking", CHUNKINGS, ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunked_gated_prefill_equals_one_shot_and_oracle(n_kv_heads, chunking, backend):
    model = tiny_model(n_kv_heads)
    gates = random_gates(model)
    T = 40
    tokens = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(3))
    setup_learned(model, gates, WINDOW, T, page_size=3)
    for layer in model.layers:
        layer.attention.cache.ops = __import__("kernels").BACKENDS[backend]
    one_shot = model(tokens)
    stores_one_shot = [layer.attention.cache.store_contents() for layer in model.layers]
    counts_one_shot = [layer.attention.cache.counts() for layer in model.layers]
    chunked = feed(model, tokens, chunks_of(chunking, T))
    torch.testing.assert_close(chunked, one_shot, rtol=1e-4, atol=1e-4)
    # The caches end in the same state: the same admitted tokens in the stores, the same counts.
    for layer, (k1, v1, g1), counts in zip(model.layers, stores_one_shot, counts_one_shot):
        cache = layer.attention.cache
        k2, v2, g2 = cache.store_contents()
        n = cache.global_len
        for b in range(2):
            for h in range(n_kv_heads):
                torch.testing.assert_close(g1[b, h, :n[b, h]], g2[b, h, :n[b, h]])
                torch.testing.assert_close(k1[b, h, :n[b, h]], k2[b, h, :n[b, h]])
        for name, value in cache.counts().items():
            assert torch.equal(value, counts[name]), name
    stats = gate.admission_stats(model)
    assert 0.15 < stats["admitted_fraction"] < 0.85, stats   # both admission outcomes are exercised
    expected = oracle_logits(model, tokens, lambda g: visibility_mask(g, WINDOW, gate.DEFAULT_THRESHOLD))
    torch.testing.assert_close(chunked, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=str)
def test_chunked_dense_prefill_equals_one_shot(chunking):
    model = tiny_model(2)
    T = 40
    tokens = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(4))
    c = model.config
    model.setup_caches(lambda i: DenseCache(2, c.n_kv_heads, T, c.head_dim, torch.float32))
    one_shot = model(tokens)
    torch.testing.assert_close(feed(model, tokens, chunks_of(chunking, T)), one_shot, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_kv_heads", [2, 6], ids=["gqa", "mha"])
def test_dense_chunk_attention_is_the_masked_attention(n_kv_heads, dtype):
    """attend_after's two unmasked calls merged by lse give the attention under the (T, P + T) causal mask."""
    gen = torch.Generator().manual_seed(5)
    B, Hq, P, T, D = 2, 6, 11, 7, 16
    q = torch.randn(B, Hq, T, D, generator=gen).to(dtype)
    k, v = (torch.randn(B, n_kv_heads, P + T, D, generator=gen).to(dtype) for _ in range(2))
    visible = torch.arange(P + T)[None, :] <= torch.arange(P, P + T)[:, None]                     # (T, P + T)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=visible, enable_gqa=True)
    got = attend_after(q, k[:, :, :P], v[:, :, :P], k[:, :, P:], v[:, :, P:], D ** -0.5)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


def test_a_new_turn_sees_the_conversation_and_decodes_on():
    """Prefill, decode, then a second prompt appended mid-stream, then decode again: the oracle's logits."""
    model = tiny_model(2)
    gates = random_gates(model)
    setup_learned(model, gates, WINDOW, 60, page_size=3)
    tokens = torch.randint(0, 97, (2, 60), generator=torch.Generator().manual_seed(5))
    # 17 prompt tokens, 9 decoded one at a time, a turn of 13, 21 more one at a time.
    logits = feed(model, tokens, [17] + [1] * 9 + [13] + [1] * 21)
    expected = oracle_logits(model, tokens, lambda g: visibility_mask(g, WINDOW, gate.DEFAULT_THRESHOLD))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["lowest-g", "snapkv"])
def test_chunks_into_a_short_pool_stay_within_it(policy):
    """A pool too small for what the chunks admit: eviction makes room at each chunk, the pool ends full and
    never overdrawn, and every stored token is one the gate admitted. (Which ones each rule keeps is tested
    on prefill and decode in test_gated_cache.py; a chunk goes through the same keep_highest.)"""
    B, H, D, W, T, P = 2, 2, 8, 3, 48, 2
    pool = PagePool(10, P, D, torch.float32)
    caches = [WriteGatedCache(B, H, D, W, 0.3, 40, torch.float32, pool=pool, observe=4, n_heads=2 * H)
              for _ in range(3)]
    evictor = Eviction(caches, policy, every=4)
    torch.manual_seed(6)
    gs = [torch.rand(B, H, T) for _ in caches]
    q, k = torch.randn(B, 2 * H, T, D), torch.randn(B, H, T, D)
    for start in range(0, T, 12):
        for cache, g in zip(caches, gs):
            cache(q[:, :, start:start + 12], k[:, :, start:start + 12], k[:, :, start:start + 12],
                  g[:, :, start:start + 12], torch.arange(start, start + 12))
    held_pages = sum(int(((c.global_len + P - 1) // P).sum()) for c in caches)
    assert held_pages + int(pool.n_free) == pool.n_pages
    assert held_pages == pool.n_pages and evictor.passes > 0
    for c, g in zip(caches, gs):
        held = c.store_contents()[2]
        for b in range(B):
            for h in range(H):
                tokens = held[b, h, :c.global_len[b, h]]
                assert (tokens > 0.3).all()
                assert set(tokens.tolist()) <= set(g[b, h, :T - W].tolist())


@pytest.mark.parametrize("chunking", [1, 5, WINDOW + 1], ids=str)
def test_chunks_keep_the_highest_g_when_a_head_is_full(chunking):
    """A capacity per head below what the gate admits: every chunking, token by token included, keeps each
    head's highest-g admitted tokens, as a one-shot prefill does."""
    B, H, D, T, C = 2, 2, 8, 60, 6
    torch.manual_seed(7)
    g = torch.rand(B, H, T) + torch.linspace(0, 1, T)     # later tokens tend to be higher: an early-full store must yield
    q, k = torch.randn(B, 2 * H, T, D), torch.randn(B, H, T, D)

    def stored(sizes):
        cache = WriteGatedCache(B, H, D, WINDOW, 0.3, C, torch.float32, page_size=3)
        start = 0
        for n in sizes:
            cache(q[:, :, start:start + n], k[:, :, start:start + n], k[:, :, start:start + n], g[:, :, start:start + n],
                  torch.arange(start, start + n))
            start += n
        held = cache.store_contents()[2]
        return [sorted(held[b, h, :cache.global_len[b, h]].tolist()) for b in range(B) for h in range(H)], cache

    one_shot, _ = stored([T])
    chunked, cache = stored(chunks_of(chunking, T))
    assert chunked == one_shot
    best = [sorted(x for x in g[b, h, :T - WINDOW].tolist() if x > 0.3)[-C:] for b in range(B) for h in range(H)]
    assert one_shot == best
    counts = cache.counts()
    assert torch.equal(counts["capacity_drops"], cache.n_admitted - cache.global_len)
