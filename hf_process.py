"""transformers in a process of its own, for the tests that compare against it and bench.py's baseline.

transformers 5.25 imports Hugging Face's `kernels` package, a name this repo's kernels.py takes wherever the
repo's root is on the import path (as it is for our scripts and tests), so the two cannot share a process.
HFProcess starts this file as a child whose import path lacks the root and whose working directory is
elsewhere; the child loads a file of plain functions over transformers (tests/hf_side.py, or this file's
own below for bench.py) and calls them by name. Arguments and results (tensors, lists, dicts, strings) are
pickled over the child's stdin and stdout, so they must be plain values, never transformers' own types;
anything the child prints goes to stderr. The child lives until closed (or its parent ends), so what a
function keeps in its module (a loaded model) stays for the next call.
"""
import importlib.util
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent


class HFProcess:
    """The parent's side: process(name, *args, **kwargs) calls the child's function `name` and returns its result."""

    def __init__(self, functions: str | Path = __file__):
        self.cwd = tempfile.TemporaryDirectory()
        self.child = subprocess.Popen([sys.executable, str(ROOT / "hf_process.py"), str(Path(functions).resolve())],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=self.cwd.name)

    def __call__(self, name: str, *args, **kwargs):
        try:
            pickle.dump((name, args, kwargs), self.child.stdin)
            self.child.stdin.flush()
            ok, result = pickle.load(self.child.stdout)
        except (BrokenPipeError, EOFError):
            raise RuntimeError(f"transformers' process ended (exit code {self.child.wait()}): its stderr says "
                               "why") from None
        if not ok:
            raise RuntimeError(f"transformers' process: {name} failed:\n{result}")
        return result

    def close(self) -> None:
        self.child.stdin.close()
        self.child.wait()
        self.cwd.cleanup()


def serve(functions: Path) -> None:
    """The child's side: calls functions by name until stdin closes; a failure goes back as its traceback."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)   # what transformers prints goes to stderr, so that stdout carries the replies alone
    spec = importlib.util.spec_from_file_location(functions.stem, functions)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    while True:
        try:
            name, args, kwargs = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        try:
            reply = (True, getattr(module, name)(*args, **kwargs))
        except Exception:   # noqa: BLE001 - the parent raises it, with the child's traceback
            reply = (False, traceback.format_exc())
        pickle.dump(reply, replies)
        replies.flush()


# --- bench.py's baseline: transformers' generate, timed in the child -------------------------------

MODELS = {}


def load_model(checkpoint: str, threads: int) -> None:
    """AutoModelForCausalLM (Llama or Qwen3) in float32, kept for timed_generate; torch threads as the parent's."""
    import torch
    import transformers
    torch.set_num_threads(threads)
    MODELS[checkpoint] = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def timed_generate(checkpoint: str, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """Greedy generate of exactly new_tokens after ids: (seconds to the first new token, seconds of the other
    new_tokens - 1), timed by a streamer that notes when each token arrives."""
    import torch

    class Clock:   # generate calls put with the prompt, then with each new token
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    clock, tokens = Clock(), torch.tensor([ids])                                            # (1, T)
    start = time.perf_counter()
    with torch.no_grad():
        out = MODELS[checkpoint].generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                                          streamer=clock, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                          pad_token_id=0)
    end = time.perf_counter()
    assert out.shape[1] == len(ids) + new_tokens
    return clock.times[1] - start, end - clock.times[1]


if __name__ == "__main__":
    # Off the path before anything imports transformers: the root (this file's folder, so sys.path[0] here,
    # and perhaps in PYTHONPATH) holds kernels.py.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    serve(Path(sys.argv[1]))
