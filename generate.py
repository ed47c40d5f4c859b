"""Generate text with a Llama or Qwen3 checkpoint: prefill the prompt, then decode one token at a time.

    python generate.py --prompt "What is the capital of France?"            # the embedded SmolLM2-135M, its gate
    python generate.py --prompt-file prompts/with-statement.md --gate dense  # the same with the dense cache
    python generate.py --checkpoint checkpoints/meta-llama/Llama-3.2-1B-Instruct --compile
    python generate.py --interactive                                          # a chat that keeps its cache
    torchrun --standalone --nproc-per-node 2 generate.py --checkpoint DIR --device cuda   # one model, 2 GPUs

The completion streams to stdout as it is decoded; statistics go to stderr. Every model call appends
tokens to the caches (a prompt in chunks of --prefill-chunk, a decode step, a new turn of a chat); the
decode step has no host sync, so `--compile` can hand it whole to torch.compile (CUDA graphs on a GPU).
"""
import argparse
import contextlib
import json
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import Tensor

from cache import Eviction, one_row, summed_counts
from convert_gguf import checkpoint_or_default
from gate import DEFAULT_PAGE_SIZE, EVICTION, admission_stats, build_caches, dense_bytes, format_stats
from model import DTYPES, CheckpointError, TensorParallel, Transformer, default_dtype, start_tensor_parallel
from tokenizer import StreamDecoder, Tokenizer

DEFAULT_PROMPT = "What is the capital of France?"
# A prompt longer than this is prefilled in chunks of it: the activations of one chunk at a time, same tokens.
DEFAULT_PREFILL_CHUNK = 2048
# --interactive: the positions a conversation may take, unless --max-seq-len says otherwise.
DEFAULT_CHAT_LEN = 4096
# The embedded model runs with its trained gate unless --gate says otherwise (dense: the dense cache): the
# lambda 0.16 gate, at the file's default setting (20% admitted).
DEFAULT_GATE = Path(__file__).resolve().parent / "gates" / "smollm2-135m-instruct-lambda0.16.safetensors"


class BadInput(ValueError):
    """Input the user can fix; the CLI prints the one-line message and exits with code 2."""


def load(checkpoint: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
         tp: TensorParallel = TensorParallel(), compiled: bool = False) -> tuple[Transformer, Tokenizer]:
    """The model (under tensor parallelism this rank's share) and tokenizer of a Hugging Face checkpoint directory,
    its weights laid out for a compiled decode step or an eager one (Transformer.lay_out_for_decode)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} is not a directory")
    try:
        model = Transformer.from_pretrained(checkpoint, dtype=dtype, device=device, tp=tp, compiled=compiled)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {checkpoint} has unreadable weights: {e}") from None
    return model, Tokenizer(checkpoint)


def setup_caches(model: Transformer, max_seq_len: int, batch_size: int = 1, gate: str | None = None,
                 **gated) -> tuple[int, Eviction | None]:
    """gate.build_caches for the command line: a bad option is BadInput, and the write-gated settings are said on
    stderr. Returns the bytes the caches allocated, and the Eviction to call between decode steps (None for the
    dense cache). gate None: the dense cache; else a --gate spec, and `gated` holds setup_write_gated's options
    (window, threshold, global_capacity, kv_budget, page_size, evict, backend, select_budget)."""
    try:
        built = build_caches(model, max_seq_len, batch_size=batch_size, gate=gate, **gated)
    except ValueError as e:   # a bad spec or budget, a gate that does not fit, an unavailable backend
        raise BadInput(str(e)) from None
    if (setup := built.gated) is not None:
        print(f"write-gated KV: gate {setup.policy}, window {setup.window}, threshold {setup.threshold}, "
              f"global capacity {setup.capacity} tokens per head, pool {setup.pool_pages} pages of {setup.page_size} "
              f"tokens{' per rank' if model.tp.world > 1 else ''} ({setup.budget}), evict {setup.evict}, "
              f"attention backend {setup.backend}"
              + (f", select {setup.select_budget} tokens a step ({setup.select_pages} pages and the window)"
                 if setup.select_budget is not None else ""), file=sys.stderr)
    return built.allocated, built.evictor


def sample(logits: Tensor, temperature: float, top_k: int, top_p: float, seen: Tensor | None = None,
           repetition_penalty: float = 1.0) -> Tensor:
    """Next tokens (B, 1) from logits (B, vocab), with no host sync. Temperature 0 is greedy. seen (B, vocab)
    marks the tokens of each row's context so far, whose logits a repetition_penalty != 1 scales as
    transformers does (divided where positive, multiplied where negative), before the rest."""
    if seen is not None and repetition_penalty != 1:
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty),
                             logits)
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        pivot = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]               # (B, 1)
        logits = logits.masked_fill(logits < pivot, float("-inf"))
    probs = torch.softmax(logits, dim=-1)                                                     # (B, vocab)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)                                # (B, vocab)
        # Keep the smallest set of likeliest tokens whose mass reaches top_p: drop those after it.
        sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p, 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # gpt-fast's trick: argmax(p / E) with E ~ Exp(1) draws from p (unnormalised is fine), and unlike
    # torch.multinomial it never syncs with the host.
    noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise).argmax(-1, keepdim=True)


def reset_caches(model: Transformer) -> None:
    """Empty every layer's cache for a new sequence (the dense cache needs nothing: it reads positions up to
    the query's only)."""
    for layer in model.layers:
        getattr(layer.attention.cache, "reset", lambda: None)()


