"""generate.py with the write-gated cache: --gate full is the dense cache, gate files and policies run
through the CLI with their statistics, the Triton backend gives the torch backend's tokens, bad gate input
gets one line and exit 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
from cache import summed_counts
from gate import WriteGate, save_gates
from tiny import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is the capital of France?"
NEW_TOKENS = 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "chatml", seed=3)


@pytest.fixture(scope="module")
def gate_file(tiny, tmp_path_factory) -> Path:
    """Random gates for the tiny model whose biases admit some tokens and reject others."""
    torch.manual_seed(0)
    gates = [WriteGate(n_kv_heads=2, head_dim=16) for _ in range(2)]
    for gate in gates:
        with torch.no_grad():
            gate.w2.mul_(8)   # spread g over (0, 1) so that tau = 0.5 splits the tokens
    path = tmp_path_factory.mktemp("gates") / "tiny-gate.safetensors"
    save_gates(path, gates, {"window": 4, "threshold": 0.5, "lambda": 0.1, "base_model": "tiny"})
    return path


def run_main(capsys, checkpoint: Path, **options) -> tuple[str, str]:
    generate.main(checkpoint=str(checkpoint), prompt=PROMPT, max_new_tokens=NEW_TOKENS, **options)
    out = capsys.readouterr()
    return out.out, out.err


def test_gate_full_gives_the_dense_tokens(tiny, capsys):
    dense, _ = run_main(capsys, tiny)
    # A window of 2 sends almost the whole prompt through the global store.
    gated, stats = run_main(capsys, tiny, gate="full", window=2, attn_backend="torch")
    assert len(dense) > 20 and gated == dense
    assert "admitted 100.0% of tokens" in stats and "gate full, window 2" in stats


def test_gate_file_and_policies_report_admission(tiny, gate_file, capsys):
    # The file's metadata sets window 4 and threshold 0.5 unless the flags say otherwise.
    _, stats = run_main(capsys, tiny, gate=str(gate_file), attn_backend="torch")
    assert "window 4, threshold 0.5" in stats
    admitted = float(stats.split("admitted ")[1].split("%")[0])
    assert 5 < admitted < 95, stats
    _, stats = run_main(capsys, tiny, gate=str(gate_file), window=8, threshold=0.2, attn_backend="torch")
    assert "window 8, threshold 0.2" in stats
    _, stats = run_main(capsys, tiny, gate="none", window=4, attn_backend="torch")
    assert "admitted 0.0% of tokens" in stats
    _, stats = run_main(capsys, tiny, gate="sink:3", window=4, global_capacity=2, page_size=1, attn_backend="torch")
    assert "global capacity 2 tokens per head" in stats
    assert "lost to the capacity or the budget: 4 " in stats    # one sink token of each of 2 x 2 heads


def test_kv_budget_sizes_the_pool(tiny, gate_file, capsys):
    """The pool's size follows --kv-budget; a budget below the need loses admitted tokens and says so, an
    unlimited one gives the tokens of the default, and allocation is reported against the dense cache's."""
    default, stats = run_main(capsys, tiny, gate=str(gate_file), attn_backend="torch")
    assert "(the full need (the gate file records no admission rate))" in stats and " vs dense " in stats
    unlimited, stats = run_main(capsys, tiny, gate=str(gate_file), kv_budget="unlimited", attn_backend="torch")
    assert unlimited == default and "lost to the capacity or the budget: 0 " in stats
    _, stats = run_main(capsys, tiny, gate="full", window=4, kv_budget="12", page_size=4, attn_backend="torch")
    assert "pool 3 pages of 4 tokens (--kv-budget 12)" in stats and "pool pages in use 3 of 3" in stats
    lost = int(stats.split("lost to the capacity or the budget: ")[1].split()[0])
    assert lost > 0
    _, stats = run_main(capsys, tiny, gate="full", window=4, kv_budget="10%", attn_backend="torch")
    assert "(--kv-budget 10%)" in stats


def test_compiled_gated_decode_gives_the_eager_tokens(tiny, gate_file, capsys):
    # The store grows from prompt tokens leaving a window of 4 while 30 tokens decode: one compiled
    # step (fullgraph, the stores' lengths symbolic on the CPU) must give eager's tokens.
    eager, _ = run_main(capsys, tiny, gate=str(gate_file), attn_backend="torch")
    compiled, stats = run_main(capsys, tiny, gate=str(gate_file), attn_backend="torch", compile=True)
    assert len(eager) > 20 and compiled == eager
    assert "compile and warm-up:" in stats


def test_triton_backend_gives_the_torch_tokens(tiny, gate_file):
    """The Triton kernels under the interpreter on CPU, end to end through the CLI."""
    args = [sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(tiny), "--prompt", PROMPT,
            "--max-new-tokens", "12", "--gate", str(gate_file), "--window", "3"]
    env = dict(os.environ, TRITON_INTERPRET="1")
    torch_run = subprocess.run(args + ["--attn-backend", "torch"], capture_output=True, text=True, env=env, timeout=900)
    triton_run = subprocess.run(args + ["--attn-backend", "triton"], capture_output=True, text=True, env=env, timeout=900)
    assert torch_run.returncode == 0 and triton_run.returncode == 0, triton_run.stderr[-2000:]
    assert "attention backend triton" in triton_run.stderr
    assert len(torch_run.stdout) > 5 and triton_run.stdout == torch_run.stdout


