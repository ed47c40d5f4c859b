"""A seeded random sweep of every paged-store kernel against its PyTorch reference (kernels.py).

    python scripts/sweep_paged.py                    # 1,000 cases per kernel (Triton's interpreter on a CPU)
    python scripts/sweep_paged.py --cases 50 --seed 3

Each case draws its shapes: batch 1-3, KV heads 1-4, GQA ratios 1-8, head dims 16-128, float32 / bfloat16 /
float16, pages of 1-16 tokens, capacities of 1-64 tokens, store lengths ragged per head (0, whole pages,
a full capacity, anything between), page tables shuffled over the pool, and pools from exhausted (no free
page) to roomy. store_admitted and promote must leave exactly the reference's store (scratch page aside);
decode_attention must agree within the float tolerance of its dtype. Prints a line per kernel on stdout
(cases, mismatches, and for decode the largest error as a share of the tolerance); a mismatch prints its case on stderr and the exit code is 1.
"""
import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}   # atol = rtol; outputs are O(1)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TAU = 0.5


def draw_lengths(rng: random.Random, B: int, H: int, capacity: int, page: int) -> list[list[int]]:
    """Store lengths per (batch, head): empty, whole pages, full, or anything in between."""
    def one():
        kind = rng.random()
        if kind < 0.2:
            return 0
        if kind < 0.4:
            return min(capacity, page * rng.randint(0, -(-capacity // page)))
        if kind < 0.5:
            return capacity
        return rng.randint(0, capacity)
    return [[one() for _ in range(H)] for _ in range(B)]


def paged_store(gen: torch.Generator, lengths: list[list[int]], capacity: int, page: int, D: int,
                dtype: torch.dtype, spare: int, g_floor: float = 0.5) -> list[torch.Tensor]:
    """Random K/V, and g in [g_floor, 1), in a pool holding exactly these lengths (B, Hkv) under shuffled
    tables, plus `spare` free pages: [pool_k, pool_v, pool_g, free_pages, n_free, page_table, global_len]."""
    global_len = torch.tensor(lengths)                                                         # (B, Hkv)
    B, H = global_len.shape
    held = (global_len + page - 1) // page
    N = int(held.sum()) + spare
    order = torch.randperm(N, generator=gen)
    M = -(-capacity // page)
    page_table = torch.full((B, H, M), N, dtype=torch.int64)
    taken = 0
    for b in range(B):
        for h in range(H):
            n = int(held[b, h])
            page_table[b, h, :n] = order[taken:taken + n]
            taken += n
    free_pages = torch.cat((order[taken:], torch.full((taken + 1,), N)))                       # (N + 1,)
    pool_k = torch.randn(N + 1, page, D, generator=gen).to(dtype)
    pool_v = torch.randn(N + 1, page, D, generator=gen).to(dtype)
    pool_g = torch.rand(N + 1, page, generator=gen) * (1 - g_floor) + g_floor
    return [pool_k, pool_v, pool_g, free_pages, torch.tensor([spare]), page_table, global_len]


def same_state(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    """Equal stores, the scratch page (the pool's last, which only the references write) aside."""
    return all(torch.equal(torch.nan_to_num(x[:-1]), torch.nan_to_num(y[:-1])) if i < 3 else torch.equal(x, y)
               for i, (x, y) in enumerate(zip(got, want)))


def shapes(rng: random.Random) -> dict:
    page = rng.choice([1, 2, 3, 4, 5, 8, 16])
    return dict(B=rng.randint(1, 3), H=rng.randint(1, 4), G=rng.choice([1, 2, 3, 4, 8]), D=rng.choice([16, 32, 64, 128]),
                dtype=rng.choice(DTYPES), page=page, capacity=rng.randint(1, 64), spare=rng.choice([0, 0, 1, 2, 3, 8]))


def case_decode(rng: random.Random, gen: torch.Generator) -> tuple[dict, float, bool]:
    s = shapes(rng)
    lengths = draw_lengths(rng, s["B"], s["H"], s["capacity"], s["page"])
    pool_k, pool_v, _, _, _, page_table, global_len = paged_store(gen, lengths, s["capacity"], s["page"], s["D"],
                                                                  s["dtype"], s["spare"])
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
    state = paged_store(gen, lengths, s["capacity"], s["page"], s["D"], s["dtype"], s["spare"] + rng.randint(0, 12))
    k = torch.randn(s["B"], s["H"], T, s["D"], generator=gen).to(s["dtype"])
    v = torch.randn(s["B"], T, s["H"], s["D"], generator=gen).to(s["dtype"]).transpose(1, 2)   # another layout
    g = torch.rand(s["B"], s["H"], T, generator=gen)
    if rng.random() < 0.3:
        g[rng.randrange(s["B"]), rng.randrange(s["H"])] = rng.choice([0.05, 0.95])   # a head admitting none or all
    idx, count = kernels.compact_admitted_ref(g, TAU, W)
    ref_state = [x.clone() for x in state]
    kernels.store_admitted(*state, k, v, g, idx, count)
    kernels.store_admitted_ref(*ref_state, k, v, g, idx, count)
    return s, 0.0, same_state(state, ref_state)


def case_promote(rng: random.Random, gen: torch.Generator) -> tuple[dict, float, bool]:
    s = shapes(rng)
    lengths = draw_lengths(rng, s["B"], s["H"], s["capacity"], s["page"])
    steps = rng.randint(1, 5)
    s.update(lengths=lengths, steps=steps)
    state = paged_store(gen, lengths, s["capacity"], s["page"], s["D"], s["dtype"], s["spare"])
    ref_state = [x.clone() for x in state]
    ok = True
    for _ in range(steps):
        k_out = torch.randn(s["B"], s["H"], s["D"], generator=gen).to(s["dtype"])
        v_out = torch.randn(s["B"], s["H"], s["D"], generator=gen).to(s["dtype"])
        # An empty ring slot (-1), rejected, admitted below the stores' gates, admitted above.
        g_out = torch.tensor([rng.choice([-1.0, 0.2, 0.55, 0.9, rng.random()]) for _ in range(s["B"] * s["H"])])
        g_out = g_out.view(s["B"], s["H"])
        kernels.promote(*state, k_out, v_out, g_out, TAU)
        kernels.promote_ref(*ref_state, k_out, v_out, g_out, TAU)
        ok = ok and same_state(state, ref_state)
    return s, 0.0, ok


CASES = {"decode_attention": case_decode, "store_admitted": case_store, "promote": case_promote}


def sweep(n_cases: int, seed: int, report=None) -> dict[str, tuple[int, int, float]]:
    """{kernel: (cases, mismatches, largest error)}; report(kernel, case) is called on each mismatch."""
    results = {}
    for name, run in CASES.items():
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases per kernel (default: 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.cases < 1:
        print("sweep_paged.py: error: --cases must be at least 1", file=sys.stderr)
        sys.exit(2)
    results = sweep(args.cases, args.seed, report=lambda name, case: print(f"MISMATCH {name}: {case}", file=sys.stderr))
    for name, (n, bad, worst) in results.items():
        print(f"{name}: {n} cases, {bad} mismatches" + (f", largest error {worst:.2f} of the tolerance"
                                                         if name == "decode_attention" else ", exact"))
    sys.exit(1 if any(bad for _, bad, _ in results.values()) else 0)
