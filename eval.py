"""Quality against KV memory for every admission policy: perplexity, agreement with dense, passkey retrieval.

    python eval.py --quick                          # a quick look, not a result: one gate, a short grid
    python eval.py --out eval.json                  # the full grid (2k/4k/8k), tables on stdout
    python eval.py --gate my-gate.safetensors       # a gate file besides those under gates/ (.pt too)
    python eval.py --lengths 2048 --passkey-lengths 2048 --out 2k.json   # the full grid in pieces, then
    python eval.py --merge 2k.json 4k.json 8k.json --out eval.json     # the tables one run would print

Policies, each through the cache it runs with: `dense` (DenseCache); every setting of every gate file under
--gates-dir and each --gate (WriteGatedCache, no capacity limit); `random ~ G`: G's own admissions on the same
sequence moved to random positions (per layer and KV head, among the tokens older than the window and
among those inside it, separately), so it holds exactly G's KV bytes; `snapkv ~ G`: eviction at G's
budget (SnapKVCache below); `none` (the window alone); `sink:N` (StreamingLLM). Then, per --budgets share of
the dense cache, the compositions of the paper on a page pool of that size: `G + lowest-g @ X%` and `G +
snapkv @ X%` (the gate with each eviction policy, cache.Eviction) and `snapkv alone @ X%` (every token
admitted, SnapKV evicting); they run in the decode and retrieval tables. Per --select-budgets N (tokens attended
per decode step and KV head), selection (Quest, DESIGN.md's Selection): `G + select @ N` (the gate's store) and
`quest alone @ N` (every token stored); decode steps only (prefill is not selected), so the decode and
retrieval tables; their `read/step` column is the tokens a decode step attended per KV head.

Protocols (the output states them too):
- perplexity: one prefill of the whole document per policy. Prefill and decode obey the same visibility
  rule, so query i's logits in a gated prefill are those decode would give at i; the run measures the
  difference on the decode table's tokens and prints it. Scored: the predictions of queries at
  positions >= W (before that every policy sees the same keys), against the document's next token;
  KL(dense || policy) and top-1 agreement with dense on the same predictions.
- decode: an eviction store changes while decoding, so no single prefill stands in for it. Prefill
  L - n tokens, then feed the last n one at a time; every policy, dense included, runs this way and is
  scored on the n predictions of queries L-n-1 .. L-2, against dense's single prefill.
- passkey: a 5-digit key hidden at a grid of depths in held-out prose, in the chat template; prefill
  the prompt, generate greedily; correct when the first number in the answer is the key.
- multi-key: --keys 5-digit keys, each with its own colour, planted at random depths, the one at the grid's
  depth asked for by its colour; scored as the passkey. Both retrieval tables also report how much of
  the planted text the store held after the prefill, against how much of all the prompt it held.
admitted: the share of the tokens that left the window which the cache still holds; KV held: K/V bytes
held at the end of the sequence, against a dense cache of the same tokens.

Tables go to stdout (markdown), JSON to --out, a PNG plot to --plot (needs matplotlib), progress to stderr.
"""
import argparse
import json
import math
import platform
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import zip_longest
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cache import DenseCache, Eviction, WriteGatedCache, allocated_bytes, pages_for, prompt_snapkv_scores, resolve_backend
from convert_gguf import checkpoint_or_default
from data import DataError, chat_prefix, make_samples, read_documents
from gate import (DEFAULT_PAGE_SIZE, DEFAULT_WINDOW, SNAPKV_OBSERVE, Budget, ConstantGate, build_caches, gate_settings,
                  install, load_gates, parse_budget, parse_policy, selected_pages)
from model import DTYPES, Transformer, default_dtype
from tokenizer import Tokenizer

# Ten retrieval prompts per length (two per depth), for the passkey and for the multi-key task with four keys:
# one prompt per cell could not tell 8/10 from 10/10. Trial 0 is the prompt a one-trial grid asked, so earlier
# pieces still merge. At 8k SmolLM2-135M missed the passkey even densely in the runs before ebeb3c7 (README then): those rows measure
# the model.
FULL = dict(lengths=[2048, 4096, 8192], docs=2, decode_tokens=128, passkey_lengths=[2048, 4096, 8192],
            depths=[0.0, 0.25, 0.5, 0.75, 1.0], trials=2, keys=4, budgets=[15, 25, 40], select_budgets=[384, 512, 1024])
# --quick, a look in a few minutes and not a result: one gate (gate_files), one document, the passkey far back.
QUICK = dict(lengths=[512], docs=1, decode_tokens=16, passkey_lengths=[512], depths=[0.0], trials=1, keys=0, budgets=[],
             select_budgets=[])


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message names the problem in one line."""


# ---------------------------------------------------------------------------------------------
# Tasks: held-out documents and passkey prompts

def source_order(docs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Documents taken in turn from each source folder (austen/, python-docs/, ...), so the first few span them all."""
    groups: dict[str, list] = {}
    for name, text in docs:
        groups.setdefault(name.split("/")[0], []).append((name, text))
    return [d for turn in zip_longest(*groups.values()) for d in turn if d is not None]


def document_samples(tok: Tokenizer, docs: list[tuple[str, str]], lengths: list[int], n: int,
                     device: str = "cpu") -> dict[int, list[tuple[str, Tensor]]]:
    """Per length L, (name, ids (L,)) of the first n documents long enough: the chat prefix and the
    document's start, exactly as the gate trainer builds a sample (data.make_samples)."""
    prefix = chat_prefix(tok)
    longest = max(lengths)
    # Prose runs about 4 characters a token; 16 per token leaves room for any text.
    ids = [(name, tok.encode(text[:16 * longest], add_special_tokens=False)) for name, text in docs]
    samples = {}
    for L in lengths:
        fit = [(name, make_samples([t], prefix, L)[0].to(device)) for name, t in ids if len(prefix) + len(t) >= L][:n]
        if len(fit) < n:
            raise DataError(f"only {len(fit)} held-out documents reach {L} tokens, {n} asked (--docs)")
        samples[L] = fit
    return samples


@dataclass(frozen=True)
class Wording:
    """A retrieval prompt's text: {key} and {label} are filled per needle (the passkey's needle has no label)."""
    instruction: str
    needle: str
    question: str
    answer: str


PASSKEY = Wording(
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it: I will ask you for it at "
    "the end.\n\n", "\nThe pass key is {key}. Remember it. {key} is the pass key.\n", "\n\nWhat is the pass key?",
    "The pass key is")
# Several keys, one asked for: a cache that keeps "the digits" without telling them apart fails here.
MULTIKEY = Wording(
    "There are several pass keys hidden inside a lot of irrelevant text, each with its own colour. Find them and "
    "memorize them: I will ask you for one of them at the end.\n\n",
    "\nThe {label} pass key is {key}. Remember it. {key} is the {label} pass key.\n",
    "\n\nWhat is the {label} pass key?", "The {label} pass key is")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "brown")