def test_snapkv_eviction_runs_when_the_pool_runs_low(tiny, capsys):
    generate.main(checkpoint=str(tiny), prompt=PROMPT, max_new_tokens=70, gate="full", window=4, kv_budget="24",
                  page_size=4, evict="snapkv", attn_backend="torch")
    out = capsys.readouterr()
    assert len(out.out) > 20 and "evict snapkv" in out.err
    evicted, passes = out.err.split("; ")[-1].split(" evicted later, by ")
    # The prefill made room, and so did the checks at steps 32 and 64 (the pool low both times).
    assert int(evicted) > 0 and int(passes.split()[0]) >= 3 and passes.split()[1:3] == ["snapkv", "passes)"]


@pytest.mark.parametrize("budget", ["lots", "0", "200%", "2.5"])
def test_bad_kv_budget_one_line_exit_2(tiny, budget):
    p = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(tiny), "--gate", "full",
                        "--kv-budget", budget, "--max-new-tokens", "2"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--kv-budget" in p.stderr


def test_bad_gate_input_one_line_exit_2(tiny, tmp_path):
    wrong_shape = tmp_path / "wrong.safetensors"
    save_gates(wrong_shape, [WriteGate(n_kv_heads=2, head_dim=16)])   # one layer for a two-layer model
    cases = {
        "bogus": "neither a file nor a policy",
        "random:2": "needs a fraction p in [0, 1]",
        str(tmp_path / "missing.safetensors"): "missing.safetensors' is neither a file",
        str(wrong_shape): "has 1 layers, the model has 2",
    }
    procs = {spec: subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(tiny),
                                     "--gate", spec, "--max-new-tokens", "2"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for spec in cases}
    for spec, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 2, (spec, err)
        assert out == "" and len(err.strip().splitlines()) == 1, (spec, err)
        assert cases[spec] in err.lower(), (spec, err)


@pytest.mark.parametrize("gate", ["dense", "file"])
def test_chunked_prefill_gives_the_one_shot_tokens(tiny, gate_file, capsys, gate):
    gate = str(gate_file) if gate == "file" else gate
    one_shot, _ = run_main(capsys, tiny, gate=gate, prefill_chunk=0)
    for chunk in (1, 3, 5):
        assert run_main(capsys, tiny, gate=gate, prefill_chunk=chunk)[0] == one_shot


@pytest.mark.parametrize("gate", ["dense", "file"])
def test_interactive_keeps_the_conversation(tiny, gate_file, gate):
    """Three turns through stdin: each reply is the one the whole conversation so far, fed from scratch, gives,
    and each turn prefills only the tokens the chat template added after what the cache held."""
    from tokenizer import Tokenizer
    turns = ["What is the capital of France?", "", "And of Spain?", "Thanks, and of Italy?"]
    gate_args = ["--gate", str(gate_file) if gate == "file" else "dense"]
    new_tokens = 12   # enough for a reply longer than the window of 4, so tokens leave the ring across turns
    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(tiny), "--interactive",
                             "--max-new-tokens", str(new_tokens), *gate_args], input="\n".join(turns) + "\n",
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "prefilling the whole conversation" not in result.stderr
    replies = result.stdout.split("\n")[:3]
    prefilled = [int(line.split("prefilled ")[1].split()[0]) for line in result.stderr.splitlines()
                 if line.startswith("turn ")]
    tokenizer = Tokenizer(tiny)
    model, _ = generate.load(tiny)
    messages, conversation, cached = [], [], 0
    for i, text in enumerate(t for t in turns if t):
        messages.append({"role": "user", "content": text})
        ids = conversation + generate.turn_ids(tokenizer, messages) if conversation else tokenizer.encode_chat(messages)
        generate.setup_caches(model, len(ids) + new_tokens, gate=gate_args[1] if gate == "file" else None)
        new, t = generate.generate(model, ids, new_tokens, stop_ids=tokenizer.stop_ids)    # from scratch
        assert replies[i] == tokenizer.decode(new), i
        assert prefilled[i] == len(ids) - cached, i
        assert i == 0 or prefilled[i] < len(ids)
        cached, conversation = len(ids) + t.decode_steps, ids + new
        messages.append({"role": "assistant", "content": replies[i]})
    assert len(conversation) > 3 * 4   # the window of 4 was left behind across turns


def test_interactive_outgrowing_max_seq_len_one_line_exit_2(tiny):
    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(tiny), "--interactive",
                             "--max-new-tokens", "8", "--max-seq-len", "60", "--gate", "dense"],
                            input="What is the capital of France?\nAnd of Spain?\nAnd of Italy?\n",
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("generate.py: error: turn ")
    assert "--max-seq-len 60" in result.stderr.strip().splitlines()[-1]


PROMPTS = ["What is the capital of France?", "Hi", "Name three primary colours, and say why each is primary.",
           "Count to five."]


