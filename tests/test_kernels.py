"""Each Triton kernel against its PyTorch reference (kernels.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (kernels.py selects it at
import), which is slow: shapes stay small, and the cases are chosen so that together they cover
GQA ratios 1, 3, 4, 8, head dims 64 and 128, float32 / bfloat16 / float16, W of 1, W not a
multiple of the tile and W larger than T, T not a multiple of the tile, lengths from 0 to capacity.
Every allocation a kernel's op makes is poisoned (NaN, or the largest integer), and in-place
outputs are poisoned by the test, so an element a kernel forgets to write fails the comparison.
"""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench_gpu
import kernels
import pages
from bench_gpu import TOL, same_store

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TAU = 0.5
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty fills new memory with NaN (floats) or the largest integer while this is active."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def assert_close(out, ref, dtype):
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("B, Hkv, T, W", [(1, 1, 1, 1), (2, 3, 45, 1), (1, 2, 100, 17), (1, 2, 20, 64), (2, 1, 33, 33)])
def test_compact_admitted(B, Hkv, T, W):
    torch.manual_seed(T + W)
    g = torch.rand(B, Hkv, T, device=DEVICE)
    g[0, 0, : T // 3] = 0.9   # one head admits a long run, another may admit none
    with poisoned_allocations():
        idx, count = kernels.compact_admitted(g, TAU, W)
    ref_idx, ref_count = kernels.compact_admitted_ref(g, TAU, W)
    assert torch.equal(count, ref_count)
    assert torch.equal(idx, ref_idx)   # the same stable partition, padding included


# (G, D, dtype, T, W, admitted fraction): T crosses the 32-row / 16-key interpreter tiles unevenly.
PREFILL_CASES = [
    (1, 64, torch.float32, 37, 1, 0.3),
    (3, 64, torch.bfloat16, 29, 5, 0.5),
    (4, 128, torch.float16, 45, 19, 0.3),
    (8, 64, torch.bfloat16, 21, 40, 0.5),     # W > T: the band is everything
    (4, 64, torch.float32, 50, 16, 1.0),      # everything outside the band admitted: dense causal
    (8, 128, torch.float32, 26, 3, 0.0),      # nothing admitted: the band alone
    (1, 128, torch.bfloat16, 70, 23, 0.2),
    (3, 128, torch.float16, 33, 1, 0.7),
]


@pytest.mark.parametrize("G, D, dtype, T, W, frac", PREFILL_CASES)
@pytest.mark.parametrize("queries", ["all", "last"])
def test_gated_prefill_attention(G, D, dtype, T, W, frac, queries):
    """queries "last": only the last tokens ask (a chunk appended to what a cache holds), a number that
    crosses the query tiles unevenly."""
    torch.manual_seed(G * T + W)
    B, Hkv = 1, 2
    Tq = T if queries == "all" else T // 2 + 3
    q, k, v = randn(B, Hkv * G, Tq, D, dtype=dtype), randn(B, Hkv, T, D, dtype=dtype), randn(B, Hkv, T, D, dtype=dtype)
    g = torch.where(torch.rand(B, Hkv, T, device=DEVICE) < frac, 0.9, 0.1)
    idx, count = kernels.compact_admitted_ref(g, TAU, W)
    with poisoned_allocations():
        out = kernels.gated_prefill_attention(q, k, v, idx, count, W, D ** -0.5)
    ref = kernels.gated_prefill_attention_ref(q, k, v, idx, count, W, D ** -0.5)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("prefill", [
    kernels.gated_prefill_attention,
    # The reference in query blocks of 8: each block reads a different prefix of the admitted keys.
    lambda *args: kernels.gated_prefill_attention_ref(*args, block=8),
], ids=["triton", "reference"])
@pytest.mark.parametrize("queries", [40, 13], ids=["all", "last"])
def test_gated_prefill_matches_the_visibility_rule(prefill, queries):
    """Kernel and reference against the visibility mask (DESIGN.md) on dense attention, batch 2, admission differing
    per head, v laid out as the model makes it (B, T, Hkv, D) transposed, unlike k; "last": only the last
    13 tokens ask (a chunk after what a cache holds)."""
    torch.manual_seed(0)
    B, Hkv, G, T, D, W = 2, 2, 2, 40, 64, 7
    q, k, v = randn(B, Hkv * G, queries, D), randn(B, Hkv, T, D), randn(B, T, Hkv, D).transpose(1, 2)
    g = torch.rand(B, Hkv, T, device=DEVICE)
    idx, count = kernels.compact_admitted(g, TAU, W)
    out = prefill(q, k, v, idx, count, W, D ** -0.5)
    i, j = torch.arange(T - queries, T, device=DEVICE)[:, None], torch.arange(T, device=DEVICE)[None, :]
    mask = (j <= i) & ((i - j < W) | (g[:, :, None, :] > TAU))                               # (B, Hkv, Tq, T)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask.repeat_interleave(G, 1))
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("mask", ["none", "visible", "causal"])
def test_attention_lse(mask):
    """The attention and its log-sum-exp against float64 softmax, masked rows included."""
    torch.manual_seed(1)
    q, k, v = randn(2, 3, 9, 16), randn(2, 3, 9, 16), randn(2, 3, 9, 16)
    visible = {"none": torch.ones(9, 9, dtype=torch.bool), "causal": torch.ones(9, 9, dtype=torch.bool).tril(),
               "visible": torch.rand(9, 9) < 0.5}[mask].to(DEVICE)
    visible[:, 0] = True
    scores = (q.double() @ k.double().transpose(-1, -2) * 0.3).masked_fill(~visible, float("-inf"))
    o, lse = kernels.attention_lse(q, k, v, 0.3, visible if mask == "visible" else None, causal=mask == "causal")
    assert o.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o.double(), scores.softmax(-1) @ v.double(), rtol=1e-5, atol=1e-5)


