"""The tensor-parallel side of test_tensor_parallel.py: run under torchrun, every rank runs run_cases on its share
of each case's checkpoint and saves what it got to OUT/rank{R}.pt; the test runs the same run_cases in one process.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py OUT CASES

CASES: a JSON list of {"checkpoint": DIR, "gate": null (dense) or a --gate spec, "compiled": bool, and optionally
"select": a --select-budget (with pages of SELECT_PAGE tokens)}.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gate import build_caches
from generate import compile_decode_step, decode_one_token, generate_rows
from model import Transformer, start_tensor_parallel

# Prompts of different lengths, as token ids (no tokenizer needed): a batch of 2 rows takes all 3 in turn.
PROMPTS = [[(7 * i + 3 * n) % 390 + 5 for i in range(n)] for n in (17, 9, 13)]
NEW_TOKENS = 10
CHUNK = 5          # prefill chunk: every prompt is prefilled in several
WINDOW, THRESHOLD = 4, 0.5   # a window short enough that the prompts go through the global store
SELECT_PAGE = 2    # with selection: pages small enough that a budget of a few leaves some of a store unread


def caches(model: Transformer, gate: str | None, max_seq_len: int, batch_size: int, select: int | None = None):
    options = dict(window=WINDOW, threshold=THRESHOLD, backend="torch") if gate else {}
    if select is not None:
        options |= dict(select_budget=select, page_size=SELECT_PAGE)
    return build_caches(model, max_seq_len, batch_size=batch_size, gate=gate, **options)


@torch.no_grad()
def run_cases(model: Transformer, gate: str | None, compiled: bool, select: int | None = None) -> dict:
    """Greedy tokens of PROMPTS in a batch of 2 rows with a chunked prefill, eager (and compiled); the logits of
    the first prompt's chunked prefill and of its greedy decode steps; the bytes each cache setup allocated."""
    max_seq_len = max(map(len, PROMPTS)) + NEW_TOKENS
    out = {"allocated": caches(model, gate, max_seq_len, 2, select).allocated}
    steps = {"eager": decode_one_token, **({"compiled": compile_decode_step("cpu")} if compiled else {})}
    for name, step in steps.items():
        caches(model, gate, max_seq_len, 2, select)
        out[name], _ = generate_rows(model, PROMPTS, NEW_TOKENS, rows=2, prefill_chunk=CHUNK, decode_step=step)
    caches(model, gate, max_seq_len, 1, select)
    ids = torch.tensor([PROMPTS[0]])                                                     # (1, T)
    logits = [model(ids[:, i:i + CHUNK], torch.arange(i, min(i + CHUNK, ids.shape[1])))
              for i in range(0, ids.shape[1], CHUNK)]
    for pos in range(ids.shape[1], ids.shape[1] + NEW_TOKENS):
        logits.append(model(logits[-1][:, -1:].argmax(-1), torch.tensor([pos])))
    out["logits"] = torch.cat(logits, dim=1)                                              # (1, T + NEW_TOKENS, vocab)
    return out


if __name__ == "__main__":
    out_dir, cases = sys.argv[1], json.loads(sys.argv[2])
    tp, _ = start_tensor_parallel("cpu")
    results = [run_cases(Transformer.from_pretrained(case["checkpoint"], tp=tp), case["gate"], case["compiled"],
                         case.get("select"))
               for case in cases]
    torch.save(results, Path(out_dir) / f"rank{tp.rank}.pt")
    dist.destroy_process_group()