@pytest.mark.parametrize("gate", ["dense", "file"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_batch_gives_each_prompt_its_own_tokens(tiny, gate_file, gate, compiled):
    """Prompts of different lengths decoded as one batch give, row by row, the greedy tokens each gives alone:
    no row sees another's tokens or padding, and each stops at its own stop token."""
    from tokenizer import Tokenizer
    tokenizer = Tokenizer(tiny)
    model, _ = generate.load(tiny)
    prompts = [tokenizer.encode_prompt(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    gate_spec = str(gate_file) if gate == "file" else None
    new_tokens = 14
    max_seq_len = max(map(len, prompts)) + new_tokens

    def as_ints(per_layer):
        return [{k: int(n) for k, n in layer.items()} for layer in per_layer]

    def total(runs):
        """Several runs' per-layer counts added up, layer by layer."""
        return [{k: sum(run[i][k] for run in runs) for k in runs[0][i]} for i in range(len(runs[0]))]

    def alone(stop_ids):
        out, counts = [], []
        for ids in prompts:
            generate.setup_caches(model, max_seq_len, gate=gate_spec)
            out.append(generate.generate(model, ids, new_tokens, stop_ids=stop_ids)[0])
            counts.append(as_ints(summed_counts([layer.attention.cache for layer in model.layers])) if gate_spec else None)
        return out, counts

    # The random model seldom says its stop token: a token one row says early is the stop, so that the rows
    # finish at different steps.
    stop_ids = {alone(frozenset())[0][1][4]}
    expected, expected_counts = alone(stop_ids)
    assert len({len(a) for a in expected}) > 1
    generate.setup_caches(model, max_seq_len, batch_size=len(prompts), gate=gate_spec)
    if compiled:
        # A fresh start for torch.compile: this test compiles the step once per batch size, and beside the steps
        # earlier tests compiled that passes torch's limit of 8 graphs a function where each cache size compiles
        # anew (pages.DYNAMIC_CACHE_SIZES).
        torch._dynamo.reset()
    step = generate.compile_decode_step("cpu") if compiled else generate.decode_one_token
    finished = []
    batch, t = generate.generate_rows(model, prompts, new_tokens, stop_ids=stop_ids, decode_step=step,
                                      on_done=lambda row, ids: finished.append(row))
    assert batch == expected
    assert sorted(finished) == list(range(len(prompts))) and t.rows == len(prompts)
    assert (t.counts is None) == (gate == "dense")
    if gate == "file":
        assert as_ints(t.counts) == total(expected_counts)
        held = sum(int(layer.attention.cache.global_len.sum()) for layer in model.layers)
        assert held > 0                                              # tokens left the window of 4 and were stored
    # Fewer rows than prompts: a finished prompt's row takes the next one, from a fresh cache row, and every
    # prompt still gets its own tokens; the last rows to finish ride along without overrunning the caches.
    for rows in (1, 2, 3):
        generate.setup_caches(model, max_seq_len, batch_size=rows, gate=gate_spec)
        finished.clear()
        batch, t = generate.generate_rows(model, prompts * 2, new_tokens, rows=rows, stop_ids=stop_ids,
                                          decode_step=step, on_done=lambda index, ids: finished.append(index))
        assert batch == expected * 2, rows
        assert sorted(finished) == list(range(2 * len(prompts))) and t.rows == rows
        assert t.decoded == sum(len(a) - 1 + (len(a) < new_tokens) for a in expected * 2)
        assert t.decode_steps < t.decoded / rows + new_tokens         # the rows were kept busy
        if gate == "file":
            # The run's counts cover every prompt as it finished, not the ride-along tokens of retired rows.
            assert as_ints(t.counts) == total(expected_counts * 2)
            # No page lost or handed out twice by the rows' restarts: the free stack and the pages the stores
            # hold are every page once.
            pool = model.layers[0].attention.cache.pool
            held = [int(page) for layer in model.layers for table, n in zip(
                layer.attention.cache.page_table.flatten(0, 1), layer.attention.cache.global_len.flatten().tolist())
                for page in table[:-(-n // pool.page_size)]]
            assert sorted(held + pool.free_pages[:int(pool.n_free)].tolist()) == list(range(pool.n_pages))


def test_prompts_file_jsonl_and_its_bad_input(tiny, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:3]) + "\n" + json.dumps({"prompt": PROMPTS[3]}) + "\n")
    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(tiny), "--prompts-file",
                             str(path), "--batch-size", "3", "--max-new-tokens", "6", "--jsonl", "--gate", "dense"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 3]
    assert all(r["prompt"] == PROMPTS[r["index"]] for r in rows)
    assert "4 prompts:" in result.stderr and "over 3 rows" in result.stderr   # 3 rows, one taking the 4th prompt
    path.write_text(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n")
    for args in (["--prompts-file", str(path)], ["--prompt", "Hi", "--prompt", "Hi", "--max-seq-len", "4000000000"]):
        result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(tiny), *args,
                                 "--gate", "dense"], capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "line 2 is empty" in result.stderr or "lower --batch-size" in result.stderr
