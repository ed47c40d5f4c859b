"""Prefill and decode speed of our Llama, eager and compiled, next to transformers' generate on the
same model, weights and prompt (greedy, batch 1); and of the dense against the write-gated cache.
Prints a markdown table on stdout, progress on stderr.

    python bench.py                                               # BENCHMARKS.md's speed table: embedded SmolLM2, float32
    python bench.py --prefill 512 --contexts 1024 --new-tokens 16  # a shorter run
    python bench.py --systems eager gated --prefill 2048 4096 8192 --contexts 2048 4096 8192   # dense vs --gate
    python bench.py --systems eager gated --gate gates/smollm2-135m-instruct-lambda0.16.safetensors --prefill 64 \
        --contexts 1024 4096 8192 --new-tokens 16    # the default path: eager decode, gated (make generate's gate) vs dense

Prefill tok/s: prompt tokens over the time to the first new token. Decode tok/s at context C: a prompt
of C tokens, then --new-tokens tokens; decode steps over their time (the prefill is not counted), also as
ms/token beside the weight-read floor: the model's weight bytes over the read bandwidth this machine
shows (a torch sum over 512 MiB), the time a decode step needs at least when it reads every weight once.
--compile-time adds, for each compiled system, the seconds its decode step takes to compile in a fresh
process with an empty Inductor cache (cold), again in a second process on that cache (warm), and for a
second cache size in the first process (what another --max-seq-len costs).
--batch-sizes B [B ...] instead decodes batches of B prompts of C, C - 1, ... tokens at each context C, each
of our --systems, and reports tokens/s over all rows against the batch size.
--memory C [C ...] instead runs whole `generate.py` processes at each context C (a prompt of about
C - 32 tokens, 16 new tokens, --max-seq-len C), the dense cache against the write-gated one with its
default budget (--gate, default the embedded model's gate), each with generate.py's prefill chunks and
with the prompt in one call, and reports each process's peak RSS, the KV bytes its cache allocated (the
memory a user gets back) and its prefill seconds.
--select-budget N adds the systems selected and selected-compiled: the gated ones with selection in decode
(Quest over the store's pages, N tokens attended per step and KV head; --gate full is Quest alone), compared
with their gated twins. Every system's decode rows also give the bytes a step must read (weights, the K/V
it attends, and the page summaries it scores, on average over the steps) and the time against that floor.
"""
import argparse
import copy
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydoc_data.topics
import torch

import generate
from convert_gguf import checkpoint_or_default
from generate import RunStats
from gate import admission_stats, build_caches, dense_bytes, install
from hf_process import HFProcess
from model import CheckpointError


# Each gated system is compared with the dense system that runs the same way.
DENSE_TWIN = {"gated": "eager", "gated-compiled": "compiled"}
# Each selecting system is compared with the gated system without selection.
GATED_TWIN = {"selected": "gated", "selected-compiled": "gated-compiled"}
# The compiled dense prefill breaks its graph inside the blocks' nested_compile_region (the dense cache's host read
# below); torch 2.13 takes that, torch 2.11 refuses it (UncapturedHigherOrderOpError), so there the prefill runs
# eagerly and only the decode step is compiled, as in generate.py.
PREFILL_COMPILES = torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


