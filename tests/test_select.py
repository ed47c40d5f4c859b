"""Selection (Quest over the admitted pages, DESIGN.md's Selection): the page summaries stay exact on every path
that writes, moves or frees a slot; a decode step reads the pages the rule picks, checked against a plain
reference at every step; a budget that covers the store changes nothing; compiled equals eager; the flags."""
import math

import pytest
import torch

import gate
import generate
from cache import Eviction, WriteGatedCache
from test_gated_cache import generate as greedy
from test_gated_cache import random_gates, tiny_model

WINDOW = 4


def build(model, policy, max_seq_len, select_budget=None, page_size=4, batch_size=2, backend="torch", **options):
    """gate.build_caches with the write-gated cache (policy: a --gate spec, or gate modules)."""
    options = dict(evict=None) | options
    return gate.build_caches(model, max_seq_len, batch_size=batch_size, gate=policy, window=WINDOW,
                             page_size=page_size, backend=backend, select_budget=select_budget, **options)


def caches(model) -> list[WriteGatedCache]:
    return [layer.attention.cache for layer in model.layers]


def assert_summaries_exact(model) -> None:
    """Every held page's kmin and kmax are the min and max of its filled slots' keys, recomputed from the store."""
    for cache in caches(model):
        P = cache.pool.page_size
        keys = cache.store_contents()[0]                                                       # (B, Hkv, C, D)
        for (b, h), n in zip(torch.cartesian_prod(*map(torch.arange, cache.global_len.shape)).tolist(),
                             cache.global_len.flatten().tolist()):
            for j in range(math.ceil(n / P)):
                page, filled = cache.page_table[b, h, j], keys[b, h, j * P:min(n, (j + 1) * P)]
                assert torch.equal(cache.pool.kmin[page], filled.amin(0)), (b, h, j)
                assert torch.equal(cache.pool.kmax[page], filled.amax(0)), (b, h, j)


def rule(q, keys, n, P, k):
    """The rule for one (batch row, KV head), plainly: q (G, D) its query heads, keys (C, D) its store, n tokens
    held. Returns the store columns read, in store order, and the tokens they hold."""
    held = math.ceil(n / P)
    if held <= k:
        return list(range(held)), n
    score = []
    for j in range(held):
        page = keys[j * P:min(n, (j + 1) * P)].float()
        lo, hi = page.amin(0), page.amax(0)
        score.append(max(float(torch.maximum(qh.float() * hi, qh.float() * lo).sum()) for qh in q))
    partial = [held - 1] if n % P else []
    others = sorted(range(held - len(partial)), key=lambda j: (-score[j], j))[:k - len(partial)]
    columns = sorted(others + partial)
    return columns, sum(min(n, (j + 1) * P) - j * P for j in columns)


class Checked(WriteGatedCache):
    """The write-gated cache, with its selection and its decode output checked against the rule at every step."""

    checked = 0

    def select(self, q):
        table, length = super().select(q)
        P, (B, Hkv, _) = self.pool.page_size, self.page_table.shape
        keys, values = self.store_contents()[:2]
        self.read = []
        for b in range(B):
            for h in range(Hkv):
                G = q.shape[1] // Hkv
                columns, n = rule(q[b, h * G:(h + 1) * G], keys[b, h], int(self.global_len[b, h]), P, self.select_pages)
                assert table[b, h, :len(columns)].tolist() == self.page_table[b, h, columns].tolist()
                assert int(length[b, h]) == n
                slots = torch.cat([torch.arange(j * P, (j + 1) * P) for j in columns] or [torch.arange(0)])[:n]
                self.read.append((keys[b, h, slots], values[b, h, slots]))
        type(self).checked += 1
        return table, length

    def decode(self, q, k, v, g, input_pos):
        y = super().decode(q, k, v, g, input_pos)                                              # (B, Hq, 1, D)
        B, Hkv, W, D = self.ring_k.shape
        G, ring_len = q.shape[1] // Hkv, min(int(input_pos.max()) + 1, W)
        for b in range(B):
            for h in range(Hkv):
                k_read, v_read = self.read[b * Hkv + h]
                keys = torch.cat((self.ring_k[b, h, :ring_len], k_read))
                values = torch.cat((self.ring_v[b, h, :ring_len], v_read))
                p = torch.softmax(q[b, h * G:(h + 1) * G, 0] @ keys.T * self.scale, dim=-1)
                torch.testing.assert_close(y[b, h * G:(h + 1) * G, 0], p @ values, rtol=1e-5, atol=1e-5)
        return y


@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("page_size", [1, 3])
def test_a_small_budget_reads_what_the_rule_picks(n_kv_heads, page_size):
    """A greedy run whose stores outgrow the budget: at every step, each head reads the pages the rule picks, and
    its attention is the softmax over its window and those pages; the summaries stay exact as pages fill."""
    model = tiny_model(n_kv_heads)
    budget = WINDOW + 3 * page_size                                                            # 3 pages of the store
    build(model, random_gates(model), 48, select_budget=budget, page_size=page_size, cache=Checked)
    Checked.checked = 0
    prompt = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(1))
    greedy(model, prompt, 12)
    assert Checked.checked == 12 * len(model.layers)
    assert_summaries_exact(model)
    assert all(int(c.global_len.max()) > 3 * page_size + 1 for c in caches(model))            # selection chose
    stats = gate.admission_stats(model)
    assert 0 < stats["tokens_read_per_step"] <= budget and stats["pages_scored_per_step"] > 3