def paged_store(lengths, capacity, page_size, D, dtype, spare_pages=0, seed=0):
    """bench_gpu.paged_store's random store (shuffled page tables, spare_pages free pages), seeded, on DEVICE, its
    gates in [0.6, 1) so that a test can plant the lowest one."""
    state = bench_gpu.paged_store(torch.tensor(lengths), capacity, page_size, D, spare_pages, dtype,
                                  torch.Generator().manual_seed(seed), g_floor=0.6)
    return [x.to(DEVICE) for x in state]


# (G, D, dtype, ring capacity W, ring_len (one for every row, or one per row), global lengths per (batch, head),
# page size); capacity C = 48.
DECODE_CASES = [
    (1, 64, torch.float32, 16, 16, [[0, 48]], 16),
    (3, 64, torch.bfloat16, 20, 7, [[48, 1]], 3),
    (4, 128, torch.float16, 8, 0, [[13, 0], [30, 47]], 1),   # empty ring
    (3, 64, torch.float32, 20, [3, 20], [[9, 0], [30, 2]], 3),  # rows at different positions: their own ring lengths
    (8, 128, torch.bfloat16, 16, 3, [[0, 0]], 16),           # global stores empty
    (4, 64, torch.float32, 16, 0, [[0, 5]], 4),              # one head sees no key at all: output 0
    (4, 128, torch.bfloat16, 16, 16, [[1, 100]], 16),        # 100x imbalance (capacity raised below)
]