def prefill(model: Transformer, tokens: Tensor, temperature: float, top_k: int, top_p: float,
            start: int = 0, chunk: int = 0, seen: Tensor | None = None, repetition_penalty: float = 1.0) -> Tensor:
    """Append the tokens (B, T) at positions start.. to the caches (start 0: a new sequence, the caches start
    afresh), `chunk` tokens per model call (0: all at once); returns the first new tokens (B, 1). Chunks bound
    the activations a long prompt needs at once and give the same tokens as one call."""
    if start == 0:   # a one-token chunk is a decode step, which never starts afresh itself
        reset_caches(model)
    T = tokens.shape[1]
    chunk = chunk or T
    for first in range(0, T, chunk):
        n = min(chunk, T - first)
        input_pos = torch.arange(start + first, start + first + n, device=tokens.device)          # (n,)
        hidden = model.body(tokens[:, first:first + n], input_pos)                                # (B, n, dim)
    logits = model.output(hidden[:, -1]).float()                                               # only one row of logits
    return sample(logits, temperature, top_k, top_p, seen, repetition_penalty)


def decode_one_token(model: Transformer, token: Tensor, input_pos: Tensor, temperature: float, top_k: int,
                     top_p: float, seen: Tensor | None = None, repetition_penalty: float = 1.0) -> Tensor:
    """One decode step: token (B, 1) at position input_pos, (1,) for every row or (B, 1) -> the next tokens (B, 1).
    seen: see sample (the caller marks each new token in it, outside the step)."""
    logits = model(token, input_pos)[:, -1]                                                   # (B, vocab)
    return sample(logits, temperature, top_k, top_p, seen, repetition_penalty)


def compile_decode_step(device: str):
    # On CUDA "reduce-overhead" captures the step in a CUDA graph, which pays off at one token a step.
    mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
    step = torch.compile(decode_one_token, fullgraph=True, mode=mode)
    # Only the sizes the caches mark dynamic are symbolic: another batch size compiles a step of its own
    # instead of making the batch symbolic, which the blocks' nested_compile_region fails on (KeyError).
    step = torch._dynamo.config.patch(automatic_dynamic_shapes=False)(step)
    # Inductor's generated Python checks the size and stride of every tensor a block's code receives and
    # every extern kernel's output: about 35 checks a layer in the gated step, 1.3 ms of a 30 ms CPU step
    # (BENCHMARKS.md). Dynamo's guards already check the step's inputs; the checks inside it only test
    # Inductor against itself (vLLM turns them off too). The runtime checks of data-dependent sizes
    # (torch._check) stay. Only the switches this torch has: an unknown one fails the first call.
    checks = {name: False for name in ("size_asserts", "alignment_asserts") if hasattr(torch._inductor.config, name)}
    return torch._inductor.config.patch(checks)(step)


@dataclass
class RunStats:
    """What a generate_rows call did."""
    prompt_tokens: int     # over all prompts
    prefill_s: float       # every prompt's prefill, those of prompts that took over a finished row included
    decode_steps: int      # decode steps (each row's tokens fed back after its prompt; the first comes from the prefill)
    decode_s: float        # the decode steps alone
    rows: int = 1          # the caches' batch rows: each step makes one token per row
    decoded: int = 0       # tokens the decode steps made for a row's current prompt (a finished row's are not)
    # Write-gated caches: each layer's counts (cache.summed_counts) over every prompt, each taken when it finished,
    # before its row took the next prompt (on the device; None with dense caches).
    counts: list[dict[str, Tensor]] | None = None