@dataclass
class Passkey:
    """Retrieval prompts of an exact token length: head + filler with the needles inside + tail."""
    wording: Wording
    filler: list[int]    # held-out prose, token ids
    tok: Tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def head_tail(self, label: str = "") -> tuple[list[int], list[int]]:
        """Up to the haystack (the chat template's opening and the instruction), and after it (the question,
        the end of the user turn, the assistant's header and the answer's opening)."""
        w, sentinel = self.wording, "\x00HAYSTACK\x00"
        question, answer = w.question.format(label=label), w.answer.format(label=label)
        if self.tok.chat_template is None:
            text = w.instruction + sentinel + question + "\n" + answer
        else:
            text = self.tok.render_chat([{"role": "user", "content": w.instruction + sentinel + question}]) + answer
        head, tail = text.split(sentinel)
        return self.encode(head), self.encode(tail)

    def needle(self, key: str, label: str = "") -> list[int]:
        return self.encode(self.wording.needle.format(key=key, label=label))

    def prompt(self, needles: list[tuple[str, str, float]], length: int,
               offset: int = 0) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids of exactly `length` tokens, the [start, end) span of each needle): needles are (key, label, depth);
        each sits after round(depth * F) of the F filler tokens (depth 0: right after the instruction, 1: right
        before the question), and the question asks for the first needle."""
        head, tail = self.head_tail(needles[0][1])
        planted = [self.needle(key, label) for key, label, _ in needles]
        n_fill = length - len(head) - sum(map(len, planted)) - len(tail)
        if n_fill < 0:
            raise EvalError(f"passkey length {length} is shorter than the prompt without filler "
                            f"({length - n_fill} tokens)")
        if offset + n_fill > len(self.filler):
            raise DataError(f"the held-out documents hold {len(self.filler)} tokens of filler, a passkey prompt "
                            f"of {length} tokens at offset {offset} needs {offset + n_fill}")
        fill = self.filler[offset:offset + n_fill]
        ids, spans, at = list(head), [None] * len(needles), 0
        for i in sorted(range(len(needles)), key=lambda i: needles[i][2]):
            depth_at = round(needles[i][2] * n_fill)
            ids += fill[at:depth_at]
            spans[i] = (len(ids), len(ids) + len(planted[i]))
            ids += planted[i]
            at = depth_at
        return ids + fill[at:] + tail, spans


def passkey_key(seed: int, length: int, depth: float, trial: int, needle: int | None = None) -> str:
    """The 5-digit key of one cell (of its needle-th key, for several), drawn from the cell's own coordinates:
    a run of part of the grid asks exactly the prompts the whole grid would (so pieces merge, see --merge)."""
    cell = f"{seed}/{length}/{depth:g}/{trial}" + ("" if needle is None else f"/key {needle}")
    return str(random.Random(cell).randrange(10000, 100000))


def multikey_needles(seed: int, length: int, depth: float, trial: int, n_keys: int) -> list[tuple[str, str, float]]:
    """The needles of one multi-key cell, the asked one first: (key, colour, depth), the asked one at the
    cell's depth, the others at depths and in colours drawn from the cell's coordinates."""
    rng = random.Random(f"{seed}/{length}/{depth:g}/{trial}/multikey")
    colours = rng.sample(COLOURS, n_keys)
    depths = [depth] + [rng.random() for _ in range(n_keys - 1)]
    return [(passkey_key(seed, length, depth, trial, i), colours[i], depths[i]) for i in range(n_keys)]


def passkey_correct(answer: str, key: str) -> bool:
    """The first number in the answer is the key (so "71432." passes, "714321" and "7143" do not)."""
    number = re.search(r"\d+", answer)
    return number is not None and number.group() == key


# ---------------------------------------------------------------------------------------------
# Policies that need more than a --gate spec: matched random admission and the eviction baseline

def fingerprint(k: Tensor) -> Tensor:
    """An exact integer digest of each key vector, (..., D) -> (...) int64: a store holds copies of prompt keys,
    so equal digests say which prompt positions it holds (integer sums, so no rounding can differ)."""
    raw = k.contiguous().view(torch.uint8).long()                                             # (..., D x bytes)
    weights = torch.randint(1, 2**40, (raw.shape[-1],), generator=torch.Generator().manual_seed(0)).to(k.device)
    return (raw * weights).sum(-1)


class Recorder(nn.Module):
    """A gate that keeps every g it hands out, so the baselines matched to it see its decisions, and the
    fingerprints of the keys it was shown, so that prompt_store can tell which of them a store holds."""

    def __init__(self, gate: nn.Module):
        super().__init__()
        self.gate = gate
        self.calls: list[Tensor] = []
        self.keys: list[Tensor] = []

    def forward(self, k_pre: Tensor, k_post: Tensor, input_pos: Tensor) -> Tensor:
        g = self.gate(k_pre, k_post, input_pos)                                                  # (B, Hkv, T)
        self.calls.append(g)
        self.keys.append(fingerprint(k_post))                                                    # (B, Hkv, T)
        return g

    def admitted(self, threshold: float) -> Tensor:
        """(Hkv, S) bool: g > tau at every position the sequence reached (batch row 0)."""
        return torch.cat(self.calls, dim=-1)[0] > threshold


class TableGate(nn.Module):
    """Admission decisions fixed in advance, read by position: g = table[h, pos] in {0, 1}."""

    def __init__(self, table: Tensor):
        super().__init__()
        self.register_buffer("table", table.float(), persistent=False)                           # (Hkv, S)

    def forward(self, k_pre: Tensor, k_post: Tensor, input_pos: Tensor) -> Tensor:
        return self.table[:, input_pos].expand(k_pre.shape[0], -1, -1)                           # (B, Hkv, T)


def shuffled(admitted: Tensor, window: int, generator: torch.Generator) -> Tensor:
    """admitted (Hkv, S) with each head's decisions permuted at random among the positions older than
    the last W and, apart, among the last W: every head keeps as many tokens in its store and its ring."""
    H, S = admitted.shape
    out = torch.empty_like(admitted)
    cut = max(S - window, 0)
    for segment in (slice(0, cut), slice(cut, S)):
        n = segment.stop - segment.start
        perm = torch.rand(H, n, generator=generator).argsort(dim=-1).to(admitted.device)      # (Hkv, n)
        out[:, segment] = admitted[:, segment].gather(1, perm)
    return out


def matched_capacity(admitted: Tensor, window: int) -> int:
    """Store slots per KV head for the eviction baseline in one layer: the gate's mean count of held
    tokens older than the window, rounded, at least 1 (so the layer's total is within one token per head)."""
    old = admitted[:, :max(admitted.shape[1] - window, 0)].sum(-1).float()                    # (Hkv,)
    return max(1, round(old.mean().item()))


class SnapKVCache(WriteGatedCache):
    """The eviction baseline: SnapKV's score in place of g, in the write-gated cache's own capacity rule.

    With tau = 0 and every score > 0, every token is admitted, so the prefill attends densely (SnapKV
    compresses after reading the prompt), and the store of C slots keeps the C tokens older than the
    window with the highest score. The ring keeps its tokens' scores too, and a token leaving it takes
    the place of the store's lowest-score entry when its own score is higher (promote). Tokens decoded
    later get g = 0 from their gate (ConstantGate(0)): they have no score and the eval never decodes
    more than W tokens, so none leaves the ring. The cache holds C + W tokens per head at most.
    """

    def __init__(self, *args, snapkv_window: int = SNAPKV_OBSERVE, pooling: int = 7, **kwargs):
        """WriteGatedCache's arguments, with tau = 0 and pages of one token, so that the store holds exactly C (the
        budget matched to the gate's): gate.build_caches builds it so."""
        super().__init__(*args, **kwargs)
        self.snapkv_window, self.pooling = snapkv_window, pooling

    def append(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, input_pos: Tensor) -> Tensor:
        """The prompt, in one call (its scores are the prompt's own, so a chunk is refused)."""
        assert int(input_pos[0]) == 0, "SnapKVCache takes its prompt in one call"
        score = prompt_snapkv_scores(q, k, self.scale, self.snapkv_window, self.pooling).clamp_min(torch.finfo(torch.float32).tiny)
        return super().append(q, k, v, score, input_pos)


@dataclass
class Row:
    """One row of the tables: its name, and the gates and caches install_policy sets up for it."""
    name: str
    kind: str          # "dense", "gate" (a file), "builtin" (none, sink:N), "random" or "snapkv" (matched to a gate),
                       # "budget" (a gate, or full, on a pool of a share of dense, with an eviction policy),
                       # "select" (a gate, or full, with selection in decode)
    spec: str = ""     # the --gate spec (gate, builtin, budget) or the matched gate's name (random, snapkv)
    budget: str | None = None   # the pool: --kv-budget's forms (gate: None is the gate's default; budget: "X%")
    evict: str = "lowest-g"     # what makes room when the pool runs short (gate, budget)
    select: int | None = None   # select: the tokens a decode step attends per KV head (--select-budget)


def install_policy(model: Transformer, policy: Row, seq_len: int, window: int, recorded: dict, backend: str,
                   seed: int) -> Eviction | None:
    """Gates and caches (gate.build_caches) for one sequence of seq_len positions; returns the Eviction to call
    between decode steps, if the policy has one. recorded: {gate name: per layer (Hkv, S) admissions}."""
    if policy.kind == "dense":
        build_caches(model, seq_len)
        return None
    if policy.kind in ("gate", "builtin", "budget", "select"):
        setup = build_caches(model, seq_len, gate=policy.spec, window=window, backend=backend, kv_budget=policy.budget,
                             evict=policy.evict, select_budget=policy.select)
        install(model, [Recorder(layer.attention.gate) for layer in model.layers])
        return setup.evictor
    if policy.kind == "random":
        # A fresh generator: the same gate decisions give the same shuffle in every table.
        generator = torch.Generator().manual_seed(seed)
        tables = [shuffled(a, window, generator) for a in recorded[policy.spec]]                 # per layer (Hkv, S)
        # A pool of exactly the pages its store needs: the gate's bytes, allocated as tightly as they can be.
        old = max(seq_len - window, 0)
        pages = sum(pages_for(int(n), DEFAULT_PAGE_SIZE) for t in tables for n in t[:, :old].sum(-1))
        build_caches(model, seq_len, gate=[Recorder(TableGate(t)) for t in tables], window=window,
                     global_capacity=max(old, 1), kv_budget=Budget("tokens", pages * DEFAULT_PAGE_SIZE), evict=None,
                     backend=backend)
        return None
    # snapkv: every token admitted (tau 0) and scored by SnapKV, each layer's store as large as the gate's.
    build_caches(model, seq_len, gate=[Recorder(ConstantGate(0.0)) for _ in model.layers], window=window,
                 threshold=0.0, global_capacity=[matched_capacity(a, window) for a in recorded[policy.spec]],
                 kv_budget="unlimited", page_size=1, evict=None, backend=backend, cache=SnapKVCache)
    return None


def recording(model: Transformer) -> list[Tensor]:
    """The admissions a gate policy made on the sequence just run, per layer (Hkv, S)."""
    return [layer.attention.gate.admitted(layer.attention.cache.threshold) for layer in model.layers]


def prompt_store(model: Transformer, T: int) -> Tensor:
    """(L, Hkv, T) bool: the prompt positions the long-lived store of each layer and KV head holds after a
    prefill of T tokens: every position for the dense cache; else the positions whose keys' fingerprints the
    store holds (whatever its capacity, its pool's budget or an eviction kept)."""
    held = []
    for layer in model.layers:
        cache = layer.attention.cache
        if isinstance(cache, DenseCache):
            held.append(torch.ones(cache.k_cache.shape[1], T, dtype=torch.bool))
            continue
        prompt = layer.attention.gate.keys[0][0]                                               # (Hkv, T)
        stored = fingerprint(cache.store_contents()[0][0])                                     # (Hkv, C)
        lengths = cache.global_len[0].tolist()
        held.append(torch.stack([torch.isin(prompt[h], stored[h, :n]) for h, n in enumerate(lengths)]).cpu())
    return torch.stack(held)


# ---------------------------------------------------------------------------------------------
# Running a sequence through the installed policy, and scoring it

def prefill_all(model: Transformer, ids: Tensor) -> Tensor:
    """Hidden states (L, dim) of one prefill of ids (L,)."""
    return model.body(ids[None])[0]


def prefill_then_decode(model: Transformer, ids: Tensor, n: int, evictor: Eviction | None = None) -> Tensor:
    """Hidden states (n, dim) of queries L-n-1 .. L-2: prefill ids[:L-n], then feed ids[L-n:] one at a
    time (the last one's output predicts past the sample, but its K/V and admission count in the stats).
    evictor: the policy's Eviction, called after each decode step as generate.py calls it."""
    L = ids.shape[0]
    positions = torch.arange(L, device=ids.device)
    out = [model.body(ids[None, :L - n])[0, -1:]]
    for step, p in enumerate(range(L - n, L), 1):
        out.append(model.body(ids[None, p:p + 1], positions[p:p + 1])[0])
        if evictor is not None:
            evictor.after_step(step)
    return torch.cat(out[:-1])


def generate(model: Transformer, ids: Tensor, n_new: int, evictor: Eviction | None = None) -> list[int]:
    """Greedy: prefill ids (P,), then n_new tokens; P + n_new - 1 positions pass through the cache."""
    P = ids.shape[0]
    tokens = [model.output(model.body(ids[None])[0, -1]).argmax()]
    for step, p in enumerate(range(P, P + n_new - 1), 1):
        h = model.body(tokens[-1].view(1, 1), torch.tensor([p], device=ids.device))           # (1, 1, dim)
        tokens.append(model.output(h[0, -1]).argmax())
        if evictor is not None:
            evictor.after_step(step)
    return torch.stack(tokens).tolist()


def compare(model: Transformer, hidden: Tensor, ref: Tensor, targets: Tensor, chunk: int = 512) -> dict[str, Tensor]:
    """Per prediction: NLL of the target, KL(dense || policy), top-1 agreement with dense.

    hidden, ref: (N, dim) the policy's and dense's final hidden states; targets: (N,). Logits are
    made a chunk at a time: at 8k tokens a whole (N, vocab) pair would take gigabytes.
    """
    nll, kl, agree = [], [], []
    for s in range(0, hidden.shape[0], chunk):
        lp = F.log_softmax(model.output(hidden[s:s + chunk]).float(), dim=-1)                 # (n, V)
        lr = F.log_softmax(model.output(ref[s:s + chunk]).float(), dim=-1)                    # (n, V)
        nll.append(-lp.gather(-1, targets[s:s + chunk, None])[:, 0])
        kl.append((lr.exp() * (lr - lp)).sum(-1))
        agree.append((lp.argmax(-1) == lr.argmax(-1)).float())
    return {"nll": torch.cat(nll).cpu(), "kl": torch.cat(kl).cpu(), "agree": torch.cat(agree).cpu()}


def totals(m: dict[str, Tensor]) -> dict[str, float]:
    """One sequence's scores as sums, which pool exactly across sequences and across runs (--merge)."""
    return {"predictions": m["nll"].numel(), **{f"{k}_sum": m[k].double().sum().item() for k in ("nll", "kl", "agree")}}


def kv_stats(model: Transformer, seen: int, window: int) -> dict[str, int]:
    """Token counts summed over layers and KV heads, read once after a sequence: tokens older than the
    window (left), those of them still held (kept), all held (held) and all seen; bytes per token; the
    bytes the caches allocated (rings, page tables and pools, each pool once); admitted tokens lost (lost): not
    stored by a head without room, or evicted later; tokens attended by the decode steps (read) and the steps
    (decoded), both counted per KV head (none for the dense cache)."""
    c = model.config
    caches = [layer.attention.cache for layer in model.layers]
    if isinstance(caches[0], DenseCache):
        heads = c.n_layers * c.n_kv_heads
        left = heads * max(seen - window, 0)
        return {"left": left, "kept": left, "held": heads * seen, "seen": heads * seen,
                "bytes_per_token": caches[0].bytes_per_token(), "lost": 0,
                "allocated": allocated_bytes(caches)}
    total = lambda tensors: int(torch.stack([t.sum() for t in tensors]).sum())
    counts = [cache.counts() for cache in caches]
    return {"left": total(cache.n_left for cache in caches), "kept": total(cache.global_len for cache in caches),
            "held": total(n["held"] for n in counts), "seen": total(n["seen"] for n in counts),
            "bytes_per_token": caches[0].bytes_per_token(),
            "lost": total(n["capacity_drops"] for n in counts) + total(n["evicted"] for n in counts),
            "read": total(n["read"] for n in counts), "decoded": total(n["decoded"] for n in counts),
            "allocated": allocated_bytes(caches)}


# ---------------------------------------------------------------------------------------------
# The grid

# The rows --policies chooses among; "compositions" are the --budgets rows.
FAMILIES = ("dense", "gate", "random", "snapkv", "none", "sink", "compositions", "selection")


def family_of(policy: Row) -> str:
    return {"builtin": policy.spec.split(":")[0], "budget": "compositions", "select": "selection"}.get(policy.kind,
                                                                                                     policy.kind)


def policy_list(gates: list[tuple[str, str]], sink: int, kv_budget: str | None = None,
                budgets: tuple[float, ...] = (), families: tuple[str, ...] = FAMILIES,
                select_budgets: tuple[int, ...] = ()) -> list[Row]:
    """dense, each gate with its matched baselines, none, sink:N (a gate runs before the rows matched to it),
    then per budget (a share of dense, in %) the compositions: each gate with lowest-g and with snapkv
    eviction, and snapkv alone (every token admitted, SnapKV evicting); then per select budget (tokens a decode
    step attends) each gate with selection, and Quest alone (every token stored, selection); only the rows of
    the given families. kv_budget: the plain gate rows' and the selection rows' pool."""
    rows = [Row("dense", "dense")]
    for name, path in gates:
        rows += [Row(name, "gate", path, kv_budget), Row(f"random ~ {name}", "random", name),
                 Row(f"snapkv ~ {name}", "snapkv", name)]
    rows += [Row("none", "builtin", "none"), Row(f"sink:{sink}", "builtin", f"sink:{sink}")]
    for share in budgets:
        for name, path in gates:
            rows += [Row(f"{name} + {evict} @ {share:g}%", "budget", path, f"{share:g}%", evict)
                     for evict in ("lowest-g", "snapkv")]
        rows.append(Row(f"snapkv alone @ {share:g}%", "budget", "full", f"{share:g}%", "snapkv"))
    for n in select_budgets:
        rows += [Row(f"{name} + select @ {n}", "select", path, kv_budget, select=n) for name, path in gates]
        rows.append(Row(f"quest alone @ {n}", "select", "full", "unlimited", select=n))
    return [p for p in rows if family_of(p) in families]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def documents_task(model: Transformer, policies: list[Row], samples: dict, window: int, decode_tokens: int,
                   setup) -> dict[str, list[dict]]:
    """Perplexity and agreement by one prefill per policy that one prefill measures, then the decode table for
    every policy. Neither an eviction baseline nor a budget row is in the first: a prompt's own queries read
    every token it admitted, whatever the pool then keeps, so only decoding after the prefill shows the budget.

    setup(policy, seq_len, recorded) installs a policy and returns its Eviction (or None). Returns
    per-(policy, document) records of the "perplexity" and "decode" tables, and "checks": one prefill against
    prefill + decode, per policy.
    """
    out = {"perplexity": [], "decode": [], "checks": []}
    for L, docs in samples.items():
        for i, (doc, ids) in enumerate(docs):
            recorded, one_prefill, ref = {}, {}, None
            for policy in [p for p in policies if p.kind not in ("snapkv", "budget", "select")]:
                t0 = time.time()
                setup(policy, L, recorded)
                hidden = prefill_all(model, ids)                                                    # (L, dim)
                if policy.kind == "gate":
                    recorded[policy.name] = recording(model)
                ref = hidden if ref is None else ref          # dense runs first
                m = compare(model, hidden[window:L - 1], ref[window:L - 1], ids[window + 1:])
                one_prefill[policy.name] = m["nll"]
                out["perplexity"].append({"length": L, "policy": policy.name, "doc": doc, **totals(m),
                                          **kv_stats(model, L, window)})
                say(f"[perplexity L={L} doc {i + 1}/{len(docs)}] {policy.name}: "
                    f"ppl {m['nll'].mean().exp():.3f}, {time.time() - t0:.1f} s")
            if not decode_tokens:
                continue
            n = decode_tokens
            for policy in policies:
                t0 = time.time()
                evictor = setup(policy, L, recorded)
                hidden = prefill_then_decode(model, ids, n, evictor)                                # (n, dim)
                m = compare(model, hidden, ref[L - n - 1:L - 1], ids[L - n:])
                out["decode"].append({"length": L, "policy": policy.name, "doc": doc, **totals(m),
                                      **kv_stats(model, L, window)})
                say(f"[decode L={L} doc {i + 1}/{len(docs)}] {policy.name}: prefill {L - n} + decode {n}: "
                    f"ppl {m['nll'].mean().exp():.3f}, {time.time() - t0:.1f} s")
                if policy.name in one_prefill:
                    diff = (one_prefill[policy.name][-n:] - m["nll"]).abs().max().item()
                    out["checks"].append({"length": L, "doc": doc, "policy": policy.name, "max_abs_nll_diff": diff})
            worst = max((c for c in out["checks"] if c["length"] == L and c["doc"] == doc),
                        key=lambda c: c["max_abs_nll_diff"])
            say(f"check: one prefill vs prefill + decode on the last {n} predictions, L={L}, {doc}: "
                f"largest |NLL difference| {worst['max_abs_nll_diff']:.2e} ({worst['policy']})")
    return out


def passkey_task(model: Transformer, tok: Tokenizer, policies: list[Row], passkey: Passkey, lengths: list[int],
                 depths: list[float], trials: int, window: int, seed: int, setup, n_keys: int = 1) -> list[dict]:
    """Greedy answers to retrieval prompts, one record per (length, depth, trial, policy): the passkey (one
    needle) or, with n_keys > 1, n_keys needles of which the one at the cell's depth is asked for. Each record
    counts the planted tokens older than the window after the prefill and how many of them the store held,
    beside the same counts over every prompt token (over layers and KV heads)."""
    device = model.output.weight.device
    name = "passkey" if n_keys == 1 else "multikey"
    out = []
    for L in lengths:
        for depth in depths:
            for trial in range(trials):
                needles = [(passkey_key(seed, L, depth, trial), "", depth)] if n_keys == 1 else \
                    multikey_needles(seed, L, depth, trial, n_keys)
                key = needles[0][0]
                ids, spans = passkey.prompt(needles, L, offset=trial * L)
                ids = torch.tensor(ids, device=device)
                old = torch.zeros(L, dtype=torch.bool)                                            # (L,)
                old[:max(L - window, 0)] = True
                planted = torch.zeros(L, dtype=torch.bool)                                        # (L,)
                for a, b in spans:
                    planted[a:b] = True
                n_new = len(tok.encode(" " + key, add_special_tokens=False)) + 1
                seen = L + n_new - 1
                recorded = {}
                for policy in policies:
                    t0 = time.time()
                    evictor = setup(policy, seen, recorded)
                    answer = tok.decode(generate(model, ids, n_new, evictor))
                    if policy.kind == "gate":
                        recorded[policy.name] = recording(model)
                    held = prompt_store(model, L)                                                 # (layers, Hkv, L)
                    correct = passkey_correct(answer, key)
                    out.append({"length": L, "policy": policy.name, "depth": depth, "trial": trial, "key": key,
                                "needles": [[k, label, d] for k, label, d in needles], "spans": spans, "answer": answer,
                                "correct": correct, "planted_left": int((planted & old).sum()) * held.shape[0] * held.shape[1],
                                "planted_held": int(held[:, :, planted & old].sum()),
                                "prompt_left": int(old.sum()) * held.shape[0] * held.shape[1],
                                "prompt_held": int(held[:, :, old].sum()), **kv_stats(model, seen, window)})
                    say(f"[{name} L={L} depth {depth:g} trial {trial + 1}/{trials}] {policy.name}: "
                        f"{'right' if correct else 'wrong'} {answer!r}, {time.time() - t0:.1f} s")
    return out


# ---------------------------------------------------------------------------------------------
# Summaries, tables, plot

def summarize(records: list[dict], policies: list[str], metrics: bool) -> list[dict]:
    """One row per (length, policy), pooled over its sequences."""
    rows = []
    for L in sorted({r["length"] for r in records}):
        for policy in policies:
            rs = [r for r in records if r["length"] == L and r["policy"] == policy]
            if not rs:
                continue
            total = lambda k: sum(r[k] for r in rs)
            row = {"length": L, "policy": policy, "sequences": len(rs),
                   "admitted": total("kept") / max(total("left"), 1),
                   "kv_held": total("held") / total("seen"),
                   "kv_bytes": total("held") * rs[0]["bytes_per_token"] / len(rs),
                   # Runs from before the pool have neither count.
                   "allocated": total("allocated") / len(rs) if all("allocated" in r for r in rs) else None,
                   "lost": total("lost") if all("lost" in r for r in rs) else None,
                   # Tokens a decode step attended per KV head (runs from before the count, and dense, have none).
                   "read_per_step": total("read") / total("decoded") if all(r.get("decoded") for r in rs) else None}
            if metrics:
                n = total("predictions")
                row |= {"ppl": math.exp(total("nll_sum") / n), "kl": total("kl_sum") / n,
                        "top1": total("agree_sum") / n, "predictions": n}
            rows.append(row)
    return rows


def summarize_passkey(records: list[dict], policies: list[str]) -> list[dict]:
    """Per (length, policy): right answers per depth, and the admission diagnostic: the share of the planted
    tokens older than the window that the store held, against that share over every prompt token."""
    rows = summarize(records, policies, metrics=False)
    depths = sorted({r["depth"] for r in records})
    for row in rows:
        rs = [r for r in records if r["length"] == row["length"] and r["policy"] == row["policy"]]
        row["cells"] = {f"{d:g}": [r["correct"] for r in rs if r["depth"] == d] for d in depths}
        row["accuracy"] = sum(r["correct"] for r in rs) / len(rs)
        for what in ("planted", "prompt"):   # runs from before the diagnostic have neither count
            left = sum(r.get(f"{what}_left", 0) for r in rs)
            row[f"{what}_held"] = sum(r.get(f"{what}_held", 0) for r in rs) / left if left else None
    return rows


def markdown(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def memory_cells(row: dict) -> list[str]:
    allocated, lost, read = row.get("allocated"), row.get("lost"), row.get("read_per_step")
    return [str(row["length"]), row["policy"], f"{row['admitted']:.1%}", f"{row['kv_held']:.1%}",
            f"{row['kv_bytes'] / 2**20:.1f}", "-" if allocated is None else f"{allocated / 2**20:.1f}",
            "-" if lost is None else str(lost), "-" if read is None else f"{read:.0f}"]


def report(result: dict) -> str:
    """The markdown on stdout: one table per task with its protocol, then the runs' footer."""
    window, decode_tokens = result["grid"]["window"], result["grid"]["decode_tokens"]
    head = ["L", "policy", "admitted", "KV held", "KV MiB", "alloc MiB", "lost", "read/step"]
    parts = []
    if result["perplexity"]:
        parts += [f"### Held-out perplexity and agreement with dense (one prefill per policy; scored: predictions "
                  f"of queries at positions >= W = {window})",
                  markdown(head + ["ppl", "KL", "top-1"],
                           [memory_cells(r) + [f"{r['ppl']:.3f}", f"{r['kl']:.4f}", f"{r['top1']:.1%}"]
                            for r in result["perplexity"]])]
    if result["decode"]:
        parts += [f"### Equal KV budget, decoding (prefill L - {decode_tokens}, decode {decode_tokens} tokens one by "
                  f"one; scored: those {decode_tokens} predictions; snapkv reads the prompt densely, then keeps its "
                  f"budget by score)",
                  markdown(head + ["ppl", "KL", "top-1"],
                           [memory_cells(r) + [f"{r['ppl']:.3f}", f"{r['kl']:.4f}", f"{r['top1']:.1%}"]
                            for r in result["decode"]])]
    share = lambda x: "-" if x is None else f"{x:.1%}"
    titles = {"passkey": "Passkey retrieval (correct / prompts at each depth of the needle)",
              "multikey": f"Multi-key retrieval ({result['grid'].get('keys')} keys of different colours planted, the "
                          f"one at the depth asked for; correct / prompts at each depth)"}
    for task, title in titles.items():
        if result.get(task):
            depths = list(result[task][0]["cells"])
            parts += [f"### {title}; planted held: share of the needles' tokens older than the window that the store "
                      f"held after the prefill (over layers and KV heads), against all tokens held: the same share "
                      f"over every prompt token",
                      markdown(head + [f"depth {d}" for d in depths] + ["all", "planted held", "all tokens held"],
                               [memory_cells(r) + [f"{sum(c)}/{len(c)}" for c in r["cells"].values()]
                                + [f"{r['accuracy']:.0%}", share(r["planted_held"]), share(r["prompt_held"])]
                                for r in result[task]])]
    runs = result["runs"]
    joined = lambda key: ", ".join(dict.fromkeys(r[key] for r in runs))
    commands = "; ".join(f"`{r['command']}` ({r['wall_s']:.0f} s)" for r in runs)
    parts.append(f"admitted: share of the tokens that left the window which the cache still holds; KV held: K/V bytes "
                 f"held at the end of each sequence against a dense cache of the same tokens (KV MiB: per sequence); alloc "
                 f"MiB: what the caches allocated per sequence (rings, page tables and the page pool: a gate's default "
                 f"budget, random's exact need, or the row's @ budget); lost: admitted tokens not stored for want of "
                 f"room or evicted later, over all sequences (for snapkv ~ G, which scores every token, its evictions); "
                 f"read/step: tokens a decode step attended per KV head (window and store; - for dense). "
                 f"Model {runs[0]['model']}, W = {window}, {runs[0]['dtype']} on {joined('machine')}, {joined('date')}, "
                 f"{sum(r['wall_s'] for r in runs):.0f} s in {len(runs)} run{'s' * (len(runs) > 1)}: {commands}")
    return "\n\n".join(parts)


def policy_family(name: str, gates: dict) -> str:
    """The family a row's policy belongs to: dense, gate, random, snapkv, the built-in's own name, or for a
    budget row its composition (G + lowest-g, G + snapkv, snapkv alone), whose budgets trace one curve."""
    return "gate" if name in gates else name.split(" @ ")[0].split(" ~ ")[0]


def plot(result: dict, path: str) -> None:
    """Quality against the KV memory allocated as a share of the dense cache's (runs from before the pool: the
    share held), one panel per task: perplexity relative to dense at the
    same length (the documents differ per length, so raw perplexities do not compare across lengths), passkey
    accuracy as it is. Colour: the policy's family; marker: the length; a line joins a family's points at one
    length, so each gate family traces its trade-off curve beside the matched baselines. Where rows count the
    tokens a decode step attends (selection), a last panel draws decode perplexity against those."""
    try:
        import matplotlib
    except ImportError:
        say(f"no plot: matplotlib is not installed (pip install matplotlib to get {path})")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(task, label, "memory") for task, label in (("perplexity", "perplexity / dense (one prefill)"),
                                                          ("decode", "perplexity / dense (prefill + decode)"),
                                                          ("passkey", "passkey accuracy"),
                                                          ("multikey", "multi-key accuracy"))
              if result.get(task)]
    if any(r.get("read_per_step") for r in result.get("decode", [])):
        panels.append(("decode", "perplexity / dense (prefill + decode)", "read"))
    if not panels:   # a run of no task (--lengths and --passkey-lengths with nothing after them)
        say(f"no plot: the run has no table to draw (nothing written to {path})")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    families = list(dict.fromkeys(policy_family(r["policy"], result["gates"]) for task, *_ in panels
                                  for r in result[task]))
    colors = {f: "black" if f == "dense" else plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    lengths = sorted({r["length"] for task, *_ in panels for r in result[task]})
    markers = dict(zip(lengths, "osD^vP*X"))
    for ax, (task, label, x) in zip(axes[0], panels):
        for L in lengths:
            rows = [r for r in result[task] if r["length"] == L]
            dense = next((r for r in rows if r["policy"] == "dense"), None)
            retrieval = task in ("passkey", "multikey")
            if not retrieval and dense is None:
                continue                       # nothing to be relative to
            value = (lambda r: r["accuracy"]) if retrieval else (lambda r: r["ppl"] / dense["ppl"])
            allocated = dense is not None and all(r.get("allocated") for r in rows)
            memory = (lambda r: r["allocated"] / dense["allocated"]) if allocated else (lambda r: r["kv_held"])
            if x == "read":
                memory, rows = (lambda r: r["read_per_step"]), [r for r in rows if r.get("read_per_step")]
            for family in families:
                points = sorted((memory(r), value(r)) for r in rows
                                if policy_family(r["policy"], result["gates"]) == family)
                if points:
                    ax.plot(*zip(*points), color=colors[family], marker=markers[L], linewidth=0.8, alpha=0.85)
        ax.set_xlabel("tokens a decode step attends per KV head" if x == "read" else
                      "KV cache allocated (share of dense; held, for runs before the pool)")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        if task in ("passkey", "multikey"):
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[f], marker="o", linestyle="", label=f) for f in families]
    handles += [plt.Line2D([], [], color="gray", marker=markers[L], linestyle="", label=f"L = {L}") for L in lengths]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.91, 1))
    fig.savefig(path, dpi=100)
    say(f"plot: {path}")