@pytest.mark.parametrize("G, D, dtype, W, ring_len, lengths, page_size", DECODE_CASES)
def test_decode_attention(G, D, dtype, W, ring_len, lengths, page_size):
    torch.manual_seed(G + D + W)
    C = max(48, max(max(row) for row in lengths))
    store = paged_store(lengths, C, page_size, D, dtype, spare_pages=2)
    pool_k, pool_v, _, _, _, page_table, global_len = store
    B, Hkv = global_len.shape
    q = randn(B, Hkv * G, D, dtype=dtype)
    ring_k, ring_v = randn(B, Hkv, W, D, dtype=dtype), randn(B, Hkv, W, D, dtype=dtype)
    ring_len = torch.tensor(ring_len, device=DEVICE)
    args = (q, ring_k, ring_v, ring_len, pool_k, pool_v, page_table, global_len, D ** -0.5)
    with poisoned_allocations():
        out = kernels.decode_attention(*args)
    ref = kernels.decode_attention_ref(*args)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype)
    # The reference's compiled form (every head over the longest store's pages, masked), run eagerly here.
    assert_close(kernels.attention_padded(*args), ref, dtype)
    # The paged reference is plain attention over each head's ring and stored tokens.
    keys, values = pages.gather_store(pool_k, page_table, page_table.shape[-1]), pages.gather_store(pool_v, page_table, page_table.shape[-1])
    for b in range(B):
        for h in range(Hkv):
            n = int(global_len[b, h])
            r = int(ring_len.expand(B)[b])
            k = torch.cat((ring_k[b, h, :r], keys[b, h, :n])).float()
            v = torch.cat((ring_v[b, h, :r], values[b, h, :n])).float()
            qh = q[b, h * G:(h + 1) * G].float()
            want = torch.softmax(qh @ k.T * D ** -0.5, -1) @ v if len(k) else torch.zeros_like(qh)
            assert_close(ref[b, h * G:(h + 1) * G], want, dtype)


# (T, capacity, page size, lengths already stored, spare pages): fits; overflows the capacity; the pool runs
# out part-way through the heads; appends to stores that hold tokens already.
STORE_CASES = [(40, 64, 16, [[0, 0], [0, 0]], 12), (40, 40, 1, [[0, 0], [0, 0]], 160), (50, 6, 4, [[0, 0], [0, 0]], 8),
               (45, 48, 3, [[0, 0], [0, 0]], 13), (30, 48, 5, [[7, 0], [10, 3]], 9)]