class Ours:
    """Our model with dense caches, or write-gated ones when gate is a --gate spec. Compiled: the decode
    step as generate.py --compile does, and the dense prefill with dynamic shapes where PREFILL_COMPILES (the
    gated prefill reads its admitted counts on the host to size its blocks, so it runs eagerly, as in generate.py).
    One set of caches (and gates) per context, reused, so the compiled step sees the same buffers
    again instead of recompiling."""

    def __init__(self, model, compiled: bool, gate: str | None = None, kv_budget: str | None = None,
                 select_budget: int | None = None):
        self.model, self.gate, self.kv_budget, self.select_budget, self.caches = model, gate, kv_budget, select_budget, {}
        model.lay_out_for_decode(compiled)   # as generate.py --compile loads it, or without
        # Automatic dynamic shapes: the second prompt length of the warm-up makes the length symbolic. (dynamic=True
        # would make the weights' sizes symbolic too, which the blocks' nested_compile_region does not take.)
        # Not fullgraph: the dense cache reads where a chunk ends on the host, to take the causal kernel when
        # the chunk is the whole sequence (one break per layer around that read).
        self.prefill_step = torch.compile(generate.prefill) \
            if compiled and gate is None and PREFILL_COMPILES else generate.prefill
        self.decode_step = generate.compile_decode_step("cpu") if compiled else generate.decode_one_token

    def run(self, ids: list[int], new_tokens: int, max_seq_len: int) -> RunStats:
        if max_seq_len not in self.caches:
            gated = dict(kv_budget=self.kv_budget, backend="torch", select_budget=self.select_budget) \
                if self.gate is not None else {}
            evictor = build_caches(self.model, max_seq_len, gate=self.gate, **gated).evictor
            self.caches[max_seq_len] = ([layer.attention.cache for layer in self.model.layers],
                                        [layer.attention.gate for layer in self.model.layers], evictor)
        caches, gates, evictor = self.caches[max_seq_len]
        self.model.setup_caches(caches.__getitem__)
        install(self.model, gates if self.gate is not None else None)
        new, timings = generate.generate(self.model, ids, new_tokens, prefill_step=self.prefill_step,
                                         decode_step=self.decode_step, evictor=evictor)
        assert len(new) == new_tokens
        # K/V bytes held at the end: ring + store when gated; every token written when dense. K/V bytes a decode
        # step reads, and summary bytes it scores, on average: the tokens attended per KV head (dense: every
        # position up to the step's), over every layer's heads.
        c = self.model.config
        heads, per_token = c.n_layers * c.n_kv_heads, 2 * c.head_dim * self.model.output.weight.element_size()
        if self.gate is not None:
            stats = admission_stats(self.model)
            self.kv_held = stats["bytes_in_use"]
            self.step_read = heads * (stats["tokens_read_per_step"] + stats["pages_scored_per_step"]) * per_token
        else:
            self.kv_held = dense_bytes(self.model, timings.prompt_tokens + timings.decode_steps)
            self.step_read = heads * (timings.prompt_tokens + (timings.decode_steps + 1) / 2) * per_token
        return timings


class Transformers:
    """transformers' generate (AutoModelForCausalLM: Llama or Qwen3) in a process of its own (hf_process.py says
    why), timed there by a streamer that notes when each token arrives."""

    def __init__(self, checkpoint):
        self.checkpoint, self.process = str(checkpoint), HFProcess()
        self.process("load_model", self.checkpoint, torch.get_num_threads())

    def run(self, ids: list[int], new_tokens: int, max_seq_len: int) -> RunStats:
        prefill_s, decode_s = self.process("timed_generate", self.checkpoint, ids, new_tokens)
        return RunStats(len(ids), prefill_s, new_tokens - 1, decode_s)


def read_bandwidth(threads: int) -> float:
    """Bytes per second a torch sum reads from a 512 MiB float32 tensor (median of 5), the decode floor's rate."""
    x = torch.ones(2**27)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * x.element_size() / sorted(times[1:])[2]


def compile_seconds(checkpoint: str, system: str, gate: str, sizes: list[int], cache_dir: str, threads: int) -> list[float]:
    """In a new process (so nothing compiled earlier helps) on the Inductor cache cache_dir: the seconds the
    first compiled decode step takes at each cache size in turn."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-child", system, "--gate", gate, "--threads",
           str(threads), "--checkpoint", str(checkpoint), "--contexts", *map(str, sizes)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache_dir})
    if result.returncode:
        raise RuntimeError(f"compiling {system} failed: {result.stderr.strip().splitlines()[-1:]}")
    return [float(x) for x in result.stdout.split()]


def compile_child(checkpoint: str, system: str, gate: str, sizes: list[int]) -> None:
    """--compile-child: compile the system's decode step for each cache size, print the seconds of each."""
    model, tokenizer = generate.load(checkpoint, compiled=True)
    runner = Ours(model, compiled=True, gate=gate if system == "gated-compiled" else None)
    runner.prefill_step = generate.prefill   # the decode step alone is timed
    for size in sizes:
        build_caches(model, size, gate=runner.gate, backend="torch")
        token = generate.prefill(model, torch.tensor([prompt_ids(tokenizer, 64)]), 0.0, 0, 1.0)
        t0 = time.perf_counter()
        runner.decode_step(model, token, torch.tensor([64]), 0.0, 0, 1.0)
        print(f"{time.perf_counter() - t0:.1f}", flush=True)