# ---------------------------------------------------------------------------------------------
# The run: the gate files, the grid and its checks, the prompts, then every task

def gate_files(model: Transformer, gates_dir: str, gate: list[str], window: int | None,
               quick: bool = False) -> tuple[dict, int]:
    """The gate settings to evaluate, {name: (PATH@SETTING, metadata)} (gate.gate_settings): every setting of every
    file under gates_dir, then each --gate's (quick: one, the first --gate's, else the default setting of the first
    file under gates_dir), each checked to fit the model; and the window W: the given one, else the first gate's,
    else the default."""
    under = sorted(str(p) for p in Path(gates_dir).glob("*") if p.suffix in (".safetensors", ".pt", ".pth")) \
        if Path(gates_dir).is_dir() else []
    specs = ([*gate] or under)[:1] if quick else under + list(gate)
    if quick and specs and parse_policy(specs[0]).setting is None:
        specs = [f"{specs[0]}@{load_gates(specs[0])[1]['default_setting']}"]
    gate_meta = gate_settings(specs, model)   # a --gate also under --gates-dir runs once
    if window is None:
        window = next((m["window"] for _, m in gate_meta.values() if "window" in m), DEFAULT_WINDOW)
    for name, (path, metadata) in gate_meta.items():
        if metadata.get("window", window) != window:
            say(f"note: gate {name} was trained with W = {metadata['window']}, evaluated at W = {window}")
    if not gate_meta:
        say(f"note: no gate files under {gates_dir}/ and no --gate: the table has the built-in policies only")
    return gate_meta, window