def test_ties_go_to_the_lower_page_and_the_partial_page_is_always_read():
    """A query of zeros scores every page 0: the lowest pages win, and the partly filled last page is read."""
    model = tiny_model(2)
    build(model, "full", 40, select_budget=WINDOW + 3 * 4, page_size=4)
    model(torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(2)))          # 26 tokens stored
    cache = caches(model)[0]
    table, length = cache.select(torch.zeros(2, model.config.n_heads, model.config.head_dim))
    assert torch.equal(table, cache.page_table[:, :, [0, 1, 6]]) and length.eq(4 + 4 + 2).all()


@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("policy", ["full", "learned"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_a_budget_that_covers_the_store_changes_nothing(n_kv_heads, policy, page_size):
    """Quest alone (full) and gate + selection with a budget of the whole store: the logits of no selection, and
    the same tokens for a batch of prompts of different lengths."""
    model = tiny_model(n_kv_heads)
    spec = "full" if policy == "full" else random_gates(model)
    prompt = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    prompts = [prompt[0, :17].tolist(), prompt[1, :40].tolist()]
    runs = []
    for budget in (None, WINDOW + 64):
        build(model, spec, 64, select_budget=budget, page_size=page_size)
        tokens, logits = greedy(model, prompt, 10)
        runs.append((tokens, logits, generate.generate_rows(model, prompts, 10)[0]))
    (tokens, logits, rows), (tokens_sel, logits_sel, rows_sel) = runs
    assert torch.equal(tokens, tokens_sel) and rows == rows_sel
    torch.testing.assert_close(logits_sel, logits, rtol=1e-5, atol=1e-5)


def test_summaries_stay_exact_through_replacement_drops_and_eviction():
    """Paths that move or free slots: a full head's lowest-g entry replaced (promote), a chunked prefill whose
    store and chunk compete for a head's capacity (within_capacity's drops), and a small pool's evictions
    (lowest-g: drops in every layer; snapkv: compaction). After each, the summaries equal a recomputation."""
    model = tiny_model(2)
    gates = random_gates(model)
    prompt = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(4))
    build(model, gates, 64, select_budget=WINDOW + 2 * 3, page_size=3, global_capacity=7)
    model(prompt[:, :20], torch.arange(20))
    model(prompt[:, 20:], torch.arange(20, 40))                                               # competes for 7 slots
    assert sum(int(c.n_capacity_drops.sum()) for c in caches(model)) > 0
    assert_summaries_exact(model)
    greedy(model, prompt, 8)                                                                   # full heads replace
    assert_summaries_exact(model)
    for evict in ("lowest-g", "snapkv"):
        setup = build(model, "full", 80, select_budget=WINDOW + 2 * 3, page_size=3, kv_budget="60", evict=evict)
        evictor: Eviction = setup.evictor
        evictor.every = 2
        tokens = prompt
        logits = model(tokens)
        assert_summaries_exact(model)
        for step in range(1, 9):
            tokens = logits[:, -1:].argmax(-1)
            logits = model(tokens, torch.tensor([39 + step]))
            evictor.after_step(step)
            assert_summaries_exact(model)
        assert evictor.passes > 0 and sum(int(c.n_evicted.sum()) for c in caches(model)) > 0, evict


def test_the_triton_path_selects_as_the_torch_path():
    """The Triton kernels (promote's written slot, the decode over a selected page table), in the interpreter."""
    model = tiny_model(2, n_layers=1)
    gates = random_gates(model)
    prompt = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(5))
    runs = []
    for backend in ("torch", "triton"):
        build(model, gates, 40, select_budget=WINDOW + 2 * 3, page_size=3, backend=backend)
        runs.append(greedy(model, prompt, 6))
        assert_summaries_exact(model)
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-4, atol=1e-4)


def test_compiled_decode_selects_as_eager_without_recompiling():
    """One torch.compile(fullgraph=True) of the model serves every step while the stores grow past the budget."""
    model = tiny_model(2)
    build(model, random_gates(model), 32, select_budget=WINDOW + 2 * 4, page_size=4)
    prompt = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(6))
    grown = lambda: max(int(c.global_len.max()) for c in caches(model))                       # noqa: E731

    def run(step, stance_after_first="default"):
        logits = [model(prompt, torch.arange(12))[:, -1:]]
        for pos in range(12, 24):
            logits.append(step(logits[-1].argmax(-1), torch.tensor([pos])).clone())
            torch.compiler.set_stance(stance_after_first)
        torch.compiler.set_stance("default")
        return torch.cat(logits, 1)

    eager = run(model)
    assert grown() > 2 * 4 + 1
    torch._dynamo.reset()
    compiled = run(torch.compile(model, fullgraph=True), stance_after_first="fail_on_recompile")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_the_flags(tmp_path, capsys):
    """--select-budget in generate.py: a budget below window + page is one line and exit 2, as is --gate dense;
    --gate full --select-budget is Quest alone, and the stats line says what a decode step read."""
    from tiny import save_tiny_checkpoint
    checkpoint = save_tiny_checkpoint(tmp_path, "chatml", seed=3)
    options = dict(checkpoint=str(checkpoint), prompt="What is the capital of France?", max_new_tokens=8,
                   window=4, page_size=2, attn_backend="torch")
    for bad in (dict(gate="full", select_budget=5), dict(gate="dense", select_budget=64)):
        with pytest.raises(generate.BadInput, match="select-budget"):
            generate.main(**options, **bad)
    generate.main(**options, gate="full", select_budget=4 + 2 * 2)
    out, err = capsys.readouterr()
    assert "select 8 tokens a step (2 pages and the window)" in err
    read = float(err.split("a decode step read ")[1].split()[0])
    assert 0 < read <= 8 and "scored " in err