def prompt_ids(tokenizer, n: int) -> list[int]:
    """The first n tokens of Python's own documentation topics: offline, fixed, real prose and code."""
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer.encode(text[:8 * n])
    assert len(ids) >= n
    return ids[:n]


def process_memory(checkpoint: str | None, contexts: list[int], gate: str | None, kv_budget: str | None,
                   threads: int) -> None:
    """--memory: peak RSS and allocated KV bytes of whole generate.py processes, dense against gated."""
    tokenizer = generate.load(checkpoint_or_default(checkpoint))[1]
    script = str(Path(__file__).resolve().with_name("generate.py"))
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    gated = (["--gate", gate] if gate else []) + (["--kv-budget", kv_budget] if kv_budget else [])
    # Each cache with generate.py's default prefill chunks, and with the prompt prefilled in one call.
    caches = {"dense": ["--gate", "dense"], "dense, one-shot prefill": ["--gate", "dense", "--prefill-chunk", "0"],
              "gated": gated, "gated, one-shot prefill": gated + ["--prefill-chunk", "0"]}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for c in contexts:
            prompt = Path(tmp) / f"prompt-{c}.txt"
            prompt.write_text(tokenizer.decode(prompt_ids(tokenizer, c - 32)))
            for name, flags in caches.items():
                cmd = [sys.executable, script, "--prompt-file", str(prompt), "--no-chat", "--max-new-tokens", "16",
                       "--max-seq-len", str(c), *flags] + (["--checkpoint", checkpoint] if checkpoint else [])
                t0 = time.perf_counter()
                result = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if result.returncode:
                    raise RuntimeError(f"generate.py at {c} ({name}) failed: {result.stderr.strip().splitlines()[-1:]}")
                err = result.stderr
                rss = float(err.split("peak memory: ")[1].split(" GiB")[0])
                kv = int(err.split("KV cache: ")[1].split(" bytes")[0].replace(",", ""))
                prefill_s = float(err.split("prefill: ")[1].split(" s")[0])
                rows[c, name] = (rss, kv, prefill_s)
                log(f"memory @ {c} {name}: peak {rss:.2f} GiB RSS, KV allocated {kv / 2**20:.1f} MiB, prefill "
                    f"{prefill_s:.1f} s ({time.perf_counter() - t0:.0f} s)")
    print(f"{checkpoint or 'embedded SmolLM2-135M-Instruct'} | float32 | generate.py processes, 16 new tokens | "
          f"gated: --gate {gate or 'the default'}, --kv-budget {kv_budget or 'the default'}\n")
    print("| context | cache | peak RSS GiB | KV allocated MiB | KV allocated / dense | prefill s |")
    print("|---|---|---|---|---|---|")
    for c in contexts:
        for name in caches:
            rss, kv, prefill_s = rows[c, name]
            print(f"| {c} | {name} | {rss:.2f} | {kv / 2**20:.1f} | {kv / rows[c, 'dense'][1]:.1%} | {prefill_s:.1f} |")


