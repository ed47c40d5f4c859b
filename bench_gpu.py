"""The GPU check of the write-gated kernels: correctness, kernel speed and end to end, in one command.

    python bench_gpu.py              # one H200, under 6 minutes; the tables are printed last (stdout)
    python bench_gpu.py --sweep      # also time tile alternatives of the two attention kernels (about +1 minute)
    python bench_gpu.py --dry-run    # the same script on the CPU at tiny shapes, in Triton's interpreter (CI)
    python bench_gpu.py --random-cases 1000 [--seed 0]   # instead: 1,000 seeded random cases per paged-store
                                     # kernel against its reference, on the CPU (Triton's interpreter)

1. Correctness of each Triton kernel against its PyTorch reference (kernels.py) at Llama-3.1-8B
   attention shapes (Hq 32, Hkv 8, D 128, bf16), plus the decode ops compiled into a CUDA graph.
2. Decode attention over ring + paged global store (20% of the keys admitted, lengths ragged per head,
   pages of 16 under shuffled page tables): achieved GB/s against the measured copy bandwidth, and
   dense SDPA decode over all keys.
3. Gated prefill attention (25% admitted, W 256): TFLOP/s on the key tiles it computes, and time
   against dense causal flash attention.
4. End to end, the Llama-3.1-8B configuration with random weights (bf16, batch 1): prefill seconds,
   decode ms/token with the decode step compiled into a CUDA graph, dense cache against the
   write-gated cache with policy random:0.25 (its stores one pool of pages), peak memory; the decode
   floor is the bytes a token must read (weights, plus the keys and values its attention reads) at the
   copy bandwidth.
Sections run in that order and each catches its own failure, so one broken part still leaves
the others' numbers; end-to-end contexts whose predicted time would overrun --budget-s are skipped.
Progress goes to stderr.
"""
import argparse
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# The dry run is the CPU path in Triton's interpreter even where CUDA is present. Triton reads
# TRITON_INTERPRET when kernels.py defines its kernels, on the next line, so the flag is read here,
# before argparse (which is told to take no abbreviation of it).
if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"
import kernels   # noqa: E402
from cache import allocated_bytes
from pages import pages_for
# After kernels, which chooses Triton's interpreter on a machine without a GPU before anything imports Triton
# (this module does, and imported first it left the interpreter's kernels failing).
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

K, TAU, WINDOW = 1024, 0.1, 256
LLAMA_8B = dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))
TINY = dict(vocab_size=256, dim=128, n_layers=2, n_heads=8, n_kv_heads=2, intermediate_size=256)


@dataclass
class Sizes:
    device: str
    Hq: int
    Hkv: int
    D: int
    window: int
    page: int                   # tokens per page of the global store's pool
    check_T: int                # correctness: prompt length, global capacity of the decode check
    check_C: int
    decode_keys: list           # decode attention: keys per head before admission
    decode_layers: int          # distinct buffers per timed graph, so no layer is served from L2
    prefill_T: list
    model: dict
    contexts: list
    decode_steps: int


GPU = Sizes("cuda", 32, 8, 128, WINDOW, 16, 4 * K, 32 * K, [32 * K, 128 * K, 400 * K], 8, [32 * K, 128 * K],
            LLAMA_8B, [32 * K, 128 * K, 400 * K], 32)
# Pages of 4 in the dry run, so that its tiny stores still span several pages each.
DRY = Sizes("cpu", 8, 2, 16, 8, 4, 40, 48, [64, 160], 2, [48, 72], TINY, [24, 40], 1)


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps=3, warmup=1):
    """Median seconds of fn() over reps calls after warmup calls (one call on the CPU: a dry run)."""
    if device != "cuda":
        reps, warmup = 1, 0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_graph(fns, device, reps=20, batches=5):
    """Median seconds of one call of each fn in fns, replayed from a CUDA graph (no launch gaps),
    timed by CUDA events over `reps` back-to-back replays, so no host sync falls inside."""
    if device != "cuda":
        return timed(lambda: [fn() for fn in fns], device) / len(fns)
    for fn in fns:   # compile the kernels outside the capture
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times) / len(fns)


def rel_err(out, ref):
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30)) if out.isfinite().all() else math.inf


def fmt_bytes(n):
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def fmt_keys(n):
    return f"{n // K}k" if n >= K and n % K == 0 else str(n)


def copy_bandwidth(device):
    """Bytes read plus written per second by a large device-to-device copy."""
    n = (1 << 30) if device == "cuda" else (1 << 22)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * n / timed(lambda: dst.copy_(src), device, reps=10)


def random_gates(B, Hkv, T, fraction, device):
    return torch.where(torch.rand(B, Hkv, T, device=device) < fraction, 0.9, 0.01)             # (B, Hkv, T)