class Batch:
    """The rows of generate_rows' caches and the prompts they take in turn: which prompt each row decodes, the
    prompts still waiting, each prompt's new tokens so far, and what the run has counted. fill gives a row its
    next prompt; record takes a prompt's next token."""

    def __init__(self, model: Transformer, prompts: list[list[int]], rows: int, max_new_tokens: int, sampling: dict,
                 history, stop_ids, on_token, on_done, start: int, prefill_chunk: int, prefill_step):
        device = model.tok_embeddings.weight.device
        self.model, self.prompts, self.max_new_tokens, self.sampling = model, prompts, max_new_tokens, sampling
        self.history, self.stop_ids, self.on_token, self.on_done = history, stop_ids, on_token, on_done
        self.start, self.prefill_chunk, self.prefill_step = start, prefill_chunk, prefill_step
        self.caches = [layer.attention.cache for layer in model.layers]
        self.seen = None
        if sampling["repetition_penalty"] != 1:   # each row's context so far, on the device: no host sync
            self.seen = torch.zeros(rows, model.config.vocab_size, dtype=torch.bool, device=device)     # (rows, vocab)
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)                            # (rows, 1)
        self.input_pos = torch.zeros(rows, 1, dtype=torch.long, device=device)                        # (rows, 1)
        self.new = [[] for _ in prompts]
        self.occupant = [-1] * rows      # the prompt each row decodes; -1 once none is left for it
        self.retired = []                # rows left without a prompt since the last decode step
        self.waiting = iter(range(len(prompts)))
        self.prefill_s = 0.0
        self.counts = None               # RunStats.counts

    def count_finished(self, row: int) -> None:
        """Add the counts of the prompt that just finished in `row` (of the caches as they are now) to the run's."""
        if hasattr(self.caches[0], "counts"):
            finished = summed_counts(self.caches, row)
            self.counts = finished if self.counts is None else [
                {name: n + earlier[name] for name, n in layer.items()} for layer, earlier in zip(finished, self.counts)]

    def record(self, index: int, next_id: int) -> bool:
        """Take the next token of prompt `index`; True when the prompt is finished."""
        finished = next_id in self.stop_ids
        if not finished:
            self.new[index].append(next_id)
            if self.on_token is not None:
                self.on_token(index, next_id)
            finished = len(self.new[index]) == self.max_new_tokens
        if finished and self.on_done is not None:
            self.on_done(index, self.new[index])
        return finished

    def fill(self, row: int) -> None:
        """Give the row the next waiting prompt that its prefill does not already finish; else retire it."""
        device = self.token.device
        if self.occupant[row] >= 0:
            self.count_finished(row)
        if device.type == "cuda":
            torch.cuda.synchronize(device)   # so that the prefill's time is its own
        t0 = time.perf_counter()
        with one_row(self.caches, row) if len(self.occupant) > 1 else contextlib.nullcontext():
            for index in self.waiting:
                ids = self.prompts[index]
                if self.seen is not None:
                    self.seen[row] = False
                    self.seen[row, torch.tensor([*self.history, *ids], device=device)] = True
                seen = None if self.seen is None else self.seen[row:row + 1]                         # (1, vocab)
                first = self.prefill_step(self.model, torch.tensor([ids], device=device), **self.sampling,
                                          start=self.start, chunk=self.prefill_chunk, seen=seen)             # (1, 1)
                if not self.record(index, int(first)):
                    self.occupant[row] = index
                    self.token[row], self.input_pos[row] = first[0], self.start + len(ids)
                    break
                self.count_finished(0)    # the row alone is row 0 here
            else:
                self.occupant[row] = -1      # nothing left for it
                self.retired.append(row)
        self.prefill_s += time.perf_counter() - t0


@torch.no_grad()
def generate_rows(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, rows: int = 0,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                  history: list[int] = (), stop_ids=frozenset(), on_token=None, on_done=None, start: int = 0,
                  prefill_chunk: int = 0, prefill_step=prefill, decode_step=decode_one_token,
                  evictor=None) -> tuple[list[list[int]], RunStats]:
    """New tokens after each prompt, each until its own stop token (not returned) or max_new_tokens, decoded
    `rows` at a time (0: all at once) through caches of that many batch rows, each of which holds
    max(len(prompt)) + max_new_tokens - 1 positions. A prompt is appended alone to its row (cache.one_row), so
    prompts of any lengths share a batch and no row sees another's padding; then every step decodes one token
    per row, each at its own position. When a prompt is finished its row takes the next waiting prompt (that
    row's cache starts afresh), so no row decodes for nothing while prompts wait. A single prompt may go at
    positions start.. (0: a new sequence, the caches start afresh; else the caches hold positions 0..start-1, a
    conversation's earlier turns). On return the caches of a single prompt hold it and every new token but its
    last (what a conversation's next turn needs). on_token(index, id) is called as each token is known (to
    stream), index being the prompt's place in `prompts`; on_done(index, ids) when it is finished.
    repetition_penalty (transformers' semantics) covers each prompt, its new tokens and `history`, the
    conversation the caches already hold.
    prefill_step and decode_step are prefill and decode_one_token or their compiled versions; evictor, a
    cache.Eviction, runs between decode steps."""
    rows = rows or len(prompts)
    if not 1 <= rows <= len(prompts):
        raise ValueError(f"{len(prompts)} prompts cannot fill {rows} rows")
    if start and len(prompts) > 1:
        raise ValueError("a batch of prompts starts at position 0")
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    batch = Batch(model, prompts, rows, max_new_tokens, sampling, history, stop_ids, on_token, on_done, start,
                  prefill_chunk, prefill_step)
    for row in range(rows):
        batch.fill(row)
    steps = decoded = 0
    decode_s = 0.0
    while max(batch.occupant) >= 0:
        t0 = time.perf_counter()
        for row in batch.retired:
            # A row with no prompt left rides along until the others finish, from position 0 of its emptied
            # cache row, so that its positions stay within the caches however long the others go on.
            with one_row(batch.caches, row):
                reset_caches(model)
            batch.input_pos[row] = 0
        batch.retired.clear()
        if batch.seen is not None:
            batch.seen.scatter_(1, batch.token, True)
        # Cloned because a CUDA-graph replay overwrites its output buffer on the next replay. Finished rows
        # go on decoding (their tokens unused), so that the step keeps its shapes.
        batch.token = decode_step(model, batch.token, batch.input_pos, temperature, top_k, top_p, seen=batch.seen,
                                  repetition_penalty=repetition_penalty).clone()                      # (rows, 1)
        batch.input_pos += 1
        steps += 1
        if evictor is not None:
            evictor.after_step(steps)
        next_ids = batch.token[:, 0].tolist()   # the one host sync per step: streaming and stopping need the ids
        decode_s += time.perf_counter() - t0
        for row, next_id in enumerate(next_ids):
            if batch.occupant[row] >= 0:
                decoded += 1
                if batch.record(batch.occupant[row], next_id):
                    batch.fill(row)
    return batch.new, RunStats(sum(map(len, prompts)), batch.prefill_s, steps, decode_s, rows, decoded, batch.counts)