def batch_throughput(checkpoint: str | None, systems: list[str], batch_sizes: list[int], contexts: list[int],
                     new_tokens: int, gate: str | None, kv_budget: str | None) -> None:
    """--batch-sizes: decode tokens/s over all rows against the batch size, each system at each context. The
    rows' prompts differ in length by a token each (C, C - 1, ...), so every batch is a ragged one."""
    model, tokenizer = generate.load(checkpoint_or_default(checkpoint))
    ours = [s for s in systems if s != "transformers"]
    results = {}
    for name in ours:
        gated, compiled = name.startswith("gated"), name.endswith("compiled")
        model.lay_out_for_decode(compiled)
        step = generate.compile_decode_step("cpu") if compiled else generate.decode_one_token
        for c in contexts:
            for b in batch_sizes:
                options = dict(gate=gate or "random:0.2", kv_budget=kv_budget, backend="torch") if gated else {}
                evictor = build_caches(model, c + new_tokens, batch_size=b, **options).evictor
                prompts = [prompt_ids(tokenizer, c - i) for i in range(b)]
                generate.generate_rows(model, [p[:64] for p in prompts], 4, decode_step=step)    # warm-up, compiles
                t0 = time.perf_counter()
                new, t = generate.generate_rows(model, prompts, new_tokens, decode_step=step, evictor=evictor)
                assert all(len(n) == new_tokens for n in new)
                results[name, c, b] = t.decode_steps * b / t.decode_s
                log(f"{name} @ {c}, batch {b}: {results[name, c, b]:.1f} tok/s over the rows "
                    f"({time.perf_counter() - t0:.0f} s with the prefill)")
    print(f"{checkpoint or 'embedded SmolLM2-135M-Instruct'} | float32 | {torch.get_num_threads()} threads | "
          f"decode tok/s over all rows, {new_tokens} steps | gated: --gate {gate or 'random:0.2'}\n")
    print("| system | context | " + " | ".join(f"batch {b}" for b in batch_sizes) + f" | batch {batch_sizes[-1]} / batch {batch_sizes[0]} |")
    print("|---|---|" + "---|" * (len(batch_sizes) + 1))
    for name in ours:
        for c in contexts:
            cells = [f"{results[name, c, b]:.1f}" for b in batch_sizes]
            ratio = results[name, c, batch_sizes[-1]] / results[name, c, batch_sizes[0]]
            print(f"| {name} | {c} | " + " | ".join(cells) + f" | {ratio:.2f}x |")


def compile_times(checkpoint, systems: list[str], gate: str, contexts: list[int], new_tokens: int,
                  threads: int) -> dict[str, dict[str, float]]:
    """--compile-time: per compiled system, the seconds its decode step takes to compile, cold, warm and for a
    second cache size (compile_seconds)."""
    compile_rows = {}
    for name in [s for s in systems if s.endswith("compiled")]:
        sizes = [contexts[0] + new_tokens, contexts[-1] + 2 * new_tokens]   # two sizes, even with one context
        with tempfile.TemporaryDirectory() as cache_dir:
            cold = compile_seconds(checkpoint, name, gate, sizes, cache_dir, threads)
            warm = compile_seconds(checkpoint, name, gate, sizes[:1], cache_dir, threads)
        compile_rows[name] = {"compile s: cold": cold[0], "compile s: warm (second process)": warm[0],
                              "compile s: a second cache size": cold[1]}
        log(f"{name}: compile {cold[0]:.1f} s cold, {warm[0]:.1f} s warm, {cold[1]:.1f} s for a second cache size")
    return compile_rows