@pytest.mark.parametrize("T, C, page_size, lengths, spare", STORE_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_admitted(T, C, page_size, lengths, spare, dtype):
    """Where the room suffices every admitted token is kept in order; else the highest g that fit."""
    torch.manual_seed(T + C)
    B, Hkv, D, W = 2, 2, 64, 4
    k, v = randn(B, Hkv, T, D, dtype=dtype), randn(B, T, Hkv, D, dtype=dtype).transpose(1, 2)   # two layouts
    g = torch.rand(B, Hkv, T, device=DEVICE)
    g[1, 1] = 0.05                                       # a head that admits nothing
    idx, count = kernels.compact_admitted_ref(g, TAU, W)
    state = paged_store(lengths, C, page_size, D, dtype, spare_pages=spare)
    state[0][:] = float("nan")                           # rows the store does not write stay NaN
    ref_state = [x.clone() for x in state]
    with poisoned_allocations():
        kernels.store_admitted(*state, k, v, g, idx, count)
    kernels.store_admitted_ref(*ref_state, k, v, g, idx, count)
    assert same_store(state, ref_state)
    glen, before = state[6], torch.tensor(lengths, device=DEVICE)
    assert int((glen - before).max()) > 0 and torch.equal(glen[1, 1], before[1, 1])
    # Each head's new tokens: all its admitted ones, or as many as it had room for, the highest g first.
    stored_k = pages.gather_store(state[0], state[5], state[5].shape[-1])
    for b in range(B):
        for h in range(Hkv):
            n0, n = int(before[b, h]), int(glen[b, h])
            admitted = idx[b, h, :int(count[b, h])]
            chosen = admitted if n - n0 == len(admitted) else admitted[g[b, h, admitted].argsort(descending=True)[:n - n0]]
            assert torch.equal(stored_k[b, h, n0:n], k[b, h, chosen.sort().values if n - n0 == len(admitted) else chosen])


def test_promote():
    """Ring-exit tokens over several steps: heads filling pages and taking new ones until the pool runs out,
    heads without room replacing their lowest g."""
    torch.manual_seed(0)
    B, Hkv, C, D, P = 2, 3, 20, 128, 4
    state = paged_store([[0, 19, 20], [20, 5, 8]], C, P, D, torch.bfloat16, spare_pages=2)
    pool_g, page_table = state[2], state[5]
    lowest = pages.pool_rows(page_table, torch.tensor([7, 13]).expand(B, Hkv, 2), P)[1, 0]
    pool_g.view(-1)[lowest] = 0.55                       # a tie for the lowest: the first slot goes
    ref_state = [x.clone() for x in state]
    replaced = []
    for step in range(6):
        k_out, v_out = randn(B, Hkv, D, dtype=torch.bfloat16), randn(Hkv, B, D, dtype=torch.bfloat16).transpose(0, 1)
        # Gates: an empty ring slot (-1), below tau, admitted but below a full store's lowest, and high.
        g_out = torch.tensor([[-1.0, 0.2, 0.51], [0.7, 0.95, 0.9]], device=DEVICE).roll(step, dims=1)
        written = kernels.promote(*state, k_out, v_out, g_out, TAU)
        assert torch.equal(written, kernels.promote_ref(*ref_state, k_out, v_out, g_out, TAU))
        assert same_store(state, ref_state)
        replaced.append(written.clone())
    assert int(state[4]) == 0 and int(state[6][0, 1]) == 20 and int(state[6][0, 0]) > 0
    written = torch.stack(replaced)                      # (steps, B, Hkv): -1 where nothing was written
    assert (written == -1).any() and written[:2, 1, 0].tolist() == [7, 13]     # the tie's first slot, then the other


def test_paged_sweep_a_few_dozen_cases():
    """bench_gpu.py --random-cases (BENCHMARKS.md's run has 1,000 per kernel), a dozen per kernel."""
    mismatches = []
    results = bench_gpu.random_cases(12, seed=1, report=lambda name, case: mismatches.append((name, case)))
    assert not mismatches and {name: n for name, (n, _, _) in results.items()} == dict.fromkeys(bench_gpu.RANDOM_CASES, 12)


@pytest.mark.parametrize("capacity", [None, 3])
def test_generate_triton_matches_torch_backend(capacity):
    """Greedy generation through the write-gated cache gives the same tokens on both backends (the
    default capacity, and a store of 3 slots that overflows in prefill and evicts during decode)."""
    import gate
    import generate
    from model import LlamaConfig, Transformer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96)
    model = Transformer(config).to(DEVICE).eval().requires_grad_(False)
    prompt = torch.randint(config.vocab_size, (19,)).tolist()
    tokens, logits = {}, {}
    for backend in ("torch", "triton"):
        gate.setup_write_gated(model, "random:0.5", batch_size=1, max_seq_len=24, dtype=torch.float32, device=DEVICE,
                               window=4, threshold=0.1, global_capacity=capacity, backend=backend)
        logits[backend] = model(torch.tensor([prompt], device=DEVICE))                           # (1, T, vocab)
        tokens[backend], _ = generate.generate(model, prompt, max_new_tokens=4)
    assert_close(logits["triton"], logits["torch"], torch.float32)
    assert len(tokens["torch"]) == 4 and tokens["triton"] == tokens["torch"]


# --- ahead of time: every kernel built for the GPUs it targets, at the tiles its launcher picks there ---
# Triton compiles for a GPU it does not have (its own passes, then ptxas), so every kernel is built here, in a
# child process without the interpreter, for an A100, an L40S and an H100, in bfloat16, float16 and float32, at
# head dims 64 and 128, with the tiles kernels.tiles_for picks from that GPU's limits, at 8 KV heads and pages
# of 16 (Llama-3.1-8B's and Qwen3-4B's attention; SmolLM2-135M's at head dim 64).
AOT_TARGETS = {   # each GPU's own limits: shared memory a block may opt in to, multiprocessors, compute capability
    "sm_80": kernels.DeviceLimits(166912, 108, (8, 0)),     # A100
    "sm_89": kernels.DeviceLimits(101376, 142, (8, 9)),     # L40S (an RTX 4090 has 128 multiprocessors, an L4 58)
    "sm_90": kernels.DeviceLimits(232448, 132, (9, 0)),     # H100 SXM
}
AOT_KERNELS = ["_compact_kernel", "_gated_prefill_kernel", "_store_kernel", "_promote_kernel",
               "_decode_split_kernel", "_decode_merge_kernel"]