def paged_store(lengths, capacity, page, D, spare_pages, dtype=torch.bfloat16, generator=None, g_floor=0.5):
    """A paged global store holding random K/V and g in [g_floor, 1) for the store lengths (B, Hkv), on their
    device (drawn from generator, if given), in the kernels' argument order:
    [pool_k, pool_v, pool_g, free_pages, n_free, page_table, global_len].
    The pool has exactly the pages the heads hold plus spare_pages free ones, all in a random order, so
    that the kernels follow page tables that are nothing like contiguous, as in a cache that has run a while."""
    device = lengths.device
    held = pages_for(lengths, page)                                                            # (B, Hkv) pages
    N, taken = int(held.sum()) + spare_pages, int(held.sum())
    order = torch.cat((torch.randperm(N, generator=generator, device=device),
                       torch.tensor([N], device=device)))                                      # (N + 1,) scratch last
    first = held.flatten().cumsum(0).view_as(held) - held                                      # (B, Hkv) into order
    col = torch.arange(pages_for(capacity, page), device=device)                               # (M,)
    page_table = torch.where(col < held[..., None], order[(first[..., None] + col).clamp(max=N)], N)   # (B, Hkv, M)
    free_pages = torch.cat((order[taken:N], torch.full((taken + 1,), N, device=device)))       # (N + 1,)
    pool_k, pool_v = (torch.randn(N + 1, page, D, generator=generator, device=device).to(dtype)
                      for _ in range(2))                                                       # (N + 1, P, D)
    pool_g = torch.rand(N + 1, page, generator=generator, device=device) * (1 - g_floor) + g_floor   # (N + 1, P)
    return [pool_k, pool_v, pool_g, free_pages, torch.tensor([spare_pages], device=device), page_table, lengths.clone()]


def same_store(got, want):
    """Exactly equal paged stores (NaN equal to NaN: a test fills a pool with NaN to see what is written) but
    for the scratch page (the pool's last), which only the references write."""
    def same(x, y):
        return torch.equal(x.isnan(), y.isnan()) and torch.equal(x.masked_fill(x.isnan(), 0), y.masked_fill(y.isnan(), 0))
    return all(same(x[:-1], y[:-1]) if i < 3 else same(x, y) for i, (x, y) in enumerate(zip(got, want)))


# --- 1. correctness -------------------------------------------------------------------------