def speeds(checkpoint, model, tokenizer, systems: list[str], prefill: list[int], contexts: list[int], new_tokens: int,
           repeats: int, gate: str, kv_budget: str | None,
           select_budget: int | None = None) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Each system warmed up at every cache size, then its prefill and decode rates (and the KV bytes a gated
    system holds), best of `repeats`: the rows measured, and results[system][row]."""
    largest = max([*prefill, *contexts]) + new_tokens
    # A model of its own per system: compiled code guards on the modules it saw, so systems that swapped
    # caches and gates on one shared model would recompile each other's steps while being timed.
    makers = {"transformers": lambda: Transformers(checkpoint),
              "eager": lambda: Ours(copy.deepcopy(model), compiled=False),
              "compiled": lambda: Ours(copy.deepcopy(model), compiled=True),
              "gated": lambda: Ours(copy.deepcopy(model), False, gate, kv_budget),
              "gated-compiled": lambda: Ours(copy.deepcopy(model), True, gate, kv_budget),
              "selected": lambda: Ours(copy.deepcopy(model), False, gate, kv_budget, select_budget),
              "selected-compiled": lambda: Ours(copy.deepcopy(model), True, gate, kv_budget, select_budget)}
    runners = {}
    for name in systems:
        runners[name], t0 = makers[name](), time.perf_counter()
        for size in sorted({largest, *(c + new_tokens for c in contexts)}):   # warm up every cache size used
            for n in (64, 96):   # two prompt lengths, so that the compiled prefill's length is dynamic
                runners[name].run(prompt_ids(tokenizer, n), 4, size)
        log(f"{name}: warm-up (compilation included) {time.perf_counter() - t0:.1f} s")

    # Systems take turns on each measurement, so that a change in the machine's load hits them alike.
    rows = {f"prefill {n} tok/s": (n, 1) for n in prefill} | {f"decode @ {c} tok/s": (c, new_tokens) for c in contexts}
    results = {name: {} for name in systems}
    for row, (n, new) in rows.items():
        ids, size = prompt_ids(tokenizer, n), largest if new == 1 else n + new_tokens
        for _ in range(repeats):
            for name in systems:
                t = runners[name].run(ids, new, size)
                rate = n / t.prefill_s if new == 1 else t.decode_steps / t.decode_s
                results[name][row] = max(rate, results[name].get(row, 0.0))
                log(f"{name}: {row} {rate:.1f}")
                if new > 1 and hasattr(runners[name], "kv_held"):
                    results[name][f"KV MiB held @ {n}"] = runners[name].kv_held / 2**20
                    results[name][f"KV MiB read a step @ {n}"] = runners[name].step_read / 2**20
    return list(rows), results


def print_table(checkpoint, systems: list[str], rows: list[str], results: dict, compile_rows: dict,
                contexts: list[int], new_tokens: int, repeats: int, gate: str, weights: int, bandwidth: float) -> None:
    """The markdown table on stdout: every row's value per system, with ours against transformers and each gated
    system against its dense twin, then the weight-read floor."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    gated = [s for s in systems if s in DENSE_TWIN]
    print(f"{checkpoint} | float32 | batch 1 | greedy | {cpu}, {torch.get_num_threads()} threads | "
          f"torch {torch.__version__} | decode: {new_tokens} new tokens | best of {repeats}"
          + (f" | gated: --gate {gate}, window and threshold the defaults" if gated else "") + "\n")
    # Ratios: ours against transformers, and each gated system against its dense twin.
    pairs = [(s, "transformers") for s in systems if s != "transformers" and "transformers" in systems]
    pairs += [(s, DENSE_TWIN[s]) for s in gated if DENSE_TWIN[s] in systems]
    pairs += [(s, GATED_TWIN[s]) for s in systems if s in GATED_TWIN and GATED_TWIN[s] in systems]
    print("| | " + " | ".join(systems) + "".join(f" | {a} / {b}" for a, b in pairs) + " |")
    print("|---" * (1 + len(systems) + len(pairs)) + "|")
    kv_rows = [f"KV MiB {what} @ {c}" for c in contexts for what in ("held", "read a step")
               if any(f"KV MiB {what} @ {c}" in results[s] for s in systems)]
    ms_rows = [f"decode @ {c} {what}" for c in contexts for what in ("ms/token", "time / read floor")]
    for row in [*rows, *ms_rows, *kv_rows, *dict.fromkeys(r for rs in compile_rows.values() for r in rs)]:
        cells = [f"{results[s][row]:.1f}" if row in results[s] else "" for s in systems]
        ratio = row.endswith("tok/s") or row.startswith("KV")   # a ratio of times or of compile seconds misleads
        ratio = ratio and not row.endswith("read floor")
        cells += [f"{results[a][row] / results[b][row]:.2f}x" if ratio and row in results[a] and row in results[b] else ""
                  for a, b in pairs]
        print(f"| {row} | " + " | ".join(cells) + " |")
    floor_ms = 1000 * weights / bandwidth
    print(f"\nweight-read floor: {floor_ms:.1f} ms/token ({weights / 1e6:.0f} MB of weights, read at "
          f"{bandwidth / 1e9:.1f} GB/s by a torch sum over 512 MiB with {torch.get_num_threads()} threads); "
          f"time / read floor: a decode step's time over the time to read its weights, the K/V it attends and "
          f"the summaries it scores (KV MiB read a step) at that rate")