AOT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
AOT_GROUPS = {64: 3, 128: 4}   # head dim: query heads per KV head
# The element types of the pointers that are not of the model's dtype.
POINTER_TYPES = {"IDX": "*i64", "COUNT": "*i64", "RLEN": "*i64", "GLEN": "*i64", "KEEP": "*i64", "NKEEP": "*i64",
                 "TABLE": "*i64", "ROOM": "*i8", "G": "*fp32", "PG": "*fp32", "GSRC": "*fp32", "GO": "*fp32",
                 "PART_O": "*fp32", "PART_LSE": "*fp32", "WRITTEN": "*i64"}


def aot_build(kernel: str, dtype: str, head_dim: int, limits: kernels.DeviceLimits):
    """How kernel's launcher builds it for a GPU with these limits: (capability, kernel, signature, constexprs,
    compile options), hashable, so that equal builds are compiled once; the tiles and the launcher's estimate of
    their shared memory (None for the kernels without tiles, which launch with Triton's default options)."""
    G, D, dt = AOT_GROUPS[head_dim], head_dim, AOT_DTYPES[dtype]
    prefill, decode = (kernels.tiles_for(op, dt, D, limits) for op in ("prefill", "decode"))
    dots = dict(UPCAST=False, PRECISION="tf32x3" if dt == torch.float32 else "tf32")   # kernels._dot_options on a GPU
    tiles, constexprs = {
        "_compact_kernel": (None, dict(HKV=8, BLOCK_T=1024)),
        "_gated_prefill_kernel": (prefill, dict(HKV=8, G=G, D=D, SEARCH_STEPS=4, **dots)),
        "_store_kernel": (None, dict(HKV=8, D=D, PAGE=16, BLOCK_S=64)),
        "_promote_kernel": (None, dict(HKV=8, D=D, PAGE=16, BLOCK_C=1024)),
        "_decode_split_kernel": (decode, dict(HKV=8, G=G, G_PAD=16, D=D, PAGE=16, BH_PAD=8, **dots)),
        "_decode_merge_kernel": (None, dict(HKV=8, G=G, G_PAD=16, D=D, BLOCK_N=decode["BLOCK_N"], BH_PAD=8)),
    }[kernel]
    options, estimate = {}, None
    if tiles is not None:
        constexprs |= {key: value for key, value in tiles.items() if key.isupper()}
        options = dict(num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
        estimate = kernels.shared_memory(tiles, dt, D, limits.capability)
    signature = {}
    for arg in getattr(kernels, kernel).arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ("qk_scale", "threshold"):
            signature[arg] = "fp32"
        elif arg in ("T", "C", "BH", "N_PROGRAMS", "window", "offset") or arg.startswith("stride"):
            signature[arg] = "i32"
        else:
            signature[arg] = POINTER_TYPES.get(arg, "*" + dtype)
    build = (limits.capability, kernel, tuple(signature.items()), tuple(constexprs.items()), tuple(options.items()))
    return build, tiles, estimate


def aot_compile(build) -> dict:
    """Compile one build with Triton and ptxas; what they report of it. ptxas's registers and spills come from its
    log, which Triton prints (TRITON_DUMP_PTXAS_LOG) when it compiles (TRITON_ALWAYS_COMPILE: never from its cache)."""
    import contextlib
    import io
    import re
    import time
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    (major, minor), name, signature, constexprs, options = build
    kernel, signature = getattr(kernels, name), dict(signature)
    # Pointers 16-byte aligned and strides multiples of 16, as the launchers find them at these shapes.
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
             if signature[arg][0] == "*" or arg.startswith("stride")}
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        binary = compile(ASTSource(kernel, signature, dict(constexprs), attrs),
                         target=GPUTarget("cuda", 10 * major + minor, 32), options=dict(options))
    seconds = time.perf_counter() - start
    registers = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    assert registers and spills, f"no ptxas report for {name} in: {log.getvalue()[-2000:]}"
    ttgir = binary.asm["ttgir"]
    return dict(shared=binary.metadata.shared, registers=int(registers[1]), spill_stores=int(spills[1]),
                spill_loads=int(spills[2]), async_copies=ttgir.count("async_copy_global_to_local"),
                wgmma=len(re.findall(r"warp_group_dot ", ttgir)), seconds=round(seconds, 1))


