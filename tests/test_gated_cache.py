"""WriteGatedCache against the visibility-rule oracle (DESIGN.md): dense attention under the visibility mask built from the g's."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gate
from cache import DenseCache, PagePool, WriteGatedCache, resolve_backend
from pages import DYNAMIC_CACHE_SIZES
from model import LlamaConfig, Transformer


def tiny_model(n_kv_heads: int, seed: int = 0, n_layers: int = 2) -> Transformer:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=n_kv_heads, intermediate_size=96)
    return Transformer(config).eval().requires_grad_(False)


def random_gates(model: Transformer, seed: int = 0) -> list[gate.WriteGate]:
    """Learned-gate stand-ins: random weights with a wide logit spread centred near tau = 0.1."""
    torch.manual_seed(seed)
    c = model.config
    gates = [gate.WriteGate(c.n_kv_heads, c.head_dim) for _ in range(c.n_layers)]
    with torch.no_grad():
        for g in gates:
            g.w2.mul_(20.0)
            g.b2.copy_(-2.2 + torch.empty_like(g.b2).uniform_(-1.0, 1.0))
    return [g.requires_grad_(False) for g in gates]


def visibility_mask(g: torch.Tensor, window: int, threshold: float) -> torch.Tensor:
    """DESIGN.md: query i sees key j iff j <= i and (i - j < W or g_j > tau). g: (B, Hkv, T) -> (B, Hkv, T, T)."""
    T = g.shape[-1]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (j <= i) & ((i - j < window) | (g[..., None, :] > threshold))


class MaskedAttention(nn.Module):
    """A cache-contract module for one full forward: SDPA under mask_of(g) -> (B or 1, Hkv or 1, T, T)."""

    def __init__(self, mask_of):
        super().__init__()
        self.mask_of = mask_of

    def forward(self, q, k, v, g, input_pos):
        mask = self.mask_of(g)
        mask = mask.repeat_interleave(q.shape[1] // k.shape[1], dim=1) if mask.shape[1] > 1 else mask  # (B, Hq, T, T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def generate(model: Transformer, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy: prefill, then `steps` decode steps. Returns the tokens fed (B, T0 + steps) and their logits."""
    T0 = prompt.shape[1]
    logits = [model(prompt, torch.arange(T0))]                                     # (B, T0, V)
    tokens = [prompt]
    for pos in range(T0, T0 + steps):
        tokens.append(logits[-1][:, -1:].argmax(-1))
        logits.append(model(tokens[-1], torch.tensor([pos])))
    return torch.cat(tokens, 1), torch.cat(logits, 1)


def oracle_logits(model: Transformer, tokens: torch.Tensor, mask_of) -> torch.Tensor:
    model.setup_caches(lambda i: MaskedAttention(mask_of))
    return model(tokens)


def setup_learned(model, gates, window, max_seq_len, batch_size=2, capacity=None, page_size=16):
    """Every layer's cache on one pool with room for every head's whole capacity."""
    gate.install(model, gates)
    c = model.config
    capacity = capacity or max(max_seq_len - window, 1)
    pool = PagePool(c.n_layers * batch_size * c.n_kv_heads * -(-capacity // page_size), page_size, c.head_dim,
                    torch.float32)
    model.setup_caches(lambda i: WriteGatedCache(batch_size, c.n_kv_heads, c.head_dim, window, gate.DEFAULT_THRESHOLD,
                                                 capacity, torch.float32, pool=pool))


@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("window", [1, 3, 8, 64])
@pytest.mark.parametrize("prompt_len", [5, 20])
@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_matches_visibility_oracle(n_kv_heads, window, prompt_len, page_size):
    """Prefill, then decode across page boundaries, batch rows that admit different amounts, one shared pool."""
    model = tiny_model(n_kv_heads)
    gates = random_gates(model)
    steps = 40
    setup_learned(model, gates, window, prompt_len + steps, page_size=page_size)
    prompt = torch.randint(0, 97, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    tokens, logits = generate(model, prompt, steps)
    stats = gate.admission_stats(model)
    assert 0.15 < stats["admitted_fraction"] < 0.85, stats   # both admission outcomes are exercised
    assert stats["capacity_drops"] == 0
    expected = oracle_logits(model, tokens, lambda g: visibility_mask(g, window, gate.DEFAULT_THRESHOLD))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", ["sink:3", "random:0.3"])
def test_policies_match_visibility_oracle(spec):
    model = tiny_model(2)
    window, steps = 4, 40
    gate.setup_write_gated(model, spec, batch_size=2, max_seq_len=12 + steps, dtype=torch.float32, device="cpu",
                           window=window)
    prompt = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    tokens, logits = generate(model, prompt, steps)
    expected = oracle_logits(model, tokens, lambda g: visibility_mask(g, window, gate.DEFAULT_THRESHOLD))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_full_policy_equals_dense_cache():
    model = tiny_model(2)
    prompt = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    c, steps = model.config, 30
    model.setup_caches(lambda i: DenseCache(2, c.n_kv_heads, 9 + steps, c.head_dim, torch.float32))
    dense_tokens, dense_logits = generate(model, prompt, steps)
    gate.setup_write_gated(model, "full", batch_size=2, max_seq_len=9 + steps, dtype=torch.float32, device="cpu", window=4)
    tokens, logits = generate(model, prompt, steps)
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-5, atol=1e-5)
    assert gate.admission_stats(model)["admitted_fraction"] == 1.0


def test_none_policy_equals_sliding_window():
    model = tiny_model(2)
    window, steps = 5, 30
    gate.setup_write_gated(model, "none", batch_size=2, max_seq_len=11 + steps, dtype=torch.float32, device="cpu",
                           window=window)
    prompt = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(4))
    tokens, logits = generate(model, prompt, steps)
    T = tokens.shape[1]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    band = ((j <= i) & (i - j < window))[None, None]                               # (1, 1, T, T)
    gate.install(model, None)
    torch.testing.assert_close(logits, oracle_logits(model, tokens, lambda g: band), rtol=1e-4, atol=1e-4)