def main(checkpoint=None, prefill=(512, 2048), contexts=(1024, 4096), new_tokens=32, repeats=1,
         systems=("transformers", "eager", "compiled"), threads=0, gate=None, kv_budget=None, compile_time=False,
         memory=None, batch_sizes=None, select_budget=None) -> None:
    if (select_budget is not None) != any(s in GATED_TWIN for s in systems):
        if select_budget is not None:
            raise generate.BadInput("--select-budget applies to the systems selected and selected-compiled: add one")
        raise generate.BadInput("the systems selected and selected-compiled need --select-budget")
    if threads:
        torch.set_num_threads(threads)
    if memory:
        process_memory(checkpoint, memory, gate, kv_budget, threads)
        return
    if batch_sizes:
        batch_throughput(checkpoint, systems, batch_sizes, contexts, new_tokens, gate, kv_budget)
        return
    gate = gate or "random:0.2"
    checkpoint = checkpoint_or_default(checkpoint)
    compile_rows = compile_times(checkpoint, systems, gate, contexts, new_tokens, threads) if compile_time else {}
    model, tokenizer = generate.load(checkpoint)
    rows, results = speeds(checkpoint, model, tokenizer, systems, prefill, contexts, new_tokens, repeats, gate,
                           kv_budget, select_budget)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())   # a tied head counted once
    bandwidth = read_bandwidth(threads)
    for name in systems:
        results[name] |= compile_rows.get(name, {})
        for c in contexts:
            if f"decode @ {c} tok/s" in results[name]:
                results[name][f"decode @ {c} ms/token"] = ms = 1000 / results[name][f"decode @ {c} tok/s"]
            if f"KV MiB read a step @ {c}" in results[name]:
                floor_ms = 1000 * (weights + results[name][f"KV MiB read a step @ {c}"] * 2**20) / bandwidth
                results[name][f"decode @ {c} time / read floor"] = ms / floor_ms
    print_table(checkpoint, systems, rows, results, compile_rows, contexts, new_tokens, repeats, gate, weights,
                bandwidth)


if __name__ == "__main__":
    parser = generate.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="Hugging Face Llama directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prefill", type=int, nargs="+", default=[512, 2048], help="prompt lengths for prefill")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096], help="context lengths for decode")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps measured per context")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs per cell")
    parser.add_argument("--systems", nargs="+", default=["transformers", "eager", "compiled"],
                        choices=["transformers", "eager", "compiled", "gated", "gated-compiled", "selected",
                                 "selected-compiled"])
    parser.add_argument("--gate", help="the --gate spec of the gated systems (default: random:0.2; for --memory "
                        "the embedded model's gate)")
    parser.add_argument("--select-budget", type=int, help="the selected systems' tokens attended per decode step and "
                        "KV head (generate.py's --select-budget)")
    parser.add_argument("--kv-budget", help="the gated systems' page pool, as generate.py's --kv-budget (default: its default)")
    parser.add_argument("--memory", type=int, nargs="+", metavar="C",
                        help="instead: peak memory of generate.py processes at these contexts, dense and gated")
    parser.add_argument("--batch-sizes", type=int, nargs="+", metavar="B",
                        help="instead: decode tok/s over all rows at these batch sizes (ragged prompts), each of "
                        "our --systems at each --contexts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile-time", action="store_true",
                        help="also time each compiled system's compilation: cold, warm, and a second cache size")
    parser.add_argument("--compile-child", help=argparse.SUPPRESS)   # compile_seconds's own process
    try:
        args = vars(parser.parse_args())
        child = args.pop("compile_child")
        if child:
            torch.set_num_threads(args["threads"] or torch.get_num_threads())
            compile_child(checkpoint_or_default(args["checkpoint"]), child, args["gate"] or "random:0.2",
                          args["contexts"])
        else:
            main(**args)
    except (CheckpointError, generate.BadInput) as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