def check_kernels(s: Sizes):
    dev, dt = s.device, torch.bfloat16
    torch.manual_seed(0)
    rows = []
    T, W, D, Hkv = s.check_T, s.window, s.D, s.Hkv
    g = random_gates(1, Hkv, T, 0.25, dev)
    idx, count = kernels.compact_admitted(g, TAU, W)
    ref_idx, ref_count = kernels.compact_admitted_ref(g, TAU, W)
    ok = torch.equal(idx, ref_idx) and torch.equal(count, ref_count)
    rows.append(("compact_admitted", f"T {T}", "exact" if ok else "FAIL", ""))

    q = torch.randn(1, s.Hq, T, D, device=dev, dtype=dt)
    k, v = (torch.randn(1, Hkv, T, D, device=dev, dtype=dt) for _ in range(2))
    out = kernels.gated_prefill_attention(q, k, v, idx, count, W, D ** -0.5)
    err = rel_err(out, kernels.gated_prefill_attention_ref(q, k, v, idx, count, W, D ** -0.5))
    rows.append(("gated_prefill_attention", f"T {T}, W {W}", f"rel err {err:.1e}" + ("" if err < 2e-2 else " FAIL"), ""))

    P, empty = s.page, torch.zeros(1, Hkv, dtype=torch.int64, device=dev)
    need = pages_for(count, P)                                                                 # (1, Hkv) pages for all
    # Everything fits / a head's capacity overflows and it keeps its highest g / the pool runs out part-way
    # through the heads, which then keep their highest g in what they got.
    for C, spare, case in ((2 * T, int(need.sum()), "fits"), (T // 8, int(need.sum()), "over capacity"),
                           (2 * T, int(need.sum()) // 2, "pool for half")):
        store = paged_store(empty, C, P, D, spare)
        ref_store = [x.clone() for x in store]
        kernels.store_admitted(*store, k, v, g, idx, count)
        kernels.store_admitted_ref(*ref_store, k, v, g, idx, count)
        ok = same_store(store, ref_store)
        rows.append(("store_admitted", f"T {T}, C {pages_for(C, P) * P}, P {P}, {case}", "exact" if ok else "FAIL", ""))

    C = s.check_C
    # Full, partial, empty, one key; C // 2 (and 0) end on a page edge: an admitted token there needs a new page.
    lengths = torch.tensor([C, C // 100, 0, C // 3, 1, C // 2, C // 10, C - 1], device=dev)[None, :Hkv]  # (1, Hkv)
    qd = torch.randn(1, s.Hq, D, device=dev, dtype=dt)
    ring_k, ring_v = (torch.randn(1, Hkv, W, D, device=dev, dtype=dt) for _ in range(2))
    # One spare page: the first head at a page edge takes it, the next finds the pool empty.
    state = paged_store(lengths, C, P, D, 1)
    pool_k, pool_v, page_table = state[0], state[1], state[5]
    for ring_len in (W, W // 3):
        args = (qd, ring_k, ring_v, torch.tensor(ring_len, device=dev), pool_k, pool_v, page_table, lengths, D ** -0.5)
        err = rel_err(kernels.decode_attention(*args), kernels.decode_attention_ref(*args))
        rows.append(("decode_attention", f"C {fmt_keys(C)}, P {P}, ring {ring_len}, lengths 0..C",
                     f"rel err {err:.1e}" + ("" if err < 2e-2 else " FAIL"), ""))

    ref_state = [x.clone() for x in state]
    ok = True
    for step in range(4):   # the gates move across the heads: each meets admission, rejection, an empty slot
        k_out, v_out = (torch.randn(1, Hkv, D, device=dev, dtype=dt) for _ in range(2))
        g_out = torch.tensor([0.9, 0.6, 0.05, 0.7, -1.0, 0.99, 0.3, 0.8], device=dev).roll(step)[None, :Hkv]
        kernels.promote(*state, k_out, v_out, g_out, TAU)
        kernels.promote_ref(*ref_state, k_out, v_out, g_out, TAU)
        ok = ok and same_store(state, ref_state)
    rows.append(("promote", f"C {fmt_keys(C)}, P {P}, 4 steps: full, partial, new-page and out-of-pool heads",
                 "exact" if ok else "FAIL", ""))

    if dev == "cuda":   # the decode ops compiled into a CUDA graph on buffers, as the cache uses them
        state = paged_store(lengths, C, P, D, 2 * Hkv)   # pages to grant inside the graph
        eager, graphed = DecodeOps(state, D ** -0.5), DecodeOps(state, D ** -0.5)
        compiled = torch.compile(graphed, fullgraph=True, mode="reduce-overhead")
        skips_before = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
        start, errs = time.perf_counter(), []
        for _ in range(4):   # warm-up, record, replays; the store changes every step
            k_out, v_out = (torch.randn(1, Hkv, D, device=dev, dtype=dt) for _ in range(2))
            g_out = torch.rand(1, Hkv, device=dev)
            args = (k_out, v_out, g_out, torch.randn(1, s.Hq, D, device=dev, dtype=dt), ring_k, ring_v,
                    torch.tensor(W, device=dev))
            out = compiled(*args).clone()
            ref = eager(*args)
            same = all(torch.equal(a, b) for a, b in zip(graphed.buffers(), eager.buffers()))
            errs.append(rel_err(out, ref) if same else math.inf)
        skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips_before
        ok = max(errs) < 1e-3 and skips == 0
        rows.append(("promote + decode_attention compiled, CUDA graph", f"C {fmt_keys(C)}, P {P}, 4 steps",
                     f"rel err {max(errs):.1e}" + ("" if ok else " FAIL"),
                     f"compile {time.perf_counter() - start:.0f} s, CUDA graph skips {skips}"))
    return rows


STORE = ("pool_k", "pool_v", "pool_g", "free_pages", "n_free", "page_table", "global_len")


class DecodeOps(torch.nn.Module):
    """A cache's decode-time use of the kernels: promote into the paged store's buffers, then attend over them."""

    def __init__(self, state, scale):
        super().__init__()
        for name, x in zip(STORE, state):
            self.register_buffer(name, x.clone())
        self.scale = scale

    def forward(self, k_out, v_out, g_out, q, ring_k, ring_v, ring_len):
        kernels.promote(*(getattr(self, name) for name in STORE), k_out, v_out, g_out, TAU)
        return kernels.decode_attention(q, ring_k, ring_v, ring_len, self.pool_k, self.pool_v, self.page_table,
                                        self.global_len, self.scale)


# --- --random-cases: the paged-store kernels on seeded random shapes ------------------------
# Each case draws its shapes: batch 1-3, KV heads 1-4, GQA ratios 1-8, head dims 16-128, float32 / bfloat16 /
# float16, pages of 1-16 tokens, capacities of 1-64 tokens, store lengths ragged per head (0, whole pages,
# a full capacity, anything between), page tables shuffled over the pool, and pools from exhausted (no free
# page) to roomy. store_admitted and promote must leave exactly the reference's store (scratch page aside);
# decode_attention must agree within the float tolerance of its dtype. CPU tensors: Triton's interpreter.

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}   # atol = rtol; outputs are O(1)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RANDOM_TAU = 0.5


def draw_lengths(rng: random.Random, B: int, H: int, capacity: int, page: int) -> list[list[int]]:
    """Store lengths per (batch, head): empty, whole pages, full, or anything in between."""
    def one():
        kind = rng.random()
        if kind < 0.2:
            return 0
        if kind < 0.4:
            return min(capacity, page * rng.randint(0, pages_for(capacity, page)))
        if kind < 0.5:
            return capacity
        return rng.randint(0, capacity)
    return [[one() for _ in range(H)] for _ in range(B)]


def shapes(rng: random.Random) -> dict:
    page = rng.choice([1, 2, 3, 4, 5, 8, 16])
    return dict(B=rng.randint(1, 3), H=rng.randint(1, 4), G=rng.choice([1, 2, 3, 4, 8]), D=rng.choice([16, 32, 64, 128]),
                dtype=rng.choice(DTYPES), page=page, capacity=rng.randint(1, 64), spare=rng.choice([0, 0, 1, 2, 3, 8]))


def random_store(gen: torch.Generator, s: dict, lengths: list[list[int]], spare: int) -> list[torch.Tensor]:
    """paged_store for a case's shapes s, drawn from gen."""
    return paged_store(torch.tensor(lengths), s["capacity"], s["page"], s["D"], spare, s["dtype"], gen)


def case_decode(rng: random.Random, gen: torch.Generator) -> tuple[dict, float, bool]:
    s = shapes(rng)
    lengths = draw_lengths(rng, s["B"], s["H"], s["capacity"], s["page"])
    pool_k, pool_v, _, _, _, page_table, global_len = random_store(gen, s, lengths, s["spare"])
    W = rng.randint(1, 20)
    s.update(lengths=lengths, W=W, ring_len=rng.randint(0, W))
    q = torch.randn(s["B"], s["H"] * s["G"], s["D"], generator=gen).to(s["dtype"])
    ring_k = torch.randn(s["B"], s["H"], W, s["D"], generator=gen).to(s["dtype"])
    ring_v = torch.randn(s["B"], s["H"], W, s["D"], generator=gen).to(s["dtype"])
    args = (q, ring_k, ring_v, torch.tensor(s["ring_len"]), pool_k, pool_v, page_table, global_len, s["D"] ** -0.5)
    out, ref = kernels.decode_attention(*args).float(), kernels.decode_attention_ref(*args).float()
    # The error as a share of assert_close's bound (atol = rtol = the dtype's tolerance): at most 1 passes.
    err = float(((out - ref).abs() / (TOL[s["dtype"]] * (1 + ref.abs()))).max()) if out.numel() else 0.0
    return s, err, err <= 1.0


def case_store(rng: random.Random, gen: torch.Generator) -> tuple[dict, float, bool]:
    s = shapes(rng)
    lengths = draw_lengths(rng, s["B"], s["H"], s["capacity"], s["page"])
    T = rng.randint(1, 60)
    W = rng.randint(1, T + 5)
    s.update(lengths=lengths, T=T, W=W)
    state = random_store(gen, s, lengths, s["spare"] + rng.randint(0, 12))
    k = torch.randn(s["B"], s["H"], T, s["D"], generator=gen).to(s["dtype"])
    v = torch.randn(s["B"], T, s["H"], s["D"], generator=gen).to(s["dtype"]).transpose(1, 2)   # another layout
    g = torch.rand(s["B"], s["H"], T, generator=gen)
    if rng.random() < 0.3:
        g[rng.randrange(s["B"]), rng.randrange(s["H"])] = rng.choice([0.05, 0.95])   # a head admitting none or all
    idx, count = kernels.compact_admitted_ref(g, RANDOM_TAU, W)
    ref_state = [x.clone() for x in state]
    kernels.store_admitted(*state, k, v, g, idx, count)
    kernels.store_admitted_ref(*ref_state, k, v, g, idx, count)
    return s, 0.0, same_store(state, ref_state)


def case_promote(rng: random.Random, gen: torch.Generator) -> tuple[dict, float, bool]:
    s = shapes(rng)
    lengths = draw_lengths(rng, s["B"], s["H"], s["capacity"], s["page"])
    steps = rng.randint(1, 5)
    s.update(lengths=lengths, steps=steps)
    state = random_store(gen, s, lengths, s["spare"])
    ref_state = [x.clone() for x in state]
    ok = True
    for _ in range(steps):
        k_out = torch.randn(s["B"], s["H"], s["D"], generator=gen).to(s["dtype"])
        v_out = torch.randn(s["B"], s["H"], s["D"], generator=gen).to(s["dtype"])
        # An empty ring slot (-1), rejected, admitted below the stores' gates, admitted above.
        g_out = torch.tensor([rng.choice([-1.0, 0.2, 0.55, 0.9, rng.random()]) for _ in range(s["B"] * s["H"])])
        g_out = g_out.view(s["B"], s["H"])
        kernels.promote(*state, k_out, v_out, g_out, RANDOM_TAU)
        kernels.promote_ref(*ref_state, k_out, v_out, g_out, RANDOM_TAU)
        ok = ok and same_store(state, ref_state)
    return s, 0.0, ok


RANDOM_CASES = {"decode_attention": case_decode, "store_admitted": case_store, "promote": case_promote}


def random_cases(n_cases: int, seed: int, report=None) -> dict[str, tuple[int, int, float]]:
    """{kernel: (cases, mismatches, largest error)}; report(kernel, case) is called on each mismatch."""
    results = {}
    for name, run in RANDOM_CASES.items():
        rng, gen = random.Random(f"{seed}/{name}"), torch.Generator().manual_seed(seed)
        bad, worst = 0, 0.0
        for _ in range(n_cases):
            case, err, ok = run(rng, gen)
            worst = max(worst, err)
            if not ok:
                bad += 1
                if report is not None:
                    report(name, case)
        results[name] = (n_cases, bad, worst)
    return results


def print_random_cases(n_cases: int, seed: int) -> int:
    """A line per kernel on stdout, each mismatch's case on stderr; returns the exit code, 1 on any mismatch."""
    results = random_cases(n_cases, seed, report=lambda name, case: log(f"MISMATCH {name}: {case}"))
    for name, (n, bad, worst) in results.items():
        print(f"{name}: {n} cases, {bad} mismatches" + (f", largest error {worst:.2f} of the tolerance"
                                                         if name == "decode_attention" else ", exact"))
    return 1 if any(bad for _, bad, _ in results.values()) else 0


# --- 2. decode attention --------------------------------------------------------------------

def decode_layers(s: Sizes, n):
    """Decode inputs for s.decode_layers layers at n keys per head before admission: ragged lengths
    averaging 20% of n, 100x apart from the shortest head to the longest, each layer's store a pool of
    just the pages its heads hold under shuffled page tables; a full ring."""
    dev, dt, D, Hkv, W = s.device, torch.bfloat16, s.D, s.Hkv, s.window
    shares = torch.tensor([0.005, 0.05, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5])[:Hkv]
    lengths = (shares * 0.2 / shares.mean() * n).long().to(dev)[None]                          # (1, Hkv)
    layers = []
    for _ in range(s.decode_layers):
        pool_k, pool_v, _, _, _, page_table, global_len = paged_store(lengths, int(lengths.max()), s.page, D, 0)
        layers.append((torch.randn(1, s.Hq, D, device=dev, dtype=dt),
                       torch.randn(1, Hkv, W, D, device=dev, dtype=dt), torch.randn(1, Hkv, W, D, device=dev, dtype=dt),
                       torch.tensor(W, device=dev), pool_k, pool_v, page_table, global_len, D ** -0.5))
    keys = int(lengths.sum()) + Hkv * W
    return layers, keys, keys * 2 * D * 2                                                      # bytes of K and V read


def time_decode(layers, tiles, dev):
    """Seconds per layer, all layers replayed from one CUDA graph (distinct buffers: no layer in L2)."""
    return timed_graph([lambda a=a: kernels.decode_attention_tiled(*a, tiles) for a in layers], dev)


def bench_decode(s: Sizes, bandwidth):
    dev, dt, D, Hkv = s.device, torch.bfloat16, s.D, s.Hkv
    tiles = kernels.launch_tiles("decode", dev, dt, D)
    rows = []
    for n in s.decode_keys:
        layers, keys, nbytes = decode_layers(s, n)
        seconds = time_decode(layers, tiles, dev)
        del layers
        dense_k, dense_v = (torch.randn(1, Hkv, n, D, device=dev, dtype=dt) for _ in range(2))
        dense_q = torch.randn(1, s.Hq, 1, D, device=dev, dtype=dt)
        try:   # a reference point only: whichever SDPA backend takes GQA decode
            dense = timed_graph([lambda: F.scaled_dot_product_attention(dense_q, dense_k, dense_v, enable_gqa=True)], dev)
            dense = f"{dense * 1e6:.0f} us"
        except RuntimeError as e:
            dense = f"n/a ({str(e)[:60]})"
        del dense_k, dense_v
        rows.append((fmt_keys(n), f"{keys / (Hkv * n):.0%}", f"{seconds * 1e6:.0f} us", f"{nbytes / seconds / 1e9:.0f} GB/s",
                     f"{nbytes / seconds / bandwidth:.0%}", dense))
    return rows


# --- 3. gated prefill attention -------------------------------------------------------------

def prefill_inputs(s: Sizes, T):
    """q, k, v at T positions and the compaction of gates admitting 25% of them."""
    dev, dt = s.device, torch.bfloat16
    q = torch.randn(1, s.Hq, T, s.D, device=dev, dtype=dt)
    k, v = (torch.randn(1, s.Hkv, T, s.D, device=dev, dtype=dt) for _ in range(2))
    idx, count = kernels.compact_admitted(random_gates(1, s.Hkv, T, 0.25, dev), TAU, s.window)
    return q, k, v, idx, count


def computed_tile_flops(s: Sizes, idx, count, T, tiles):
    """FLOPs of the key tiles the prefill kernel computes (QK^T and PV), from its own schedule."""
    G, W, block_m, block_n = s.Hq // s.Hkv, s.window, tiles["BLOCK_M"], tiles["BLOCK_N"]
    B, Hkv, _ = idx.shape
    query_tiles = torch.arange(math.ceil(T * G / block_m), device=idx.device)
    first, last = query_tiles * block_m // G, ((query_tiles * block_m + block_m - 1) // G).clamp(max=T - 1)
    positions = torch.where(torch.arange(T, device=idx.device) < count[..., None], idx, T)      # (B, Hkv, T) sorted
    n_any = torch.searchsorted(positions, (last - W).expand(B, Hkv, -1).contiguous(), right=True)
    band = last + 1 - (first - W + 1).clamp(min=0)
    key_tiles = (n_any + block_n - 1) // block_n + (band + block_n - 1) // block_n               # (B, Hkv, tiles)
    return 4 * block_m * block_n * s.D * int(key_tiles.sum())


def bench_prefill(s: Sizes):
    dev, D, G, W = s.device, s.D, s.Hq // s.Hkv, s.window
    tiles = kernels.launch_tiles("prefill", dev, torch.bfloat16, D)
    rows = []
    for T in s.prefill_T:
        q, k, v, idx, count = prefill_inputs(s, T)
        gated = timed(lambda: kernels.gated_prefill_attention(q, k, v, idx, count, W, D ** -0.5), dev)
        flops = computed_tile_flops(s, idx, count, T, tiles)
        k_all, v_all = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)                      # (1, Hq, T, D)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION if dev == "cuda" else SDPBackend.MATH):
            dense = timed(lambda: F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True), dev)
        dense_flops = 2 * 2 * s.Hq * D * T * (T + 1) / 2
        rows.append((fmt_keys(T), f"{float(count.sum()) / (s.Hkv * T):.0%}", f"{gated * 1e3:.1f} ms",
                     f"{flops / gated / 1e12:.0f}", f"{dense * 1e3:.1f} ms", f"{dense_flops / dense / 1e12:.0f}",
                     f"{dense / gated:.2f}x"))
        # A prefill chunk (cache.WriteGatedCache.append): only the last `chunk` tokens ask, over all T keys.
        chunk = min(2048, T)
        q_chunk = q[:, :, T - chunk:]
        gated = timed(lambda: kernels.gated_prefill_attention(q_chunk, k, v, idx, count, W, D ** -0.5), dev)
        causal = causal_lower_right(chunk, T)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION if dev == "cuda" else SDPBackend.MATH):
            dense = timed(lambda: F.scaled_dot_product_attention(q_chunk, k_all, v_all, attn_mask=causal), dev)
        rows.append((f"{fmt_keys(T)}, last {fmt_keys(chunk)} ask", f"{float(count.sum()) / (s.Hkv * T):.0%}",
                     f"{gated * 1e3:.1f} ms", "-", f"{dense * 1e3:.1f} ms", "-", f"{dense / gated:.2f}x"))
        del q, k, v, k_all, v_all, q_chunk
    return rows


# --- --sweep: tile alternatives at the largest sizes -----------------------------------------

PREFILL_VARIANTS = [dict(BLOCK_M=128, BLOCK_N=64, SEARCH_LANES=128, num_warps=8, num_stages=4),
                    dict(BLOCK_M=64, BLOCK_N=64, SEARCH_LANES=128, num_warps=4, num_stages=3)]
DECODE_VARIANTS = [dict(BLOCK_N=64, programs_per_sm=2, num_warps=4, num_stages=4),
                   dict(BLOCK_N=32, programs_per_sm=4, num_warps=4, num_stages=4),
                   dict(BLOCK_N=128, programs_per_sm=2, num_warps=4, num_stages=2)]


def bench_sweep(s: Sizes, bandwidth):
    dev, D, W = s.device, s.D, s.window
    rows = []
    T = max(s.prefill_T)
    q, k, v, idx, count = prefill_inputs(s, T)
    defaults = kernels.launch_tiles("prefill", dev, torch.bfloat16, D)
    for tiles in [defaults] + PREFILL_VARIANTS:
        out = kernels.gated_prefill_tiled(q, k, v, idx, count, W, D ** -0.5, tiles)
        err = rel_err(out, kernels.gated_prefill_attention(q, k, v, idx, count, W, D ** -0.5))
        seconds = timed(lambda: kernels.gated_prefill_tiled(q, k, v, idx, count, W, D ** -0.5, tiles), dev)
        flops = computed_tile_flops(s, idx, count, T, tiles)
        rows.append(("gated prefill", fmt_keys(T), fmt_tiles(tiles), f"{seconds * 1e3:.2f} ms",
                     f"{flops / seconds / 1e12:.0f} TFLOP/s", f"{err:.0e}"))
    del q, k, v
    n = max(s.decode_keys)
    layers, _, nbytes = decode_layers(s, n)
    defaults = kernels.launch_tiles("decode", dev, torch.bfloat16, D)
    for tiles in [defaults] + DECODE_VARIANTS:
        err = rel_err(kernels.decode_attention_tiled(*layers[0], tiles), kernels.decode_attention(*layers[0]))
        seconds = time_decode(layers, tiles, dev)
        rows.append(("decode", fmt_keys(n), fmt_tiles(tiles), f"{seconds * 1e6:.0f} us",
                     f"{nbytes / seconds / bandwidth:.0%} of copy bw", f"{err:.0e}"))
    return rows


def fmt_tiles(tiles):
    return " ".join(f"{k}={v}" for k, v in tiles.items())


# --- 4. end to end --------------------------------------------------------------------------

def bench_end_to_end(s: Sizes, bandwidth, deadline):
    """Gated first, on one set of caches whose heads each hold up to 30% of the longest context, in one pool
    with pages for all of them: one compiled step serves every context, since a gated step reads only the
    keys held, whatever the capacity. Then dense at each context (a cache and a compiled step each). The
    longest context comes last, if the budget allows. Peak memory is the process's, weights and caches included."""
    import gate
    from model import LlamaConfig, Transformer
    dev = s.device
    config = LlamaConfig(**s.model)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = Transformer(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    # A decode step reads every weight but the embedding table, of which it reads one row.
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "tok_embeddings.weight")
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.automatic_dynamic_shapes = False   # each dense context its own static graph
    longest = max(s.contexts)
    shorter = [n for n in s.contexts if n < longest]
    plan = [(n, "gated") for n in shorter] + [(n, "dense") for n in shorter] + [(longest, "gated"), (longest, "dense")]
    rows, last, first_rest = [], {}, {}
    for n, kind in plan:
        # The prefill grows as the square of the context (attention); the rest does not, and includes
        # compiling the step whenever the caches are new.
        if kind in last:
            prefill_s, rest_s, last_n = last[kind]
            if kind == "dense" or model.layers[0].attention.gate is None:
                rest_s = first_rest[kind]
            if time.perf_counter() + 1.2 * prefill_s * (n / last_n) ** 2 + rest_s > deadline:
                rows.append((fmt_keys(n), kind, "skipped: over the time budget", "", "", "", "", "", ""))
                continue
        started = time.perf_counter()
        try:
            row, prefill_s = setup_and_run(model, config, s, n, kind, weight_bytes, bandwidth, longest)
        except Exception as e:   # noqa: BLE001 - the next context still runs (an out-of-memory one, say)
            rows.append((fmt_keys(n), kind, f"error: {type(e).__name__}: {e}".replace("\n", " ")[:200], "", "", "", "", "", ""))
            log(rows[-1][2])
            model.setup_caches(lambda i: None)
            gate.install(model, None)
            release(dev, forget_compiled=True)
            continue
        rows.append(row)
        last[kind] = (prefill_s, time.perf_counter() - started - prefill_s, n)
        first_rest.setdefault(kind, last[kind][1])
        log(f"end to end {fmt_keys(n)} {kind}: {row}")
    return rows


@torch.inference_mode()
def setup_and_run(model, config, s: Sizes, n, kind, weight_bytes, bandwidth, longest):
    import gate
    dev = s.device
    if kind == "dense":
        gate.install(model, None)
        model.setup_caches(lambda i: None)   # free the last context's caches first
        release(dev, forget_compiled=True)
        gate.build_caches(model, n + s.decode_steps + 4)
    elif model.layers[0].attention.gate is None:   # the gated caches, made once
        model.setup_caches(lambda i: None)
        release(dev, forget_compiled=True)
        # An unlimited budget: every head's full capacity in the pool, so no head runs out of pages and
        # the gated decode times what the policy admits, not what a budget lets in.
        gate.build_caches(model, longest + s.decode_steps + 4, gate="random:0.25", window=s.window, threshold=TAU,
                          global_capacity=math.ceil(0.3 * longest), kv_budget="unlimited", page_size=s.page,
                          backend="triton")
    else:
        release(dev)   # the same caches and compiled step as the last gated context
    return run_end_to_end(model, config, s, n, kind, weight_bytes, bandwidth)


def release(dev, forget_compiled=False):
    """Free what the last context left; forget_compiled drops the compiled steps (and CUDA graphs) of
    caches that are gone, which would otherwise keep their memory."""
    if forget_compiled:
        torch._dynamo.reset()
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_end_to_end(model, config, s: Sizes, n, kind, weight_bytes, bandwidth):
    """Prefill a random prompt of n tokens, then time decode steps; the caches are set up."""
    import generate
    dev = s.device
    tokens = torch.randint(config.vocab_size, (1, n), device=dev)
    sync(dev)
    start = time.perf_counter()
    token = generate.prefill(model, tokens, 0.0, 0, 1.0)                                        # (1, 1)
    sync(dev)
    prefill_s = time.perf_counter() - start
    # Compiled into a CUDA graph on the GPU; the interpreter's kernels cannot be traced, so not on the CPU.
    step = generate.compile_decode_step(dev) if dev == "cuda" else generate.decode_one_token
    input_pos = torch.tensor([n], device=dev)
    start = time.perf_counter()
    for _ in range(3 if dev == "cuda" else 1):   # compile (or find the compiled step), record the graph, replay
        token = step(model, token, input_pos, 0.0, 0, 1.0).clone()
        input_pos += 1
    sync(dev)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(s.decode_steps):
        token = step(model, token, input_pos, 0.0, 0, 1.0).clone()
        input_pos += 1
    sync(dev)
    ms = (time.perf_counter() - start) / s.decode_steps * 1e3
    caches = [layer.attention.cache for layer in model.layers]
    allocated = allocated_bytes(caches)
    if kind == "dense":   # a dense step reads its whole buffer, masked
        read = allocated
        held = sum(2 * c.k_cache[:, :, :n].numel() * c.k_cache.element_size() for c in caches)
    else:   # a step reads the tokens held (global_len) and the ring
        held = read = sum(int(c.global_len.sum() + c.ring_g.shape[-1] * c.global_len.numel()) * c.bytes_per_token()
                          for c in caches)
    floor_ms = (weight_bytes + read) / bandwidth * 1e3
    peak = fmt_bytes(torch.cuda.max_memory_allocated()) if dev == "cuda" else "n/a"
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    return (fmt_keys(n), kind, f"{prefill_s:.2f} s", f"{ms:.2f} ms", f"{ms / floor_ms:.2f}x",
            fmt_bytes(allocated), fmt_bytes(held), peak,
            f"compile and warm-up {warmup_s:.0f} s, CUDA graph skips {skips}"), prefill_s


# --- the command ----------------------------------------------------------------------------

def table(title, header, rows):
    lines = [f"\n{title}", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def section(name, fn, *args):
    """Run one part; a failure becomes a row of the table instead of ending the check."""
    log(f"--- {name}")
    try:
        rows = fn(*args)
        log("\n".join(" | ".join(str(c) for c in row) for row in rows))   # in case the run is cut short
        return rows
    except Exception as e:   # noqa: BLE001 - every failure is reported, the next section still runs
        message = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
        log(f"{name} failed: {message}")
        return [("error", message)]


def main(dry_run: bool = False, sweep: bool = False, budget_s: float = 330.0, random_cases: int | None = None,
         seed: int = 0) -> None:
    if random_cases is not None:
        sys.exit(print_random_cases(random_cases, seed))
    s = DRY if dry_run else GPU
    if s.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here (use --dry-run for the CPU check)", file=sys.stderr)
        sys.exit(2)
    deadline = time.perf_counter() + budget_s
    card = torch.cuda.get_device_name() if s.device == "cuda" else "CPU (Triton interpreter)"
    import triton
    log(f"{card}, torch {torch.__version__}, triton {triton.__version__}")
    bandwidth = copy_bandwidth(s.device)
    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    checks = section("correctness", check_kernels, s)
    decode = section("decode attention", bench_decode, s, bandwidth)
    prefill = section("gated prefill attention", bench_prefill, s)
    sweep = section("tile sweep", bench_sweep, s, bandwidth) if sweep or dry_run else None
    e2e = section("end to end", bench_end_to_end, s, bandwidth, deadline)
    print(f"\n{card}, torch {torch.__version__}, triton {triton.__version__}, copy bandwidth {bandwidth / 1e9:.1f} GB/s"
          f" (read + write){', DRY RUN: tiny shapes, timings meaningless' if dry_run else ''}")
    print(table(f"Correctness (bf16, Hq {s.Hq}, Hkv {s.Hkv}, D {s.D})", ["kernel", "shape", "result", "note"], checks))
    print(table(f"Decode attention, 20% of the keys admitted, ring {s.window}, shuffled pages of {s.page} "
                "(one layer, batch 1)",
                ["keys", "read", "time", "achieved", "of copy bw", "dense SDPA, all keys"], decode))
    print(table(f"Gated prefill attention, 25% admitted, W {s.window}",
                ["T", "admitted", "gated", "TFLOP/s on computed tiles", "dense flash", "dense TFLOP/s", "speed-up"], prefill))
    if sweep is not None:
        print(table("Tile sweep (the first row of each kernel is the default; rel err: output against the default's)",
                    ["kernel", "size", "tiles", "time", "rate", "rel err"], sweep))
    print(table(f"End to end, random weights ({s.model['n_layers']} layers, bf16, batch 1); gated = random:0.25, "
                f"a pool of {s.page}-token pages for 30% of {fmt_keys(max(s.contexts))} per head; "
                "floor = weights + KV read at the copy bandwidth",
                ["context", "cache", "prefill", "decode / token", "of floor", "cache allocated", "KV held",
                 "peak memory", "note"], e2e))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter: checks the script runs")
    parser.add_argument("--sweep", action="store_true",
                        help="also time tile alternatives of the prefill and decode kernels at the largest sizes")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="skip end-to-end contexts predicted to end later than this many seconds after the start")
    parser.add_argument("--random-cases", type=int, metavar="N",
                        help="instead of the benchmark: N seeded random cases per paged-store kernel (decode_attention, "
                             "store_admitted, promote) against its reference, on the CPU; exit code 1 on a mismatch")
    parser.add_argument("--seed", type=int, default=0, help="the seed of --random-cases (default: 0)")
    args = parser.parse_args()
    if args.random_cases is not None and args.random_cases < 1:
        print("bench_gpu.py: error: --random-cases must be at least 1", file=sys.stderr)
        sys.exit(2)
    main(**vars(args))
