"""eval.py: the quick grid end to end on a tiny random model, the passkey generator and checker, the baselines' matching."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as ev
from gate import WriteGate, save_gates
from tiny import CORPUS, save_tiny_checkpoint
from tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
WINDOW = 32


def tiny_gates(n_layers: int, n_kv_heads: int, head_dim: int) -> list[WriteGate]:
    """Random gates whose bias puts tau = 0.1 near the middle of their scores, so they admit some tokens, not all."""
    torch.manual_seed(0)
    gates = [WriteGate(n_kv_heads, head_dim) for _ in range(n_layers)]
    with torch.no_grad():
        for g in gates:
            k = torch.randn(1, n_kv_heads, 256, head_dim)
            logit = torch.logit(g(k, k)) - g.b2[:, None]                                         # (1, Hkv, 256)
            g.b2.copy_(math.log(0.1 / 0.9) - logit[0].median(dim=-1).values)
    return gates


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    checkpoint = save_tiny_checkpoint(root / "tiny", max_position_embeddings=1024)
    # Two held-out "sources", each a long document of the tokenizer's own sentences, numbered.
    for source in ("prose", "code"):
        text = "\n".join(f"{CORPUS[i % len(CORPUS)]} ({source} {i})" for i in range(300))
        (root / "heldout" / source).mkdir(parents=True)
        (root / "heldout" / source / "doc.txt").write_text(text)
    (root / "gates").mkdir()
    save_gates(root / "gates" / "tiny-0.5.safetensors", tiny_gates(2, 2, 16),
               {"window": WINDOW, "threshold": 0.1, "lambda": 0.5})
    return root, checkpoint


def run_eval(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "eval.py"), "--threads", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def quick(setup):
    root, checkpoint = setup
    out = root / "eval.json"
    proc = run_eval("--quick", "--checkpoint", str(checkpoint), "--data", str(root / "heldout"),
                    "--gates-dir", str(root / "gates"), "--lengths", "160", "--docs", "2", "--decode-tokens", "16",
                    "--passkey-lengths", "400", "--depths", "0", "0.5", "1", "--keys", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_quick_runs_every_policy_and_task(quick):
    proc, result = quick
    names = ["dense", "tiny-0.5", "random ~ tiny-0.5", "none", "sink:4"]
    assert [r["policy"] for r in result["perplexity"]] == names
    assert [r["policy"] for r in result["decode"]] == names[:3] + ["snapkv ~ tiny-0.5"] + names[3:]
    assert [r["policy"] for r in result["passkey"]] == names[:3] + ["snapkv ~ tiny-0.5"] + names[3:]
    assert all(len(r["cells"]) == 3 for r in result["passkey"])
    assert [r["policy"] for r in result["multikey"]] == [r["policy"] for r in result["passkey"]]
    assert result["grid"]["keys"] == 3 and "### Multi-key retrieval (3 keys" in proc.stdout
    for table in ("passkey", "multikey"):
        rows = {r["policy"]: r for r in result[table]}
        assert rows["dense"]["planted_held"] == rows["dense"]["prompt_held"] == 1.0
        assert rows["none"]["planted_held"] == rows["none"]["prompt_held"] == 0.0
        assert 0.0 < rows["tiny-0.5"]["prompt_held"] < 1.0
    for table in ("perplexity", "decode", "passkey", "multikey"):
        for r in result[table]:
            assert 0.0 <= r["admitted"] <= 1.0 and 0.0 < r["kv_held"] <= 1.0
            assert f"| {r['policy']} | {r['admitted']:.1%} |" in proc.stdout
        rows = {r["policy"]: r for r in result[table]}
        # The memory axis is what was allocated: random's pool is exactly the pages its store needs (nothing
        # lost, and no more than the gate's pool at its default budget).
        assert rows["dense"]["allocated"] > 0
        assert rows["random ~ tiny-0.5"]["lost"] == rows["tiny-0.5"]["lost"] == 0
        assert rows["random ~ tiny-0.5"]["allocated"] <= rows["tiny-0.5"]["allocated"]
    rows = {r["policy"]: r for r in result["perplexity"]}
    assert 0.0 < rows["tiny-0.5"]["admitted"] < 1.0
    assert rows["dense"]["admitted"] == 1.0 and rows["none"]["admitted"] == 0.0
    # Dense against itself: exactly the reference in one prefill, the rounding floor when decoding.
    assert rows["dense"]["kl"] == 0.0 and rows["dense"]["top1"] == 1.0
    assert rows["none"]["kl"] > 1e-3 and rows["none"]["top1"] < 1.0
    decode = {r["policy"]: r for r in result["decode"]}
    assert abs(decode["dense"]["kl"]) < 1e-6 and decode["dense"]["top1"] == 1.0
    assert decode["none"]["kl"] > 1e-3
    # The protocol claim: one prefill gives the logits decode gives, for every uncapped policy.
    assert {c["policy"] for c in result["checks"]} == set(names)
    assert max(c["max_abs_nll_diff"] for c in result["checks"]) < 1e-4
    png = Path(result["runs"][0]["command"].split("--out ")[1]).with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {png}" in proc.stderr


def test_budget_rows_compose_the_gate_with_each_eviction(setup):
    """--budgets 30: the gate with lowest-g and with snapkv eviction, and snapkv alone, on a pool of 30% of the
    dense cache, in the decode and retrieval tables (not the one-prefill table, which cannot see a budget)."""
    root, checkpoint = setup
    out = root / "budgets.json"
    proc = run_eval("--quick", "--checkpoint", str(checkpoint), "--data", str(root / "heldout"),
                    "--gates-dir", str(root / "gates"), "--lengths", "160", "--decode-tokens", "16",
                    "--passkey-lengths", "400", "--depths", "0.5", "--keys", "0", "--budgets", "30", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    budget_rows = ["tiny-0.5 + lowest-g @ 30%", "tiny-0.5 + snapkv @ 30%", "snapkv alone @ 30%"]
    assert not set(budget_rows) & {r["policy"] for r in result["perplexity"]}
    for table in ("decode", "passkey"):
        rows = {r["policy"]: r for r in result[table]}
        assert list(rows)[-3:] == budget_rows
        for name in budget_rows:
            # The pool is 30% of dense; with the rings and tables the caches allocate less than dense still.
            assert rows[name]["allocated"] < rows["dense"]["allocated"]
            assert rows[name]["lost"] > 0, (table, name)   # the budget is below what the gate admits
        assert rows["tiny-0.5 + lowest-g @ 30%"]["kv_held"] < rows["tiny-0.5"]["kv_held"]
    passkey = {r["policy"]: r for r in result["passkey"]}
    for name in budget_rows:   # the store's own keys say what it held, whatever the eviction kept
        assert 0.0 < passkey[name]["prompt_held"] < passkey["dense"]["prompt_held"]
    assert [ev.policy_family(name, result["gates"]) for name in budget_rows] == \
        ["tiny-0.5 + lowest-g", "tiny-0.5 + snapkv", "snapkv alone"]
    assert "| tiny-0.5 + snapkv @ 30% |" in proc.stdout


def test_select_rows_read_their_budget(setup):
    """--select-budgets 64: the gate with selection and Quest alone, in the decode and retrieval tables (prefill is
    not selected), each decode step attending at most 64 tokens per KV head; a budget below the window plus a
    page: one line, exit 2."""
    root, checkpoint = setup
    out = root / "select.json"
    common = ["--quick", "--checkpoint", str(checkpoint), "--data", str(root / "heldout"), "--gates-dir",
              str(root / "gates"), "--lengths", "160", "--decode-tokens", "16", "--passkey-lengths", "400",
              "--depths", "0.5", "--keys", "0"]
    proc = run_eval(*common, "--select-budgets", "64", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    select_rows = ["tiny-0.5 + select @ 64", "quest alone @ 64"]
    assert not set(select_rows) & {r["policy"] for r in result["perplexity"]}
    for table in ("decode", "passkey"):
        rows = {r["policy"]: r for r in result[table]}
        assert list(rows)[-2:] == select_rows
        assert all(0 < rows[name]["read_per_step"] <= 64 for name in select_rows)
        assert rows["tiny-0.5"]["read_per_step"] > 64 and rows["dense"]["read_per_step"] is None
        assert rows["quest alone @ 64"]["kv_held"] == 1.0
    assert [ev.policy_family(name, result["gates"]) for name in select_rows] == ["tiny-0.5 + select", "quest alone"]
    assert "| read/step |" in proc.stdout and "| tiny-0.5 + select @ 64 |" in proc.stdout
    proc = run_eval(*common, "--select-budgets", "40")
    assert proc.returncode == 2 and "--select-budgets" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_plot_without_matplotlib_says_why_and_writes_nothing(quick, tmp_path, monkeypatch, capsys):
    _, result = quick
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # what an environment without it raises
    ev.plot(result, str(tmp_path / "eval.png"))
    assert "matplotlib is not installed" in capsys.readouterr().err and not (tmp_path / "eval.png").exists()


def test_policy_families_colour_the_plot(quick):
    _, result = quick
    families = [ev.policy_family(r["policy"], result["gates"]) for r in result["decode"]]
    assert families == ["dense", "gate", "random", "snapkv", "none", "sink:4"]


def test_pieces_merge_into_the_whole_grid(setup, quick):
    """The quick grid run in two pieces (documents and the first depth; the other depths) and merged gives
    the one run's tables exactly: each passkey cell draws its own key, whatever else the run holds."""
    root, checkpoint = setup
    _, whole = quick
    common = ["--quick", "--checkpoint", str(checkpoint), "--data", str(root / "heldout"),
              "--gates-dir", str(root / "gates"), "--docs", "2", "--decode-tokens", "16", "--keys", "3"]
    paths = [root / "piece-1.json", root / "piece-2.json"]
    for path, grid in zip(paths, (["--lengths", "160", "--passkey-lengths", "400", "--depths", "0"],
                                  ["--lengths", "--passkey-lengths", "400", "--depths", "0.5", "1"])):
        proc = run_eval(*common, *grid, "--out", str(path))
        assert proc.returncode == 0, proc.stderr[-3000:]
    merged_path = root / "merged.json"
    proc = run_eval("--merge", *map(str, paths), "--out", str(merged_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads(merged_path.read_text())
    for table in ("perplexity", "decode", "passkey", "multikey"):
        assert merged[table] == whole[table], table
    assert len(merged["runs"]) == 2 and "in 2 runs:" in proc.stdout and "| depth 0.5 |" in proc.stdout
    assert merged["grid"]["lengths"] == [160] and merged["grid"]["depths"] == [0, 0.5, 1]
    # Overlapping pieces, a grid option beside --merge, a file that is not a result: one line, exit 2.
    for args, message in ((["--merge", str(paths[0]), str(merged_path)], "must not overlap"),
                          (["--merge", str(paths[0]), "--lengths", "160"], "drop --lengths"),
                          (["--merge", str(root / "heldout" / "prose" / "doc.txt")], "cannot read")):
        proc = run_eval(*args)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            proc.stderr


def test_policies_run_only_the_rows_asked_for(setup, quick):
    """--policies gate snapkv: those rows alone, each as the whole run scored it (a row does not depend on the
    rows beside it, only snapkv ~ G on G's admissions); a choice that leaves a row without what it needs: one
    line, exit 2."""
    root, checkpoint = setup
    _, whole = quick
    common = ["--quick", "--checkpoint", str(checkpoint), "--data", str(root / "heldout"),
              "--gates-dir", str(root / "gates"), "--passkey-lengths", "400", "--depths", "0", "0.5", "1",
              "--keys", "3"]
    out = root / "policies.json"
    proc = run_eval(*common, "--lengths", "--policies", "gate", "snapkv", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["policies"] == ["tiny-0.5", "snapkv ~ tiny-0.5"] and result["grid"]["families"] == ["gate", "snapkv"]
    for table in ("passkey", "multikey"):
        assert result[table] == [r for r in whole[table] if r["policy"] in result["policies"]], table
    for args, message in ((["--lengths", "160", "--policies", "gate"], "add dense to --policies"),
                          (["--lengths", "--policies", "random"], "add gate to --policies"),
                          (["--lengths", "--policies"], "leaves no row to run")):
        proc = run_eval(*common, *args)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            proc.stderr


def test_matched_baselines_hold_the_gates_kv_bytes(quick):
    """random ~ G and snapkv ~ G hold G's K/V bytes on every sequence, within one token per KV head."""
    _, result = quick
    heads = 2 * 2   # layers x KV heads of the tiny model
    for table, baselines in (("perplexity", ["random"]), ("decode", ["random", "snapkv"]),
                             ("passkey", ["random", "snapkv"])):
        seqs = result["sequences"][table]
        gate = [s for s in seqs if s["policy"] == "tiny-0.5"]
        assert gate
        for kind in baselines:
            matched = [s for s in seqs if s["policy"] == f"{kind} ~ tiny-0.5"]
            assert len(matched) == len(gate)
            for g, m in zip(gate, matched):
                assert abs(m["held"] - g["held"]) <= heads, (table, kind, g["held"], m["held"])
                assert m["seen"] == g["seen"]
    # Held bytes that differ from the window alone: the gate really admits something to match.
    none = [s for s in result["sequences"]["perplexity"] if s["policy"] == "none"]
    assert all(g["held"] > n["held"] for g, n in zip(gate, none))


def test_quick_takes_one_gate(setup, tmp_path):
    """--quick looks at one gate: the first --gate, else the first file under --gates-dir; without --quick, all."""
    root, checkpoint = setup
    for name in ("b-gate", "a-gate"):
        save_gates(tmp_path / f"{name}.safetensors", tiny_gates(2, 2, 16), {"window": WINDOW, "threshold": 0.1})
    common = ["--checkpoint", str(checkpoint), "--data", str(root / "heldout"), "--gates-dir", str(tmp_path),
              "--lengths", "--passkey-lengths", "--decode-tokens", "16"]   # no task: the gates are chosen all the same
    for flags, gates in (([], ["a-gate", "b-gate"]), (["--quick"], ["a-gate"]),
                         (["--quick", "--gate", str(tmp_path / "b-gate.safetensors")], ["b-gate"])):
        out = tmp_path / "out.json"
        proc = run_eval(*common, *flags, "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert list(json.loads(out.read_text())["gates"]) == gates, flags


def test_passkey_prompt_puts_the_key_at_the_depth():
    tok = Tokenizer(save_tiny_checkpoint(Path(__import__("tempfile").mkdtemp()) / "tiny"))
    filler = tok.encode(" ".join(CORPUS * 20), add_special_tokens=False)
    task = ev.Passkey(ev.PASSKEY, filler, tok)
    head, tail = task.head_tail()
    needle = task.needle("71432")
    for length in (300, 451):
        n_fill = length - len(head) - len(needle) - len(tail)
        for depth in (0.0, 0.25, 0.5, 1.0):
            ids, [(at, end)] = task.prompt([("71432", "", depth)], length, offset=7)
            assert len(ids) == length and end == at + len(needle)
            assert at == len(head) + round(depth * n_fill)
            assert ids[at:at + len(needle)] == needle and "71432" in tok.decode(ids[at:at + len(needle)])
            assert ids[:len(head)] == head and ids[-len(tail):] == tail
            assert ids[len(head):at] == filler[7:7 + at - len(head)]
    assert task.prompt([("71432", "", 1.0)], 300)[1][0][0] == 300 - len(tail) - len(needle)   # right before the question
    with pytest.raises(ev.EvalError):
        task.prompt([("71432", "", 0.5)], len(head) + len(tail))


def test_multikey_prompt_plants_every_key_and_asks_for_the_one_at_the_depth():
    tok = Tokenizer(save_tiny_checkpoint(Path(__import__("tempfile").mkdtemp()) / "tiny"))
    filler = tok.encode(" ".join(CORPUS * 20), add_special_tokens=False)
    task = ev.Passkey(ev.MULTIKEY, filler, tok)
    needles = ev.multikey_needles(0, 600, 0.25, 1, 4)
    assert needles == ev.multikey_needles(0, 600, 0.25, 1, 4) != ev.multikey_needles(0, 600, 0.25, 0, 4)
    assert needles[0][2] == 0.25 and len({c for _, c, _ in needles}) == 4 and len({k for k, _, _ in needles}) == 4
    assert needles[0][0] != ev.passkey_key(0, 600, 0.25, 1)   # the one-key prompt's key is drawn apart
    ids, spans = task.prompt(needles, 600)
    assert len(ids) == 600
    for (key, colour, _), (a, b) in zip(needles, spans):
        assert ids[a:b] == task.needle(key, colour) and f"The {colour} pass key is {key}." in tok.decode(ids[a:b])
    _, tail = task.head_tail(needles[0][1])
    assert ids[-len(tail):] == tail and f"What is the {needles[0][1]} pass key?" in tok.decode(tail)
    ordered = sorted(spans)
    assert all(b <= c for (_, b), (c, _) in zip(ordered, ordered[1:]))


def test_dense_finds_a_key_it_sees_and_the_diagnostic_counts_the_store(smollm2_checkpoint):
    """The real SmolLM2 on short prompts with the key 300 tokens back: dense reads it, the window alone cannot,
    and planted/prompt held count exactly what each policy's store keeps."""
    from model import Transformer
    torch.manual_seed(0)
    model = Transformer.from_pretrained(smollm2_checkpoint)
    tok = Tokenizer(smollm2_checkpoint)
    filler = tok.encode((REPO / "prompts" / "with-statement.md").read_text() * 3, add_special_tokens=False)
    window, L = 128, 520
    policies = [ev.Row("dense", "dense"), ev.Row("none", "builtin", "none"), ev.Row("sink:4", "builtin", "sink:4")]
    setup = lambda policy, seq_len, recorded: ev.install_policy(model, policy, seq_len, window, recorded, "torch", 0)
    heads = model.config.n_layers * model.config.n_kv_heads
    with torch.inference_mode():
        for task, keys in ((ev.PASSKEY, 1), (ev.MULTIKEY, 3)):
            records = ev.passkey_task(model, tok, policies, ev.Passkey(task, filler, tok), [L], [0.0], 1, window, 0,
                                      setup, n_keys=keys)
            by = {r["policy"]: r for r in records}
            assert by["dense"]["correct"] and not by["none"]["correct"], [r["answer"] for r in records]
            a, b = by["dense"]["spans"][0]
            old = sum(b - a for a, b in by["dense"]["spans"])   # every needle lies more than W before the end
            assert by["dense"]["planted_left"] == old * heads == by["dense"]["planted_held"]
            assert by["dense"]["prompt_left"] == (L - window) * heads == by["dense"]["prompt_held"]
            assert by["none"]["planted_held"] == by["none"]["prompt_held"] == 0
            assert by["sink:4"]["prompt_held"] == 4 * heads and by["sink:4"]["planted_held"] == 0
    rows = ev.summarize_passkey(records, [p.name for p in policies])
    assert [r["planted_held"] for r in rows] == [1.0, 0.0, 0.0] and rows[2]["prompt_held"] == 4 / (L - window)


def test_passkey_checker():
    assert ev.passkey_correct(" 71432. It was easy.", "71432")
    assert ev.passkey_correct("The pass key is 71432", "71432")
    assert not ev.passkey_correct(" 71433.", "71432")
    assert not ev.passkey_correct(" 714321", "71432")
    assert not ev.passkey_correct(" 7143", "71432")
    assert not ev.passkey_correct(" I do not know.", "71432")


def test_shuffled_admissions_keep_each_heads_counts():
    torch.manual_seed(0)
    admitted = torch.rand(3, 100) < torch.tensor([[0.1], [0.5], [0.9]])                        # (Hkv, S)
    out = ev.shuffled(admitted, 20, torch.Generator().manual_seed(1))
    assert torch.equal(out[:, :80].sum(-1), admitted[:, :80].sum(-1))
    assert torch.equal(out[:, 80:].sum(-1), admitted[:, 80:].sum(-1))
    assert not torch.equal(out, admitted)
    assert ev.matched_capacity(admitted, 20) == round(admitted[:, :80].sum(-1).float().mean().item())


def test_snapkv_prefill_is_dense_and_keeps_the_top_scores():
    torch.manual_seed(0)
    B, Hq, Hkv, T, D, W, C = 1, 4, 2, 64, 16, 8, 10
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    cache = ev.SnapKVCache(B, Hkv, D, W, 0.0, C, torch.float32, page_size=1, snapkv_window=6, pooling=3)
    y = cache(q, k, v, torch.zeros(B, Hkv, T), torch.arange(T))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)
    score = ev.prompt_snapkv_scores(q, k, D ** -0.5, 6, 3)                                             # (B, Hkv, T)
    assert torch.equal(cache.global_len, torch.full((B, Hkv), C))
    stored_k = cache.store_contents()[0]
    for h in range(Hkv):   # max-pooling makes ties, so compare the kept scores, not the positions
        stored = [int(torch.nonzero((k[0, h] == stored_k[0, h, s]).all(-1))[0]) for s in range(C)]
        assert max(stored) < T - W
        assert sorted(score[0, h, stored].tolist()) == sorted(score[0, h, :T - W].topk(C).values.tolist())
