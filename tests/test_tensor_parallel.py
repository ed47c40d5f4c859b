"""Tensor parallelism on the CPU (gloo): two ranks under torchrun give one process's greedy tokens and logits with the
dense and the write-gated cache (GQA, attention biases, Qwen3), each rank's caches 1/N of one process's;
generate.py under torchrun prints what one process prints, once; an N that does not divide the model, or a gate
file for another model, fails fast on every rank. One torchrun per cache type covers its cases (tests/tp_worker.py)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gate import WriteGate
from model import Transformer
from tiny import save_tiny_checkpoint
from tp_worker import SELECT_PAGE, WINDOW, run_cases

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
# One thread a rank, so that the ranks do not fight over the cores; the workers import the repo and tests/.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")


def torchrun(*args: str, n: int = WORLD, **kwargs) -> subprocess.CompletedProcess:
    """args under torchrun with n processes on a free port (--standalone picks one), from the repo's root."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                           *args], capture_output=True, text=True, timeout=600, cwd=ROOT, env=ENV, **kwargs)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    """Tiny GQA checkpoints with 2 and 4 KV heads (1 and 2 a rank)."""
    root = tmp_path_factory.mktemp("tp")
    return {2: save_tiny_checkpoint(root / "kv2", "chatml", seed=3),
            4: save_tiny_checkpoint(root / "kv4", "chatml", seed=4, num_attention_heads=8, num_key_value_heads=4,
                                    head_dim=16)}


def authors_gate(path: Path, n_kv_heads: int) -> Path:
    """Random gates in the authors' .pt layout whose scores spread over (0, 1), so that tau 0.5 splits the tokens."""
    torch.manual_seed(n_kv_heads)
    gates = [WriteGate(n_kv_heads, head_dim=16) for _ in range(2)]
    for gate in gates:
        with torch.no_grad():
            gate.w2.mul_(8)
    torch.save({f"model.layers.{i}.self_attn.g_predictors.{name}": t for i, gate in enumerate(gates)
                for name, t in gate.official_state().items()}, path)
    return path


def check_against_one_process(tmp_path: Path, cases: list[dict]) -> None:
    """run_cases of every case under one torchrun (2 ranks) against one process: the same greedy tokens (eager, and
    compiled where asked), logits within 1e-4 (the all-reduce sums in another order), each rank's caches half of
    one process's bytes, within a page per KV head (each rank's pool has a scratch page of its own)."""
    run = torchrun("tests/tp_worker.py", str(tmp_path), json.dumps(cases))
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for i, case in enumerate(cases):
        model = Transformer.from_pretrained(case["checkpoint"])
        one = run_cases(model, case["gate"], compiled=False, select=case.get("select"))
        assert sum(map(len, one["eager"])) >= 20, "the model stops too soon to compare much"
        page = 16 * (2 * model.config.head_dim * 4 + 4)           # K, V (float32) and g of one page
        for rank in (r[i] for r in ranks):
            assert rank["eager"] == one["eager"], case
            assert rank.get("compiled") == (one["eager"] if case["compiled"] else None), case
            torch.testing.assert_close(rank["logits"], one["logits"], rtol=0, atol=1e-4)
            heads = model.config.n_kv_heads // WORLD
            assert abs(rank["allocated"] - one["allocated"] / WORLD) <= page * heads, (case, rank["allocated"], one)