def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *, on_token=None,
             **options) -> tuple[list[int], RunStats]:
    """generate_rows for one prompt: its new tokens; on_token(id) streams them."""
    stream = None if on_token is None else lambda row, i: on_token(i)
    new, timings = generate_rows(model, [prompt_ids], max_new_tokens, on_token=stream, **options)
    return new[0], timings


# Stands in for the last reply when the chat template renders the next turn, to find the text that follows a reply.
REPLY_MARK = "\ue000wgkv reply\ue000"


def turn_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int] | None:
    """The ids the chat template puts after the last assistant reply of `messages`: the end of that reply, the
    user turn after it and the next assistant header. None where the template does not show the reply verbatim."""
    rendered = tokenizer.render_chat(messages[:-2] + [{"role": "assistant", "content": REPLY_MARK}, messages[-1]])
    if rendered.count(REPLY_MARK) != 1:
        return None
    return tokenizer.encode(rendered.split(REPLY_MARK)[1], add_special_tokens=False)


def chat(model: Transformer, tokenizer: Tokenizer, lines, max_seq_len: int, max_new_tokens: int, *,
         out=sys.stdout, **generating) -> list[int]:
    """--interactive: each line of `lines` is a user turn; each reply streams to `out`, then a newline.

    The conversation is one token sequence, kept in the caches between turns: each reply as the model wrote
    it (never re-tokenized from its text), then what the chat template puts after a reply (turn_ids), so a
    turn prefills only those tokens. (A template that would rewrite earlier replies, as Qwen3's strips their
    <think> blocks, sees them as the model wrote them.) Where the template does not show the marker once, the
    whole conversation is rendered and prefilled again, and stderr says so. A turn that would outgrow max_seq_len
    raises BadInput; a reply that reaches it is cut there, and stderr says so. Returns the conversation's ids."""
    messages, conversation, in_cache = [], [], 0
    for turn, line in enumerate(lines, 1):
        text = line.rstrip("\n")
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        added = turn_ids(tokenizer, messages) if conversation else None
        if added is None:
            if conversation:
                print(f"turn {turn}: the chat template rewrites earlier replies; prefilling the whole conversation "
                      f"again", file=sys.stderr)
            conversation, in_cache = tokenizer.encode_chat(messages), 0
        else:
            conversation = conversation + added
        room = max_seq_len - len(conversation)
        if room < 1:
            raise BadInput(f"turn {turn}: the conversation is {len(conversation)} tokens, which leaves no room for "
                           f"a reply within --max-seq-len {max_seq_len}; start again with a larger --max-seq-len")
        if room < max_new_tokens:
            print(f"turn {turn}: --max-seq-len {max_seq_len} leaves room for {room} new tokens", file=sys.stderr)
        stream = StreamDecoder(tokenizer)
        new, t = generate(model, conversation[in_cache:], min(max_new_tokens, room), start=in_cache,
                          history=conversation[:in_cache], stop_ids=tokenizer.stop_ids,
                          on_token=lambda i: print(stream.push(i), end="", file=out, flush=True), **generating)
        print(stream.flush(), file=out, flush=True)
        prefilled = len(conversation) - in_cache
        in_cache = len(conversation) + t.decode_steps     # the last new token is cached only if it was fed back
        conversation = conversation + new
        messages.append({"role": "assistant", "content": tokenizer.decode(new)})
        decode = f"{t.decode_steps / t.decode_s:.1f} tok/s" if t.decode_steps else "no steps"
        print(f"turn {turn}: prefilled {prefilled} new tokens ({in_cache} cached) in {t.prefill_s:.3f} s "
              f"| {len(new)} new tokens | decode: {decode}", file=sys.stderr)
    return conversation


# Tensor parallelism (torchrun): every rank runs this file; rank 0 reads the input and prints, the others follow.

def from_rank0(tp: TensorParallel, read, *args):
    """read(*args) on rank 0 alone, its result handed to every rank: input (prompts, stdin, a seed) is read once.
    A BadInput or CheckpointError there is raised on every rank, so that all of them exit 2."""
    if tp.world == 1:
        return read(*args)
    box = [None]
    if tp.rank == 0:
        try:
            box = [(read(*args), None)]
        except (BadInput, CheckpointError) as e:
            box = [(None, str(e))]
    dist.broadcast_object_list(box, src=0, group=tp.group)
    value, error = box[0]
    if error is not None:
        raise BadInput(error)
    return value


def rank0_lines(tp: TensorParallel, lines):
    """The lines rank 0 reads (stdin for --interactive), each handed to every rank as it comes."""
    lines = iter(lines)
    while (line := from_rank0(tp, next, lines, None)) is not None:
        yield line


def over_ranks(tp: TensorParallel, value) -> list:
    """value (a host object) of every rank, in rank order; [value] in one process. Every rank calls it."""
    if tp.world == 1:
        return [value]
    values = [None] * tp.world
    dist.all_gather_object(values, value, group=tp.group)
    return values


def memory_said(model: Transformer, kv_bytes: int) -> str:
    """The statistics line's KV bytes and peak memory: under tensor parallelism summed over the ranks, then each's."""
    ranks = over_ranks(model.tp, (kv_bytes, peak_memory(model.output.weight.device)))
    if len(ranks) == 1:
        return f"KV cache: {kv_bytes:,} bytes | peak memory: {ranks[0][1]}"
    return (f"KV cache: {sum(b for b, _ in ranks):,} bytes over {len(ranks)} ranks | "
            + ", ".join(f"rank {r}: KV cache {b:,} bytes, peak memory {m}" for r, (b, m) in enumerate(ranks)))