def aot_cases() -> dict:
    """{(target, kernel, dtype, head dim): aot_build(...)} for every one."""
    return {(target, kernel, dtype, D): aot_build(kernel, dtype, D, limits)
            for target, limits in AOT_TARGETS.items() for kernel in AOT_KERNELS for dtype in AOT_DTYPES for D in AOT_GROUPS}


def compile_ahead_of_time():
    """Build every case, each distinct build once, in parallel, the slowest (float32 attention) first; print one
    JSON line per case. Run without the interpreter: TRITON_INTERPRET=0 python tests/test_kernels.py"""
    import json
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    os.environ.update(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")    # the workers inherit it
    cases = aot_cases()
    slowest_first = sorted(cases, key=lambda case: (cases[case][1] is None, case[2] != "fp32",
                                                    case[1] != "_gated_prefill_kernel"))
    builds = list(dict.fromkeys(cases[case][0] for case in slowest_first))
    with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        reports = dict(zip(builds, pool.map(aot_compile, builds)))
    for (target, kernel, dtype, D), (build, tiles, estimate) in cases.items():
        print(json.dumps(dict(target=target, kernel=kernel, dtype=dtype, head_dim=D, tiles=tiles, estimate=estimate,
                              **reports[build])))


def test_kernels_compile_ahead_of_time(capsys):
    """The interpreter accepts code the GPU compiler rejects, and runs tiles that would spill registers or
    overflow a GPU's shared memory. Every kernel must build for sm_80, sm_89 and sm_90 at the tiles its launcher
    picks there, spill no register (ptxas's report), fit the GPU's shared memory and the launcher's estimate of it,
    and pipeline its K/V loads (async copies; the 16-bit prefill's dots on Hopper's wgmma). Its time is printed."""
    import json
    import tempfile
    import time
    pytest.importorskip("triton.backends.nvidia")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO), "TRITON_CACHE_DIR": cache}
        result = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    builds = [json.loads(line) for line in result.stdout.splitlines()]
    cases = aot_cases()
    assert sorted((b["target"], b["kernel"], b["dtype"], b["head_dim"]) for b in builds) == sorted(cases)
    for b in builds:
        assert b["spill_stores"] == b["spill_loads"] == 0, b
        assert b["shared"] <= AOT_TARGETS[b["target"]].shared_memory, b
        if b["tiles"] is not None:
            assert b["shared"] <= b["estimate"] and b["async_copies"] > 0, b
        if b["kernel"] == "_gated_prefill_kernel" and b["target"] == "sm_90" and b["dtype"] != "fp32":
            assert b["wgmma"] > 0, b
    with capsys.disabled():
        distinct = len({build for build, _, _ in cases.values()})
        print(f"\n[ahead-of-time check: {len(builds)} kernel builds ({distinct} distinct) for "
              f"{', '.join(AOT_TARGETS)}, no spills, in {seconds:.0f} s on {os.cpu_count()} CPUs]")


def test_bench_gpu_dry_run():
    """The GPU benchmark runs end to end on the CPU at tiny shapes, so it cannot rot between GPU visits. Run as
    on a machine with CUDA (torch.cuda.is_available() made to say so), where the dry run must still choose
    Triton's interpreter itself (this process's TRITON_INTERPRET, set by kernels.py, is not passed on)."""
    as_with_cuda = ("import runpy, sys, torch; torch.cuda.is_available = lambda: True; "
                    "sys.argv = ['bench_gpu.py', '--dry-run']; runpy.run_path('bench_gpu.py', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", as_with_cuda], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    for row in ("compact_admitted", "gated_prefill_attention", "store_admitted", "decode_attention", "promote"):
        assert f"| {row}" in table
    assert "FAIL" not in table and "| error" not in table and "error:" not in table


if __name__ == "__main__":
    compile_ahead_of_time()