def check_grid(grid: dict, model: Transformer, gate_meta: dict, backend: str, device: str) -> None:
    """Check the whole grid before the first long run: EvalError (GateError for --kv-budget and --select-budgets),
    one line."""
    resolve_backend(backend, device)
    lengths, passkey_lengths, window = grid["lengths"], grid["passkey_lengths"], grid["window"]
    limit = model.config.max_position_embeddings
    for L in lengths + passkey_lengths:
        if L > limit:
            raise EvalError(f"length {L} exceeds the model's context of {limit} tokens")
    if window < 1 or grid["sink"] < 0 or grid["docs"] < 1 or grid["trials"] < 0 or grid["decode_tokens"] < 0 \
            or not (grid["keys"] == 0 or 2 <= grid["keys"] <= len(COLOURS)):
        raise EvalError(f"need --window >= 1, --sink >= 0, --docs >= 1, --trials >= 0, --decode-tokens >= 0, "
                        f"--keys 0 or 2..{len(COLOURS)}")
    if grid["decode_tokens"] > window:
        raise EvalError(f"--decode-tokens {grid['decode_tokens']} exceeds the window W = {window}: the eviction "
                        f"baseline scores prompt tokens only, so no decoded token may leave the window")
    for L in lengths:
        if L <= window + grid["decode_tokens"] + 1:
            raise EvalError(f"length {L} leaves nothing outside the window: need more than W + decode tokens + 1 "
                            f"= {window + grid['decode_tokens'] + 1}")
    if any(not 0 <= d <= 1 for d in grid["depths"]):
        raise EvalError(f"depths {grid['depths']} must lie in [0, 1]")
    if any(not 0 < b <= 100 for b in grid["budgets"]):
        raise EvalError(f"--budgets {grid['budgets']}: each a share of the dense cache in (0, 100]")
    for n in grid["select_budgets"]:   # a budget below the window plus a page: GateError, one line
        selected_pages(n, window, DEFAULT_PAGE_SIZE, "--select-budgets")
    parse_budget(grid["kv_budget"])   # a bad --kv-budget: GateError, one line
    families = grid["families"]
    if (lengths or passkey_lengths) and not families:
        raise EvalError("--policies with nothing after it leaves no row to run")
    if lengths and "dense" not in families:
        raise EvalError("perplexity and decode compare every policy with dense: add dense to --policies, "
                        "or skip them with --lengths and nothing after it")
    if gate_meta and {"random", "snapkv"} & set(families) and "gate" not in families:
        raise EvalError("random ~ G and snapkv ~ G take their budget from the gate's own admissions: "
                        "add gate to --policies")