def test_sink_policy_admits_exactly_the_first_tokens():
    model = tiny_model(2)
    gate.setup_write_gated(model, "sink:3", batch_size=2, max_seq_len=40, dtype=torch.float32, device="cpu", window=4)
    generate(model, torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(5)), 20)
    for layer in model.layers:
        cache = layer.attention.cache
        assert torch.equal(cache.global_len, torch.full((2, 2), 3))
        assert torch.equal(cache.counts()["admitted"], torch.full((2, 2), 3))


def run_capacity(cache, T0, steps, seed):
    """Feed random keys and gates; after prefill and after every decode step, the store must hold exactly
    the C highest-g tokens among the admitted ones that left the ring."""
    B, H, W, C = *cache.global_len.shape, cache.window, cache.capacity
    D = cache.ring_k.shape[-1]
    torch.manual_seed(seed)
    k = torch.randn(B, H, T0 + steps, D)
    g = torch.rand(B, H, T0 + steps)
    q = torch.randn(B, 2 * H, T0 + steps, D)

    def check(n_tokens):
        left = max(n_tokens - W, 0)
        stored_k, _, stored_g = cache.store_contents()
        for b in range(B):
            for h in range(H):
                gl = g[b, h, :left]
                admitted = (gl > cache.threshold).nonzero().flatten()
                best = admitted[gl[admitted].argsort(descending=True)[:C]]
                n = int(cache.global_len[b, h])
                assert n == len(best)
                # Every stored row is one of the best tokens' keys, and all of them are there.
                match = (stored_k[b, h, :n][:, None, :] == k[b, h, best][None, :, :]).all(-1)   # (n, len(best))
                assert match.any(1).all() and match.any(0).all()
                torch.testing.assert_close(stored_g[b, h, :n].sort().values, g[b, h, best].sort().values)

    cache(q[:, :, :T0], k[:, :, :T0], k[:, :, :T0], g[:, :, :T0], torch.arange(T0))
    check(T0)
    for p in range(T0, T0 + steps):
        cache(q[:, :, p:p + 1], k[:, :, p:p + 1], k[:, :, p:p + 1], g[:, :, p:p + 1], torch.tensor([p]))
        check(p + 1)


@pytest.mark.parametrize("page_size", [1, 3])
def test_capacity_keeps_highest_g(page_size):
    cache = WriteGatedCache(2, 2, 8, window=3, threshold=0.3, capacity=4, dtype=torch.float32, page_size=page_size)
    assert cache.capacity == (4 if page_size == 1 else 6)   # whole pages
    run_capacity(cache, T0=20, steps=25, seed=0)
    drops = cache.counts()["capacity_drops"]
    assert (drops > 0).all()
    # Every admitted token that left the ring is either stored or counted as dropped.
    assert torch.equal(cache.n_admitted, cache.global_len + drops)