def cases(models: dict[int, Path], gates: dict[int, Path] | None = None) -> list[dict]:
    # The dense cache compiled only with 2 KV heads a rank: with one its CPU attention fails to compile, in one
    # process too (README); the write-gated cache compiles with one.
    return [{"checkpoint": str(path), "gate": None if gates is None else str(gates[h]),
             "compiled": h // WORLD > 1 or gates is not None}
            for h, path in models.items()]


def test_dense_cache_under_tp_gives_one_process_tokens(tmp_path, models):
    # Also a Llama with attention biases (wo's is added by rank 0 alone) and a Qwen3 (its q/k norms replicated).
    others = [save_tiny_checkpoint(tmp_path / "bias", "chatml", seed=5, attention_bias=True),
              save_tiny_checkpoint(tmp_path / "qwen3", "qwen3-instruct", seed=6)]
    check_against_one_process(tmp_path, cases(models) + [{"checkpoint": str(path), "gate": None, "compiled": False}
                                                         for path in others])


def test_write_gated_cache_under_tp_gives_one_process_tokens(tmp_path, models):
    gates = {h: authors_gate(tmp_path / f"tiny{h}-0.1.pt", h) for h in models}
    # And with selection: each rank scores and reads its own heads' pages (2 of each store's, beside the window).
    selected = {"checkpoint": str(models[4]), "gate": str(gates[4]), "compiled": False, "select": WINDOW + 2 * SELECT_PAGE}
    check_against_one_process(tmp_path, cases(models, gates) + [selected])


def test_generate_under_torchrun_prints_one_process_output_once(tmp_path, models):
    """generate.py with a batch of prompts, --jsonl and a gate file: torchrun's stdout is one process's (rank 0
    prints, the others do not), the statistics are summed over the ranks and given per rank; --interactive reads
    its turns on rank 0."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\nA transformer writes the key\nNumbers: 0 1 2 3\n")
    args = ["generate.py", "--checkpoint", str(models[4]), "--prompts-file", str(prompts), "--jsonl", "--batch-size",
            "2", "--prefill-chunk", "5", "--max-new-tokens", "12", "--gate", str(authors_gate(tmp_path / "g.pt", 4)),
            "--window", "4", "--threshold", "0.5"]
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=ROOT, env=ENV)
    tp = torchrun(*args)
    assert one.returncode == 0 and tp.returncode == 0, tp.stderr[-3000:]
    assert len(one.stdout.splitlines()) == 3 and tp.stdout == one.stdout
    assert "over 2 ranks" in tp.stderr and "rank 1: admitted" in tp.stderr and "per rank" in tp.stderr
    # The admission counts are summed over the ranks: the same line as one process's.
    admitted = [line for line in one.stderr.splitlines() if "admitted" in line and "rank" not in line]
    assert admitted and all(line in tp.stderr for line in admitted)

    chat = ["generate.py", "--checkpoint", str(models[4]), "--interactive", "--gate", "dense", "--max-new-tokens", "8"]
    turns = "What is the capital of France?\nAnd of Italy?\n"
    one = subprocess.run([sys.executable, *chat], input=turns, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=ENV)
    tp = torchrun(*chat, input=turns)
    assert one.returncode == 0 and tp.returncode == 0, tp.stderr[-3000:]
    assert len(one.stdout.splitlines()) == 2 and tp.stdout == one.stdout


def as_torchrun_starts(n: int, *args: str) -> list[tuple[int, str, str]]:
    """generate.py args in n workers started with torchrun's environment (on a free port), to see each one's exit
    code (torchrun stops the others once one fails): (exit code, stdout, stderr) per rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = [subprocess.Popen([sys.executable, "generate.py", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT,
                                env=ENV | dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n),
                                               RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n)))
               for r in range(n)]
    outputs = [w.communicate(timeout=300) for w in workers]
    return [(w.returncode, *output) for w, output in zip(workers, outputs)]


@pytest.mark.parametrize("case", ["bad N", "gate of another model"])
def test_bad_input_fails_fast_on_every_rank(tmp_path, models, case):
    """3 processes for 4 query heads, 2 KV heads, intermediate size 128; or a gate file with 4 KV heads for the
    model with 2 (its whole count, not a rank's 1): each worker exits 2, and rank 0 alone said why, in one line."""
    if case == "bad N":
        results = as_torchrun_starts(3, "--checkpoint", str(models[2]), "--gate", "dense")
        expected = ["tensor parallelism over 3 processes", "KV heads 2"]
    else:
        gate = authors_gate(tmp_path / "other-0.1.pt", 4)
        results = as_torchrun_starts(2, "--checkpoint", str(models[2]), "--gate", str(gate))
        expected = ["has 4 KV heads in layer 0, the model has 2"]
    assert [code for code, _, _ in results] == [2] * len(results), results
    assert all(out == "" for _, out, _ in results) and all(err == "" for _, _, err in results[1:]), results
    line, = results[0][2].splitlines()
    assert all(text in line for text in expected), line