def retrieval_prompts(tok: Tokenizer, documents: list[tuple[str, str]], grid: dict) -> tuple[Passkey, Passkey] | None:
    """The passkey and multi-key prompt makers over held-out filler, each length of the grid tried once (too
    short a length, or too little filler, raises); None, and no passkey lengths in the grid, without depths
    or trials."""
    lengths, trials, keys = grid["passkey_lengths"], grid["trials"], grid["keys"]
    if not (lengths and grid["depths"] and trials):
        grid["passkey_lengths"] = []
        return None
    need = trials * max(lengths)   # trial t reads the filler from t * L on
    filler = []
    for _, text in documents:
        filler += tok.encode(text[:16 * need] + "\n\n", add_special_tokens=False)
        if len(filler) >= need:
            break
    passkey, multikey = Passkey(PASSKEY, filler, tok), Passkey(MULTIKEY, filler, tok)
    for L in lengths:   # raises on a length too short for the prompt or filler too short
        passkey.prompt([("00000", "", 0.5)], L, offset=(trials - 1) * L)
        if keys:
            multikey.prompt([("00000", max(COLOURS, key=len), 0.5)] * keys, L, offset=(trials - 1) * L)
    return passkey, multikey


def run(checkpoint: str | None, data: str, gates_dir: str, gate: list[str], quick: bool, lengths: list[int] | None,
        docs: int | None, decode_tokens: int | None, passkey_lengths: list[int] | None, depths: list[float] | None,
        trials: int | None, keys: int | None, window: int | None, sink: int, device: str | None, dtype: str | None, backend: str,
        threads: int, seed: int, out: str | None, plot_path: str | None, kv_budget: str | None = None,
        budgets: list[float] | None = None, policies: list[str] | None = None,
        select_budgets: list[int] | None = None) -> None:
    t_start = time.time()
    given = dict(lengths=lengths, docs=docs, decode_tokens=decode_tokens, passkey_lengths=passkey_lengths,
                 depths=depths, trials=trials, keys=keys)
    defaults = QUICK if quick else FULL
    grid = {k: v if v is not None else defaults[k] for k, v in given.items()}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if threads:
        torch.set_num_threads(threads)
    checkpoint = str(checkpoint_or_default(checkpoint))
    dtype = dtype or default_dtype(checkpoint, device)
    model = Transformer.from_pretrained(checkpoint, dtype=DTYPES[dtype], device=device)
    tok = Tokenizer(checkpoint)
    gate_meta, window = gate_files(model, gates_dir, gate, window, quick)
    families = tuple(policies) if policies is not None else FAMILIES
    grid |= dict(window=window, sink=sink, seed=seed, kv_budget=kv_budget,
                 budgets=budgets if budgets is not None else defaults["budgets"], families=list(families),
                 select_budgets=select_budgets if select_budgets is not None else defaults["select_budgets"])
    check_grid(grid, model, gate_meta, backend, device)

    documents = source_order(read_documents(data))
    samples = document_samples(tok, documents, grid["lengths"], grid["docs"], device) if grid["lengths"] else {}
    passkey, multikey = retrieval_prompts(tok, documents, grid) or (None, None)
    rows = policy_list([(name, path) for name, (path, _) in gate_meta.items()], sink, kv_budget,
                       tuple(grid["budgets"]), families, tuple(grid["select_budgets"]))
    say(f"eval: {len(rows)} policies, perplexity at {grid['lengths']} x {grid['docs']} documents, decode "
        f"{grid['decode_tokens']} tokens, passkey (and {grid['keys']} keys) at {grid['passkey_lengths']} x depths "
        f"{grid['depths']} x {grid['trials']} trials, W = {window}, {device}")
    setup = lambda policy, seq_len, recorded: install_policy(model, policy, seq_len, window, recorded, backend, seed)
    with torch.inference_mode():
        records = documents_task(model, rows, samples, window, grid["decode_tokens"], setup)
        cells = dict(lengths=grid["passkey_lengths"], depths=grid["depths"], trials=grid["trials"], window=window,
                     seed=seed, setup=setup)
        records["passkey"] = passkey_task(model, tok, rows, passkey, **cells) if passkey else []
        records["multikey"] = passkey_task(model, tok, rows, multikey, **cells, n_keys=grid["keys"]) \
            if multikey and grid["keys"] else []

    machine = torch.cuda.get_device_name(device) if device.startswith("cuda") else \
        f"{platform.machine()} CPU (torch threads: {torch.get_num_threads()})"
    this_run = {"command": shlex.join(["python", "eval.py"] + sys.argv[1:]), "model": Path(checkpoint).name,
                "checkpoint": checkpoint, "dtype": dtype, "machine": machine, "torch": torch.__version__,
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "wall_s": time.time() - t_start}
    gates = {name: {"path": path, "metadata": metadata} for name, (path, metadata) in gate_meta.items()}
    emit(assemble([this_run], grid, gates, [p.name for p in rows], records), out, plot_path)