@pytest.mark.parametrize("page_size", [1, 16])
def test_capacity_fills_during_decode(page_size):
    # A short prompt: the store starts nearly empty and fills, then evicts, during decode.
    cache = WriteGatedCache(2, 2, 8, window=2, threshold=0.3, capacity=5 if page_size == 1 else 16,
                            dtype=torch.float32, page_size=page_size)
    run_capacity(cache, T0=4, steps=30 if page_size == 1 else 45, seed=1)


def test_eager_decode_promotes_only_when_a_head_admits():
    # Eager on a CPU, a step whose leaving tokens no head admits skips promotion (cache.may_promote); the store
    # must still follow the rule (run_capacity's check, the compiled tests compare against the unskipped path).
    cache = WriteGatedCache(1, 2, 8, window=2, threshold=0.5, capacity=16, dtype=torch.float32, page_size=4)
    calls = []
    promote = cache.ops.promote
    cache.ops = cache.ops._replace(promote=lambda *args: calls.append(args[-2].clone()) or promote(*args))
    run_capacity(cache, T0=3, steps=20, seed=2)
    torch.manual_seed(2)
    torch.randn(1, 2, 23, 8)
    g = torch.rand(1, 2, 23)                                                       # run_capacity's g
    admitting = [(g[:, :, p - 2] > 0.5).any().item() for p in range(3, 23)]     # the token leaving at step p
    assert len(calls) == sum(admitting) and 0 < len(calls) < 20
    assert all((g_out > 0.5).any() for g_out in calls)