def gated_said(model: Transformer, dense: int, evictor: Eviction | None, counts: list[dict] | None = None) -> str:
    """format_stats of the write-gated caches (counts: RunStats.counts, else what they hold now); dense: a dense
    cache's bytes. Under tensor parallelism every rank's together (counts, pools and bytes summed), then a line per
    rank (each pool evicts among its own heads)."""
    local = summed_counts([layer.attention.cache for layer in model.layers]) if counts is None else counts
    mine = admission_stats(model, local)
    ranks = over_ranks(model.tp, ([{k: int(n) for k, n in layer.items()} for layer in local], mine,
                                  evictor.passes if evictor else 0))
    if len(ranks) == 1:
        return format_stats(mine, dense, evictor)
    summed = [{k: torch.tensor(sum(r[0][i][k] for r in ranks)) for k in layer} for i, layer in enumerate(local)]
    total = admission_stats(model, summed) | {k: sum(r[1][k] for r in ranks)
                                              for k in ("bytes_allocated", "pages_in_use", "pool_pages")}
    return "\n".join([format_stats(total, dense * len(ranks), evictor), *(
        f"rank {r}: admitted {s['admitted_fraction']:.1%}, KV bytes in use {s['bytes_in_use'] / 2**20:.2f} MiB, "
        f"allocated {s['bytes_allocated'] / 2**20:.2f} MiB, pool pages in use {s['pages_in_use']} of "
        f"{s['pool_pages']}, {s['evicted']} evicted by {passes} passes" for r, (_, s, passes) in enumerate(ranks))])


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated on {device}"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"   # ru_maxrss is in KiB


def dtype_said(model: Transformer) -> str:
    """The dtype the run took (--dtype, else model.default_dtype's choice), for the statistics line."""
    return "dtype: " + str(model.output.weight.dtype).removeprefix("torch.")


def read_prompts(path: str) -> list[str]:
    """--prompts-file: one prompt per line, or JSON Lines of objects with a "prompt" string."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read --prompts-file {path}: {e}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise BadInput(f"--prompts-file {path}: line {n} is empty (one prompt per line)")
        if line.lstrip().startswith("{"):
            try:
                line = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError):
                raise BadInput(f"--prompts-file {path}: line {n} is not a JSON object with a \"prompt\" string") from None
            if not isinstance(line, str) or not line.strip():
                raise BadInput(f"--prompts-file {path}: line {n} has no prompt text")
        prompts.append(line)
    if not prompts:
        raise BadInput(f"--prompts-file {path} is empty")
    return prompts


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on the device."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def sampling_settings(checkpoint: Path, **flags) -> dict:
    """temperature, top_k, top_p and repetition_penalty: each flag that was given (not None), else the
    checkpoint's generation_config.json as transformers reads it (do_sample false or absent: greedy; do_sample
    with no top_k: 50), else greedy with no penalty."""
    path = Path(checkpoint) / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    do_sample = bool(config.get("do_sample"))
    defaults = dict(temperature=config.get("temperature", 1.0) if do_sample else 0.0,
                    top_k=config.get("top_k", 50) if do_sample else 0,
                    top_p=config.get("top_p", 1.0) if do_sample else 1.0,
                    repetition_penalty=config.get("repetition_penalty", 1.0))
    return {name: flags[name] if flags.get(name) is not None else value for name, value in defaults.items()}


def say_sampling(generating: dict) -> None:
    """The sampling settings on stderr, said once the input is known good (bad input gets one line, the error's)."""
    print("sampling: " + ("greedy" if generating["temperature"] == 0 else
                          "temperature {temperature}, top-k {top_k}, top-p {top_p}".format(**generating))
          + f", repetition penalty {generating['repetition_penalty']}", file=sys.stderr)


def validate(*, device: str, dtype: str, max_new_tokens: int, temperature: float | None, top_k: int | None,
             top_p: float | None, repetition_penalty: float | None, max_seq_len: int | None, prefill_chunk: int,
             batch_size: int, prompt: str | list[str] | None, prompt_file: str | None, prompts_file: str | None,
             no_chat: bool, interactive: bool) -> None:
    """Every check of the arguments that needs neither a file nor the model: the first bad one raises BadInput,
    one line naming the flag. (A flag None was not given: its default comes later.)"""
    if device not in ("cpu", "cuda"):
        raise BadInput(f"unknown device {device!r} (supported: cpu, cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda, but CUDA is not available on this machine")
    if dtype is not None and dtype not in DTYPES:
        raise BadInput(f"unknown dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    for flag, value, within, rule in (
            ("--max-new-tokens", max_new_tokens, lambda v: v >= 1, ">= 1"),
            ("--temperature", temperature, lambda v: v >= 0, ">= 0 (0 is greedy)"),
            ("--top-k", top_k, lambda v: v >= 0, ">= 0 (0 keeps all tokens)"),
            ("--top-p", top_p, lambda v: 0 < v <= 1, "in (0, 1] (1 keeps all tokens)"),
            ("--repetition-penalty", repetition_penalty, lambda v: v > 0, "> 0 (1 is none)"),
            ("--max-seq-len", max_seq_len, lambda v: v >= 1, ">= 1"),
            ("--prefill-chunk", prefill_chunk, lambda v: v >= 0, ">= 0 (0: all at once)"),
            ("--batch-size", batch_size, lambda v: v >= 1, ">= 1")):
        if value is not None and not within(value):   # not `v < low`, which a NaN passes
            raise BadInput(f"need {flag} {rule}, got {value}")
    if interactive and (prompt is not None or prompt_file is not None or prompts_file is not None or no_chat):
        raise BadInput("--interactive reads the turns from stdin: it takes no --prompt, --prompt-file, "
                       "--prompts-file or --no-chat")
    for i, text in enumerate(prompt if isinstance(prompt, list) else []):
        if not text.strip():
            raise BadInput("the prompt is empty" if len(prompt) == 1 else f"the prompt of --prompt number {i + 1} is empty")


def read_input(prompt: str | list[str] | None, prompt_file: str | None, prompts_file: str | None,
               jsonl: bool) -> tuple[str, list[str] | None]:
    """The prompt (default: DEFAULT_PROMPT) and, for several (--prompt more than once, --prompts-file, --jsonl),
    their texts, to be decoded in batches (else None); a file that cannot be read, or is empty, is BadInput."""
    texts = None
    if isinstance(prompt, list):
        texts, prompt = (prompt, None) if len(prompt) > 1 or jsonl else (None, prompt[0])
    if prompts_file is not None:
        texts = read_prompts(prompts_file)
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"cannot read --prompt-file {prompt_file}: {e}") from None
        if not prompt.strip():
            raise BadInput(f"--prompt-file {prompt_file} is empty")
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    if not prompt.strip():
        raise BadInput("the prompt is empty")
    if texts is None and jsonl:   # a JSON line for one prompt too
        texts = [prompt]
    return prompt, texts