TASKS = ("perplexity", "decode", "passkey", "multikey")
# What every piece of a merged grid must share; the lengths and depths may differ.
SHARED_RUN, SHARED_GRID = ("model", "dtype"), ("docs", "decode_tokens", "keys", "window", "sink", "seed", "kv_budget")


def assemble(runs: list[dict], grid: dict, gates: dict, policies: list[str], records: dict) -> dict:
    """The JSON result: its runs, grid and gates, one summary table per task, the checks, and every
    sequence's record (what the matched baselines held, each answer), from which the tables pool."""
    return {"runs": runs, "grid": grid, "gates": gates, "policies": policies,
            "perplexity": summarize(records["perplexity"], policies, metrics=True),
            "decode": summarize(records["decode"], policies, metrics=True),
            "passkey": summarize_passkey(records["passkey"], policies),
            "multikey": summarize_passkey(records["multikey"], policies),
            "checks": records["checks"], "sequences": {k: records[k] for k in TASKS}}


def emit(result: dict, out: str | None, plot_path: str | None) -> None:
    print(report(result))
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
        say(f"wrote {out}")
    plot_path = plot_path or (str(Path(out).with_suffix(".png")) if out else None)
    if plot_path:
        plot(result, plot_path)


def merge(paths: list[str], out: str | None, plot_path: str | None) -> None:
    """One result from runs of parts of a grid (say one length each, as a CPU session allows): their
    sequences pooled into the tables exactly as one run of the whole grid would pool them."""
    pieces = []
    for path in paths:
        try:
            pieces.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise EvalError(f"cannot read {path}: {e}")
        if "runs" not in pieces[-1] or "sequences" not in pieces[-1]:
            raise EvalError(f"{path} is not a result of this eval.py (written with --out)")
    first = pieces[0]
    # A piece from before a setting existed (keys) has None there and agrees with any piece.
    shared = lambda piece: {**{k: piece["runs"][0][k] for k in SHARED_RUN}, **{k: piece["grid"].get(k) for k in SHARED_GRID}}
    for path, piece in zip(paths[1:], pieces[1:]):
        for key, a in shared(first).items():
            if None not in (a, shared(piece)[key]) and shared(piece)[key] != a:
                raise EvalError(f"{path} has {key} {shared(piece)[key]!r}, {paths[0]} has {a!r}: "
                                f"pieces of one grid share it")
        if piece["gates"] != first["gates"]:
            raise EvalError(f"{path} evaluated other gates than {paths[0]}: {sorted(piece['gates'])} "
                            f"vs {sorted(first['gates'])}")
    cell = {"perplexity": ("length", "doc"), "decode": ("length", "doc"), "passkey": ("length", "depth", "trial"),
            "multikey": ("length", "depth", "trial")}
    records, seen = {k: [] for k in TASKS}, {}
    for path, piece in zip(paths, pieces):
        for task in TASKS:
            for r in piece["sequences"].get(task, []):
                key = (task, r["policy"]) + tuple(r[f] for f in cell[task])
                if key in seen:
                    raise EvalError(f"{path} and {seen[key]} both ran {task} {dict(zip(cell[task], key[2:]))} "
                                    f"with {r['policy']}: pieces must not overlap")
                seen[key] = path
                records[task].append(r)
    records["checks"] = [c for piece in pieces for c in piece["checks"]]
    union = lambda key: sorted({x for piece in pieces for x in piece["grid"][key]})
    grid = {**first["grid"], "lengths": union("lengths"), "passkey_lengths": union("passkey_lengths"),
            "depths": union("depths"), "trials": max(piece["grid"]["trials"] for piece in pieces),
            "budgets": sorted({b for piece in pieces for b in piece["grid"].get("budgets", [])}),
            "select_budgets": sorted({n for piece in pieces for n in piece["grid"].get("select_budgets", [])}),
            "families": [f for f in FAMILIES if any(f in piece["grid"].get("families", FAMILIES) for piece in pieces)],
            "keys": next((piece["grid"]["keys"] for piece in pieces if piece["grid"].get("keys")), None)}
    policies = list(dict.fromkeys(p for piece in pieces for p in piece["policies"]))
    emit(assemble([r for piece in pieces for r in piece["runs"]], grid, first["gates"], policies, records),
         out, plot_path)