def pool_oracle(gs: list[torch.Tensor], T0: int, window: int, threshold: float, page_size: int, n_pages: int,
                max_pages: int) -> dict:
    """The stores a pool of n_pages should leave, by the plain rule applied token by token, layers in order
    and in each the heads in (batch, head) order: in prefill a head takes the pages its admitted tokens need
    while pages are left and keeps its highest-g tokens that fit; in decode a head whose last page is full
    takes a page if any is left, else the new token replaces the head's lowest-g entry if it is higher.
    gs: one (B, H, T) tensor of g per layer. Returns the stored g's per (layer, batch, head), sorted."""
    B, H, T = gs[0].shape
    free = n_pages
    stores, pages = {}, {}
    heads = [(i, b, h) for i in range(len(gs)) for b in range(B) for h in range(H)]
    for i, b, h in heads:
        admitted = [float(x) for x in gs[i][b, h, :max(T0 - window, 0)] if x > threshold]
        got = min(-(-len(admitted) // page_size), max_pages, free)
        free -= got
        pages[i, b, h] = got
        stores[i, b, h] = sorted(admitted, reverse=True)[:got * page_size]
    for leaving in range(max(T0 - window, 0), T - window):   # the decode step at position p promotes p - W
        for i, b, h in heads:
            x, store = float(gs[i][b, h, leaving]), stores[i, b, h]
            if x <= threshold:
                continue
            if len(store) == pages[i, b, h] * page_size and pages[i, b, h] < max_pages and free > 0:
                pages[i, b, h] += 1
                free -= 1
            if len(store) < pages[i, b, h] * page_size:
                store.append(x)
            elif store and x > min(store):
                store.remove(min(store))
                store.append(x)
    return {key: sorted(s) for key, s in stores.items()}


@pytest.mark.parametrize("page_size, n_pages", [(1, 9), (3, 4), (16, 1), (4, 0)])
def test_shared_pool_runs_out_as_the_rule_says(page_size, n_pages):
    """Two layers' caches on one small pool: pages go to heads in order while they last, a head without room
    keeps its highest-g tokens; an empty pool (0 pages) stores nothing and still attends to the ring."""
    B, H, D, W, T0, steps = 2, 2, 8, 3, 14, 30
    pool = PagePool(n_pages, page_size, D, torch.float32)
    caches = [WriteGatedCache(B, H, D, W, 0.3, 12, torch.float32, pool=pool) for _ in range(2)]
    torch.manual_seed(page_size)
    T = T0 + steps
    gs = [torch.rand(B, H, T) for _ in caches]
    q, k = torch.randn(B, 2 * H, T, D), torch.randn(B, H, T, D)
    for cache, g in zip(caches, gs):          # layer by layer, as the model's prefill runs
        cache(q[:, :, :T0], k[:, :, :T0], k[:, :, :T0], g[:, :, :T0], torch.arange(T0))
    for p in range(T0, T):
        for cache, g in zip(caches, gs):
            cache(q[:, :, p:p + 1], k[:, :, p:p + 1], k[:, :, p:p + 1], g[:, :, p:p + 1], torch.tensor([p]))
    expected = pool_oracle(gs, T0, W, 0.3, page_size, n_pages, -(-12 // page_size))
    for i, cache in enumerate(caches):
        _, _, stored_g = cache.store_contents()
        for b in range(B):
            for h in range(H):
                n = int(cache.global_len[b, h])
                assert sorted(stored_g[b, h, :n].tolist()) == pytest.approx(expected[i, b, h])
    assert sum(int(c.n_capacity_drops.sum()) for c in caches) > 0    # the pool did run out
    assert int(pool.n_free) == max(n_pages - sum(-(-int(c.global_len[b, h]) // page_size) for c in caches
                                                 for b in range(B) for h in range(H)), 0)
    # A new prompt gives every page back.
    for cache in caches:
        cache.reset()
    assert int(pool.n_free) == n_pages and sorted(pool.free_pages[:n_pages].tolist()) == list(range(n_pages))


def keep_highest_by_hand(scores: list[torch.Tensor], capacity: list[int], pages: int, page_size: int) -> list[set]:
    """cache.keep_highest's rule, token by token: in descending score (ties: store, row, head, slot) keep a
    token if its head is under its capacity and has room in its last page, or opens a page while one is left."""
    tokens = [(-float(s[b, h, t]), i, b, h, t) for i, s in enumerate(scores) for b in range(s.shape[0])
              for h in range(s.shape[1]) for t in range(s.shape[2]) if s[b, h, t] > float("-inf")]
    held, kept = {}, [set() for _ in scores]
    for _, i, b, h, t in sorted(tokens):
        n = held.get((i, b, h), 0)
        if n >= capacity[i]:
            continue
        if n % page_size == 0:
            if pages == 0:
                continue
            pages -= 1
        held[i, b, h] = n + 1
        kept[i].add((b, h, t))
    return kept


@pytest.mark.parametrize("page_size, pages", [(1, 7), (3, 5), (4, 0), (2, 100)])
def test_keep_highest_follows_the_rule(page_size, pages):
    from cache import keep_highest
    gen = torch.Generator().manual_seed(page_size)
    scores = [torch.rand(2, 3, 9, generator=gen).round(decimals=1) for _ in range(2)]   # ties on purpose
    for s in scores:
        s[torch.rand(s.shape, generator=gen) < 0.3] = float("-inf")                     # empty slots
    capacity = [6, 9]
    kept = keep_highest(scores, capacity, pages, page_size)
    expected = keep_highest_by_hand(scores, capacity, pages, page_size)
    for k, want in zip(kept, expected):
        assert {tuple(x) for x in k.nonzero().tolist()} == want


def test_lowest_g_eviction_is_pool_wide():
    """With an Eviction on the pool, a layer whose admitted prompt tokens do not fit takes the slots of the
    lowest-g tokens anywhere (earlier layers included) or leaves its own lowest out; in decode a pass every
    `every` steps frees pages down to the low-water mark by the same rule. Survivors keep their order."""
    from cache import Eviction
    B, H, D, W, T0, P = 2, 2, 8, 3, 30, 2
    pool = PagePool(20, P, D, torch.float32)
    caches = [WriteGatedCache(B, H, D, W, 0.3, 40, torch.float32, pool=pool) for _ in range(3)]
    evictor = Eviction(caches, "lowest-g", every=4)
    torch.manual_seed(3)
    gs = [torch.rand(B, H, T0 + 8) for _ in caches]
    q, k = torch.randn(B, 2 * H, T0 + 8, D), torch.randn(B, H, T0 + 8, D)
    stored_k = lambda c: c.store_contents()[0]
    want: list[dict] = [dict() for _ in caches]      # (b, h) -> prompt positions held, per layer
    for i, (cache, g) in enumerate(zip(caches, gs)):
        scores = [torch.full((B, H, T0), float("-inf")) for _ in range(i + 1)]
        for j in range(i + 1):
            for (b, h), held in (want[j].items() if j < i else []):
                scores[j][b, h, sorted(held)] = gs[j][b, h, sorted(held)]
        own = gs[i][:, :, :T0].clone()
        own[:, :, T0 - W:] = float("-inf")                                 # the ring's tokens are not candidates
        own[own <= 0.3] = float("-inf")
        scores[i] = own
        kept = keep_highest_by_hand(scores, [c.capacity for c in caches[:i + 1]], pool.n_pages, P)
        for j in range(i + 1):
            want[j] = {(b, h): sorted(t for bb, hh, t in kept[j] if (bb, hh) == (b, h)) for b in range(B) for h in range(H)}
        cache(q[:, :, :T0], k[:, :, :T0], k[:, :, :T0], g[:, :, :T0], torch.arange(T0))
        for j in range(i + 1):
            for (b, h), held in want[j].items():
                n = int(caches[j].global_len[b, h])
                assert torch.equal(stored_k(caches[j])[b, h, :n], k[b, h, held]), (i, j, b, h)
    evicted = sum(int(c.n_evicted.sum()) for c in caches)
    dropped = sum(int(c.n_capacity_drops.sum()) for c in caches)
    assert evicted > 0 and dropped > 0                                    # both halves of the rule ran
    assert int(pool.n_free) == pool.n_pages - sum(-(-int(n) // P) for c in caches for n in c.global_len.flatten())
    # Decode: no pass before step `every`; at step 4 the pool is below the low-water mark and one pass runs.
    before = [c.store_contents()[2].clone() for c in caches]
    lengths = [c.global_len.clone() for c in caches]
    passes = evictor.passes                                               # the prefills' (each that made room)
    assert passes == 3
    evictor.after_step(3)
    assert evictor.passes == passes and all(torch.equal(c.global_len, n) for c, n in zip(caches, lengths))
    assert int(pool.n_free) < evictor.low_water
    evictor.after_step(4)
    assert evictor.passes == passes + 1
    scores = [torch.where(torch.arange(g.shape[-1]) < n[..., None], g, float("-inf")) for g, n in zip(before, lengths)]
    kept = keep_highest_by_hand(scores, [c.capacity for c in caches], max(pool.n_pages - evictor.low_water,
                                                                          pool.n_pages // 2), P)
    for c, g, keep in zip(caches, before, kept):
        for b in range(B):
            for h in range(H):
                slots = sorted(t for bb, hh, t in keep if (bb, hh) == (b, h))
                assert c.store_contents()[2][b, h, :int(c.global_len[b, h])].tolist() == g[b, h, slots].tolist()


@pytest.fixture(scope="module")
def compiled_decode():
    """A 6-layer gated model's prefill and 6 decode steps, eager and through one torch.compile(fullgraph=True) of
    the model, with the matmuls Inductor lowered: the two tests below share it, so the step compiles once."""
    from torch._dynamo.utils import counters
    model = tiny_model(2, n_layers=6)
    gates = random_gates(model)
    # Pages of 4: both cache sizes below have page tables of more than one page (a size of 1 is specialised).
    setup_learned(model, gates, window=3, max_seq_len=16, page_size=4)
    prompt = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(6))

    stored = lambda: sum(int(layer.attention.cache.global_len.sum()) for layer in model.layers)

    def run(step, stance_after_first="default"):
        logits = [model(prompt, torch.arange(6))[:, -1:]]       # the prefill empties the cache first
        after_prefill = stored()
        for pos in range(6, 12):
            logits.append(step(logits[-1].argmax(-1), torch.tensor([pos])).clone())
            torch.compiler.set_stance(stance_after_first)
        torch.compiler.set_stance("default")
        assert stored() > after_prefill   # the stores grew while decoding
        return torch.cat(logits, 1)

    eager = run(model)
    # On a CPU the step reads only the stores' filled slots through a symbolic length, so one graph
    # serves every step as they grow: a recompile fails the test.
    counters.clear()
    step = torch.compile(model, fullgraph=True)
    # Lowered here, not read from an earlier run's caches, so that Inductor's counters see the lowering.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = run(step, stance_after_first="fail_on_recompile")
    return SimpleNamespace(model=model, gates=gates, run=run, step=step, eager=eager, compiled=compiled,
                           mm=dict(counters["aten_mm_info"]))


def test_decode_compiles_fullgraph_once_per_block_and_matches_eager(compiled_decode):
    torch.testing.assert_close(compiled_decode.compiled, compiled_decode.eager, rtol=1e-4, atol=1e-4)
    # The six blocks are one compiled subgraph: Inductor lowered each matmul of a block once (the fused q/k/v
    # product, of (4 + 2 * 2) heads of 16, among them), not six times, one per layer.
    mm = compiled_decode.mm
    assert mm and max(mm.values()) == 1 and mm["aten.mm_2_128_64"] == 1, mm


@pytest.mark.skipif(not DYNAMIC_CACHE_SIZES, reason=f"torch {torch.__version__} compiles another cache size anew "
                                                    "(pages.DYNAMIC_CACHE_SIZES says why)")
def test_decode_of_another_cache_size_runs_on_the_same_graph(compiled_decode):
    """A cache of another size (another --max-seq-len) runs on the graph the test above compiled."""
    d = compiled_decode
    setup_learned(d.model, d.gates, window=3, max_seq_len=40, page_size=4)
    eager = d.run(d.model)
    torch.compiler.set_stance("fail_on_recompile")
    try:
        torch.testing.assert_close(d.run(d.step, stance_after_first="fail_on_recompile"), eager, rtol=1e-4, atol=1e-4)
    finally:
        torch.compiler.set_stance("default")


def test_backend_names():
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        resolve_backend("cuda", "cpu")


def test_snapkv_eviction_matches_a_plain_reference():
    """Scores from the observed queries' softmax over ring + store, max-pooled over neighbouring slots; each
    head drops ceil(share x length) lowest (ties: the later slot goes), survivors keep their order, and the
    pages left empty return to the pool."""
    from cache import Eviction
    B, H, G, D, W, O, P = 2, 2, 2, 8, 3, 4, 3
    # 36 pages, fewer than the 4 heads' tables hold (40): a pool that could give every store all it may take
    # would never need a pass.
    pool = PagePool(36, P, D, torch.float32)
    cache = WriteGatedCache(B, H, D, W, 0.3, 30, torch.float32, pool=pool, observe=O, n_heads=G * H)
    torch.manual_seed(7)
    T0, steps = 20, 6
    T = T0 + steps
    q, k, g = torch.randn(B, G * H, T, D), torch.randn(B, H, T, D), torch.rand(B, H, T)
    cache(q[:, :, :T0], k[:, :, :T0], k[:, :, :T0], g[:, :, :T0], torch.arange(T0))
    for p in range(T0, T):
        cache(q[:, :, p:p + 1], k[:, :, p:p + 1], k[:, :, p:p + 1], g[:, :, p:p + 1], torch.tensor([p]))
    stored_k, _, stored_g = cache.store_contents()
    lengths = cache.global_len.clone()
    free_before = int(pool.n_free)
    share, pooling = 0.25, 3
    expected, freed = {}, 0
    for b in range(B):
        for h in range(H):
            n = int(lengths[b, h])
            ring = k[b, h, T - W:T]                                   # the ring holds the last W positions
            score = torch.zeros(n)
            for qh in range(h * G, (h + 1) * G):
                for pos in range(T - O, T):                           # the last O queries
                    logits = torch.cat((ring, stored_k[b, h, :n])) @ q[b, qh, pos] * D ** -0.5
                    score += torch.softmax(logits, 0)[W:]
            pooled = torch.tensor([score[max(s - 1, 0):s + 2].max() for s in range(n)])
            n_keep = n - math.ceil(share * n)
            ranked = sorted(range(n), key=lambda s: (-float(pooled[s]), s))
            survivors = sorted(ranked[:n_keep])
            expected[b, h] = stored_g[b, h, survivors].tolist()
            freed += -(-n // P) - -(-n_keep // P)
    evictor = Eviction([cache], "snapkv", every=2, share=share, pooling=pooling)
    evictor.low_water = 10**6                                         # run the pass whatever the pool holds
    evictor.after_step(1)                                             # not a step it checks on
    assert evictor.passes == 0 and torch.equal(cache.global_len, lengths)
    evictor.after_step(2)
    assert evictor.passes == 1
    _, _, after_g = cache.store_contents()
    for (b, h), want in expected.items():
        assert after_g[b, h, :int(cache.global_len[b, h])].tolist() == want
    assert torch.equal(cache.n_evicted, lengths - cache.global_len) and int(cache.n_evicted.sum()) > 0
    assert int(pool.n_free) == free_before + freed
    # The freed pages are not in any head's table, and the tables' pages are distinct.
    held = [int(p) for b in range(B) for h in range(H) for p in cache.page_table[b, h, :-(-int(cache.global_len[b, h]) // P)]]
    assert len(set(held)) == len(held) and not set(held) & set(pool.free_pages[:int(pool.n_free)].tolist())