def run_chat(model: Transformer, tokenizer: Tokenizer, checkpoint, max_seq_len: int | None, max_new_tokens: int,
             seed: int | None, cache_options: dict, **generating) -> None:
    """--interactive: a conversation on stdin and stdout (chat), then the cache's statistics on stderr."""
    if tokenizer.chat_template is None:
        raise BadInput(f"--interactive needs a chat template, and {checkpoint} has none")
    max_seq_len = max_seq_len or DEFAULT_CHAT_LEN
    _, evictor = setup_caches(model, max_seq_len, **cache_options)
    if seed is not None:
        torch.manual_seed(seed)
    say_sampling(generating)
    # out given here, not chat's default (bound at import): under torchrun the other ranks' stdout is redirected.
    chat(model, tokenizer, rank0_lines(model.tp, sys.stdin), max_seq_len, max_new_tokens, evictor=evictor,
         out=sys.stdout, **generating)
    if cache_options["gate"] is not None:
        print(gated_said(model, dense_bytes(model, max_seq_len), evictor), file=sys.stderr)


def batches(model: Transformer, tokenizer: Tokenizer, texts: list[str], batch_size: int, max_seq_len: int | None,
            max_new_tokens: int, jsonl: bool, no_chat: bool, seed: int | None, cache_options: dict,
            **generating) -> None:
    """Several prompts through batch_size cache rows, a finished prompt's row taking the next: each completion
    printed as it finishes (with jsonl, a JSON object with its 0-based index, prompt and completion; else
    "index: completion"), then one stats line. max_seq_len None: the longest prompt's and max_new_tokens."""
    device = model.output.weight.device
    prompts = [tokenizer.encode_prompt(text, chat=not no_chat) for text in texts]
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    max_seq_len = max_seq_len or len(prompts[longest]) + max_new_tokens
    if len(prompts[longest]) + max_new_tokens > max_seq_len:
        raise BadInput(f"prompt {longest} is {len(prompts[longest])} tokens, which leaves no room for "
                       f"--max-new-tokens {max_new_tokens} within --max-seq-len {max_seq_len}")
    rows = min(batch_size, len(prompts))
    gate = cache_options.get("gate")
    if gate is None and dense_bytes(model, max_seq_len, rows) > available_memory(device):
        raise BadInput(f"a batch of {rows} rows of {max_seq_len} positions needs "
                       f"{dense_bytes(model, max_seq_len, rows) / 2**30:.1f} GiB of KV cache, more than the "
                       f"{available_memory(device) / 2**30:.1f} GiB free: lower --batch-size or --max-seq-len")
    if seed is not None:
        torch.manual_seed(seed)
    say_sampling(generating)
    try:
        kv_bytes, evictor = setup_caches(model, max_seq_len, batch_size=rows, **cache_options)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        raise BadInput(f"a batch of {rows} rows of {max_seq_len} positions does not fit in memory "
                       f"({str(e).splitlines()[0]}): lower --batch-size or --max-seq-len") from None

    def done(index: int, ids: list[int]) -> None:
        completion = tokenizer.decode(ids)
        line = json.dumps({"index": index, "prompt": texts[index], "completion": completion}, ensure_ascii=False) \
            if jsonl else f"{index}: {completion}"
        print(line, flush=True)

    new, t = generate_rows(model, prompts, max_new_tokens, rows=rows, stop_ids=tokenizer.stop_ids, on_done=done,
                           evictor=evictor, **generating)
    decode = (f"{t.decoded / t.decode_s:.1f} tok/s over {t.rows} rows ({t.decoded} tokens in {t.decode_steps} steps)"
              if t.decode_steps else "no steps")
    print(f"{len(prompts)} prompts: prompt tokens {t.prompt_tokens} | prefill: {t.prefill_s:.3f} s | new tokens: "
          f"{sum(map(len, new))} | decode: {decode} | {memory_said(model, kv_bytes)} | {dtype_said(model)}", file=sys.stderr)
    if gate is not None:
        print(f"all {len(prompts)} prompts, each as it finished: " + gated_said(
            model, dense_bytes(model, max_seq_len, rows), evictor, t.counts), file=sys.stderr)