# The options that define a grid to run; --merge takes the grid from its files and refuses them.
GRID_OPTIONS = ("checkpoint", "gate", "quick", "lengths", "docs", "decode_tokens", "passkey_lengths", "depths",
                "trials", "keys", "window", "kv_budget", "budgets", "policies", "select_budgets")


def main(merge_paths: list[str] | None, **kwargs) -> None:
    try:
        if merge_paths:
            given = [f"--{k.replace('_', '-')}" for k in GRID_OPTIONS if kwargs[k] not in (None, False, [])]
            if given:
                raise EvalError(f"--merge takes the grid from its files; drop {' '.join(given)}")
            merge(merge_paths, kwargs["out"], kwargs["plot_path"])
        else:
            run(**kwargs)
    except ValueError as e:   # CheckpointError, GateError, DataError, EvalError and a bad --backend: one line each
        print(f"eval.py: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="Hugging Face Llama directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default="data/heldout", help="held-out documents (default: data/heldout, see data.py)")
    parser.add_argument("--gates-dir", default="gates",
                        help="every setting of every .safetensors/.pt gate file here is a policy (default: gates)")
    parser.add_argument("--gate", action="append", default=[],
                        help="another gate file to evaluate: every setting of FILE, or FILE@SETTING's one (repeatable)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a quick look, not a result: one gate setting (the first --gate, else the default setting "
                             f"of the first file under --gates-dir) and the grid {QUICK} instead of {FULL}")
    parser.add_argument("--lengths", type=int, nargs="*", help="perplexity / decode lengths in tokens")
    parser.add_argument("--docs", type=int, help="held-out documents per length")
    parser.add_argument("--decode-tokens", type=int, help="tokens decoded one by one in the equal-budget table (0: skip it)")
    parser.add_argument("--passkey-lengths", type=int, nargs="*", help="passkey prompt lengths (none: skip passkey)")
    parser.add_argument("--depths", type=float, nargs="*", help="needle depths in [0, 1]")
    parser.add_argument("--trials", type=int, help="passkey prompts per (length, depth)")
    parser.add_argument("--keys", type=int, help="keys planted in each multi-key prompt, one asked for (0: skip the task)")
    parser.add_argument("--window", type=int, help="local window W for every policy (default: the first gate's, else 256)")
    parser.add_argument("--kv-budget", help="the gate rows' page pool, as generate.py's --kv-budget (default: each gate's own)")
    parser.add_argument("--budgets", type=float, nargs="*", metavar="PCT",
                        help="budgets (%% of the dense cache) of the composition rows: each gate + lowest-g, each gate + "
                             "snapkv, snapkv alone (default: 15 25 40; --quick: none)")
    parser.add_argument("--select-budgets", type=int, nargs="*", metavar="N",
                        help="tokens a decode step attends per KV head in the selection rows: each gate + select, "
                             "quest alone (default: 384 512 1024; --quick: none)")
    parser.add_argument("--policies", nargs="*", choices=FAMILIES, metavar="FAMILY",
                        help=f"run only these rows, of {', '.join(FAMILIES)} (default: all), e.g. a new gate alone "
                             f"(--policies gate) to set beside an earlier run's baselines; perplexity and decode "
                             f"need dense, random and snapkv need gate")
    parser.add_argument("--sink", type=int, default=4, help="sink tokens of the sink:N baseline (default 4)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on a CPU; on CUDA the checkpoint's own, else bfloat16 (model.default_dtype)")
    parser.add_argument("--backend", default="auto", help="attention backend of the write-gated cache (auto, torch, triton)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="passkey keys and the matched random shuffles")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--plot", dest="plot_path", help="write the PNG plot here (default: beside --out)")
    parser.add_argument("--merge", dest="merge_paths", nargs="+", metavar="JSON",
                        help="instead of running: pool the results (--out files) of runs of parts of one grid, "
                             "e.g. one length each, into its tables")
    main(**vars(parser.parse_args()))