def run_prompt(model: Transformer, tokenizer: Tokenizer, prompt: str, no_chat: bool, max_seq_len: int | None,
               max_new_tokens: int, seed: int | None, compile: bool, cache_options: dict, **generating) -> None:
    """One prompt: its completion streamed to stdout as it is decoded, then the statistics on stderr. With compile,
    a throwaway run first compiles the decode step, so that compilation is timed apart."""
    prompt_ids = tokenizer.encode_prompt(prompt, chat=not no_chat)
    T = len(prompt_ids)
    max_seq_len = max_seq_len or T + max_new_tokens
    if T >= max_seq_len:
        raise BadInput(f"the prompt is {T} tokens, which leaves no room to generate within --max-seq-len {max_seq_len}")
    if T + max_new_tokens > max_seq_len:
        max_new_tokens = max_seq_len - T
        print(f"--max-seq-len {max_seq_len} leaves room for {max_new_tokens} new tokens", file=sys.stderr)
    kv_bytes, evictor = setup_caches(model, max_seq_len, **cache_options)
    say_sampling(generating)
    if compile:
        # The same prompt (and on a GPU the CUDA graph's recording); the real run's prefill starts the caches afresh.
        t0 = time.perf_counter()
        generate(model, prompt_ids, min(3, max_new_tokens), **generating)
        print(f"compile and warm-up: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if seed is not None:   # after the warm-up, so that --compile draws the same samples as eager
        torch.manual_seed(seed)
    stream = StreamDecoder(tokenizer)
    new, t = generate(model, prompt_ids, max_new_tokens, stop_ids=tokenizer.stop_ids, evictor=evictor,
                      on_token=lambda i: print(stream.push(i), end="", flush=True), **generating)
    print(stream.flush(), flush=True)

    decode = f"{t.decode_steps / t.decode_s:.1f} tok/s ({t.decode_steps} steps)" if t.decode_steps else "no steps"
    print(f"prompt tokens: {T} | prefill: {t.prefill_s:.3f} s, {T / t.prefill_s:.1f} tok/s | new tokens: {len(new)} "
          f"| decode: {decode} | {memory_said(model, kv_bytes)} | {dtype_said(model)}", file=sys.stderr)
    if cache_options["gate"] is not None:
        print(gated_said(model, dense_bytes(model, max_seq_len), evictor), file=sys.stderr)


def main(checkpoint: str | None = None, prompt: str | list[str] | None = None, prompt_file: str | None = None,
         prompts_file: str | None = None, batch_size: int = 8, jsonl: bool = False,
         no_chat: bool = False, max_new_tokens: int = 200, temperature: float | None = None, top_k: int | None = None,
         top_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None, device: str = "cpu", dtype: str | None = None,
         max_seq_len: int | None = None, compile: bool = False, gate: str | None = None, window: int | None = None,
         threshold: float | None = None, global_capacity: int | None = None, kv_budget: str | None = None,
         page_size: int = DEFAULT_PAGE_SIZE, evict: str = EVICTION[0], attn_backend: str = "auto",
         prefill_chunk: int = DEFAULT_PREFILL_CHUNK, interactive: bool = False, select_budget: int | None = None) -> None:
    validate(device=device, dtype=dtype, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
             top_p=top_p, repetition_penalty=repetition_penalty, max_seq_len=max_seq_len, prefill_chunk=prefill_chunk,
             batch_size=batch_size, prompt=prompt, prompt_file=prompt_file, prompts_file=prompts_file, no_chat=no_chat,
             interactive=interactive)
    tp, device = start_tensor_parallel(device)   # under torchrun: this process's rank, its share and device
    prompt, texts = from_rank0(tp, read_input, prompt, prompt_file, prompts_file, jsonl)
    if checkpoint is None and gate is None:   # the embedded model runs with its gate
        gate = str(DEFAULT_GATE)
    gate = None if gate == "dense" else gate
    if gate is None and select_budget is not None:
        raise BadInput("--select-budget selects among a write-gated store's pages: not with --gate dense "
                       "(Quest alone is --gate full --select-budget N)")
    checkpoint = from_rank0(tp, checkpoint_or_default, checkpoint)   # converts the embedded one once
    dtype = dtype or default_dtype(checkpoint, device)   # said on the statistics line
    if seed is None and tp.world > 1:   # the ranks sample with one seed, so they draw the same tokens
        seed = from_rank0(tp, random.randrange, 2**31)

    model, tokenizer = load(checkpoint, device, DTYPES[dtype], tp, compiled=compile)
    sampling = sampling_settings(checkpoint, temperature=temperature, top_k=top_k, top_p=top_p,
                                 repetition_penalty=repetition_penalty)
    generating = dict(**sampling, prefill_chunk=prefill_chunk,
                      decode_step=compile_decode_step(device) if compile else decode_one_token)
    cache_options = dict(gate=gate, window=window, threshold=threshold, global_capacity=global_capacity,
                         kv_budget=kv_budget, page_size=page_size, evict=evict, backend=attn_backend,
                         select_budget=select_budget)
    if interactive:
        run_chat(model, tokenizer, checkpoint, max_seq_len, max_new_tokens, seed, cache_options, **generating)
    elif texts is not None:
        batches(model, tokenizer, texts, batch_size, max_seq_len, max_new_tokens, jsonl, no_chat, seed,
                cache_options, **generating)
    else:
        run_prompt(model, tokenizer, prompt, no_chat, max_seq_len, max_new_tokens, seed, compile, cache_options,
                   **generating)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # One line, not argparse's usage block: bad input gets a single line naming the problem.
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    parser = ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="Hugging Face Llama directory (default: the embedded SmolLM2-135M-Instruct)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", action="append", help=f"prompt text (default: {DEFAULT_PROMPT!r}); several "
                        "--prompt are decoded as a batch")
    source.add_argument("--prompt-file", help="read the prompt from this file")
    source.add_argument("--prompts-file", help="many prompts, decoded in batches: one per line, or JSON Lines of "
                        "objects with a \"prompt\"")
    parser.add_argument("--batch-size", type=int, default=8, help="rows decoded together (default: 8); each "
                        "completion is printed as it finishes, and its row takes the next prompt")
    parser.add_argument("--jsonl", action="store_true", help="print each completion as a JSON object with its "
                        "0-based index, prompt and completion")
    parser.add_argument("--no-chat", action="store_true", help="feed the raw prompt, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, help="0 is greedy (default, as for each sampling flag: the "
                        "checkpoint's generation_config.json, else greedy)")
    parser.add_argument("--top-k", type=int, help="0 keeps all tokens")
    parser.add_argument("--top-p", type=float, help="1 keeps all tokens")
    parser.add_argument("--repetition-penalty", type=float, help="transformers' repetition penalty over each "
                        "row's context: > 1 discourages repeating a token (default: 1, none)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32 on a CPU; on CUDA the "
                        "checkpoint's own, config.json's dtype or torch_dtype, else bfloat16)")
    parser.add_argument("--max-seq-len", type=int, help="longest prompt plus completion (default: exactly that)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on a GPU)")
    parser.add_argument("--gate", help="write-gated KV cache: a gate file (.safetensors, or the authors' .pt) at its "
                        "default setting, FILE@SETTING at another (python gate.py FILE lists them), a built-in "
                        "policy: full, none (window only), random:P, sink:N; or dense, the dense cache (default: "
                        f"gates/{DEFAULT_GATE.name}, 20%%, on the embedded model, else dense)")
    parser.add_argument("--window", type=int, help="local window W (default: the gate file's, else 256)")
    parser.add_argument("--threshold", type=float, help="admission threshold tau: picks the gate file's setting at "
                        "that tau; at another, the default pool is the full need (default: the setting's, else 0.1)")
    parser.add_argument("--global-capacity", type=int, help="tokens per KV head in the global store, rounded up to "
                        "whole pages (default: all that --max-seq-len can need; fewer keeps the highest-g tokens)")
    parser.add_argument("--kv-budget", help="size of the page pool that every layer's store draws on: bytes (300MiB), "
                        "tokens (20000), a share of the dense cache (40%%) or unlimited (default: from the admission "
                        "the gate file recorded at the chosen setting, else unlimited)")
    parser.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE,
                        help=f"tokens per page of the pool (default: {DEFAULT_PAGE_SIZE})")
    parser.add_argument("--evict", default=EVICTION[0], choices=EVICTION,
                        help="what gives way when the pool runs short (in a prefill at once, in decode at checks "
                        "every 32 steps): lowest-g, the tokens with the lowest g anywhere in the pool; snapkv, the "
                        "10%% of each head's tokens its recent queries read least (default: lowest-g)")
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                        help=f"prefill a long prompt this many tokens at a time (0: all at once); the output is "
                        f"the same (default: {DEFAULT_PREFILL_CHUNK})")
    parser.add_argument("--interactive", action="store_true",
                        help="chat: each line of stdin is a user turn, each reply a line of stdout; the cache keeps "
                        f"the conversation, so a turn prefills only its new tokens (--max-seq-len default: "
                        f"{DEFAULT_CHAT_LEN})")
    parser.add_argument("--select-budget", type=int, help="Quest's selection in decode: tokens each step attends "
                        "per KV head, the window's among them; the rest are the store's pages whose key bounds "
                        "score highest for the query (at least window + page size; default: all; prefill reads all)")
    parser.add_argument("--attn-backend", default="auto", choices=["auto", "torch", "triton"],
                        help="gated attention: PyTorch reference or Triton kernels (auto: triton on CUDA)")
    # Under torchrun only rank 0 prints (its errors included); an unexpected error's traceback still shows on
    # every rank, printed after the redirection ends.
    quiet = int(os.environ.get("RANK", "0")) > 0
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null) if quiet else contextlib.nullcontext(), \
            contextlib.redirect_stderr(null) if quiet else contextlib.nullcontext():
        try:
            main(**vars(parser.parse_args()))
        except (BadInput, CheckpointError) as e:
            print(f"generate.py: error: {e}", file=sys.stderr)
            sys.exit(2)
        finally:
            if dist.is_initialized():   # torchrun: main started the ranks' process group
                dist.destroy_process_group()
