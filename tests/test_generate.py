"""generate.py: greedy output equal to transformers' generate, sampling, --compile, bad input (every argument
check), the real model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
from tiny import hf_call, save_tiny_checkpoint
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is the capital of France?"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def tiny_checkpoint(request, tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=3)


def hf_greedy(checkpoint: Path, prompt_ids: list[int], max_new_tokens: int, stop_ids,
              repetition_penalty: float = 1.0) -> list[int]:
    new = hf_call("greedy", checkpoint, prompt_ids, max_new_tokens, stop_ids, repetition_penalty)
    return new[:-1] if new and new[-1] in stop_ids else new   # ours does not return the stop token


def test_greedy_matches_transformers(tiny_checkpoint):
    tok = Tokenizer(tiny_checkpoint)
    prompt_ids = tok.encode_prompt(PROMPT)
    expected = hf_greedy(tiny_checkpoint, prompt_ids, 40, tok.stop_ids)
    assert len(expected) >= 10, "the random model stops too soon to compare much"

    model, _ = generate.load(tiny_checkpoint)
    generate.setup_caches(model, len(prompt_ids) + 40)
    new, timings = generate.generate(model, prompt_ids, 40, stop_ids=tok.stop_ids)
    assert new == expected
    assert timings.prompt_tokens == len(prompt_ids) and timings.decode_steps == len(new) - 1 + (len(new) < 40)

    cli = run("--checkpoint", str(tiny_checkpoint), "--prompt", PROMPT, "--max-new-tokens", "40")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == tok.decode(expected) + "\n"
    assert f"prompt tokens: {len(prompt_ids)} " in cli.stderr and "decode:" in cli.stderr and "KV cache:" in cli.stderr


def test_repetition_penalty_matches_transformers(tiny_checkpoint):
    tok = Tokenizer(tiny_checkpoint)
    prompt_ids = tok.encode_prompt(PROMPT)
    plain = hf_greedy(tiny_checkpoint, prompt_ids, 40, tok.stop_ids)
    expected = hf_greedy(tiny_checkpoint, prompt_ids, 40, tok.stop_ids, repetition_penalty=1.5)
    assert expected != plain and len(expected) >= 10                  # the penalty changes what is said
    model, _ = generate.load(tiny_checkpoint)
    generate.setup_caches(model, len(prompt_ids) + 40)
    assert generate.generate(model, prompt_ids, 40, stop_ids=tok.stop_ids, repetition_penalty=1.5)[0] == expected
    # A batch row by row: each row's own context is penalised, not the others'.
    prompts = [prompt_ids, tok.encode_prompt("Hi")]
    alone = [expected, hf_greedy(tiny_checkpoint, prompts[1], 40, tok.stop_ids, repetition_penalty=1.5)]
    generate.setup_caches(model, len(prompt_ids) + 40, batch_size=2)
    assert generate.generate_rows(model, prompts, 40, stop_ids=tok.stop_ids, repetition_penalty=1.5)[0] == alone


def test_generation_config_sets_the_sampling_defaults(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path, "chatml", seed=3, num_hidden_layers=1)
    settings = lambda **flags: generate.sampling_settings(checkpoint, **{"temperature": None, "top_k": None,
                                                                         "top_p": None, "repetition_penalty": None,
                                                                         **flags})
    config = json.loads((checkpoint / "generation_config.json").read_text())
    assert not config.get("do_sample")
    assert settings() == dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)      # greedy
    config.update(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    (checkpoint / "generation_config.json").write_text(json.dumps(config))
    # As transformers reads it: do_sample with no top_k is top-k 50; the flags win.
    assert settings() == dict(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.2)
    assert settings(temperature=0.0, top_k=3) == dict(temperature=0.0, top_k=3, top_p=0.9, repetition_penalty=1.2)
    cli = run("--checkpoint", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "4", "--seed", "1")
    assert cli.returncode == 0 and "sampling: temperature 0.7, top-k 50, top-p 0.9, repetition penalty 1.2" in cli.stderr


def test_compile_gives_eager_tokens(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path, "chatml", seed=3, num_hidden_layers=1)
    args = ["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "12"]
    eager, compiled = run(*args), run(*args, "--compile")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and len(eager.stdout) > 5
    assert "compile and warm-up:" in compiled.stderr


def test_sampling():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0, -1.0]]).repeat(400, 1)                   # (B, vocab)
    assert generate.sample(logits, 0.0, 0, 1.0).unique().tolist() == [1]
    assert generate.sample(logits, 1.0, 1, 1.0).unique().tolist() == [1]              # top-k 1 is greedy
    assert generate.sample(logits, 1.0, 2, 1.0).unique().tolist() == [1, 2]
    assert generate.sample(logits, 1.0, 0, 0.5).unique().tolist() == [1, 2]           # p(1) < 0.5 <= p(1) + p(2)
    assert generate.sample(logits, 1.0, 0, 1.0).unique().tolist() == [0, 1, 2, 3, 4]
    hot = generate.sample(logits, 100.0, 0, 1.0)
    assert (hot == 4).sum() > 40                                                          # high temperature: near uniform


BAD_INPUTS = {
    "missing checkpoint": (["--checkpoint", "/nonexistent/ckpt"], "/nonexistent/ckpt is not a directory"),
    "unreadable config": (["--checkpoint", "{garbled_config}"], "config.json is unreadable"),
    "unreadable weights": (["--checkpoint", "{garbled_weights}"], "unreadable weights"),
    "prompt too long": (["--checkpoint", "{tiny}", "--max-seq-len", "8"], "leaves no room to generate within --max-seq-len 8"),
    "unknown device": (["--checkpoint", "{tiny}", "--device", "tpu"], "unknown device 'tpu'"),
    "unknown dtype": (["--checkpoint", "{tiny}", "--dtype", "float8"], "unknown dtype 'float8'"),
    "empty prompt file": (["--checkpoint", "{tiny}", "--prompt-file", "{empty_file}"], "is empty"),
    "missing prompt file": (["--checkpoint", "{tiny}", "--prompt-file", "/nonexistent/prompt.txt"], "cannot read --prompt-file"),
    "empty prompt": (["--checkpoint", "{tiny}", "--prompt", " "], "the prompt is empty"),
    "bad number": (["--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
    "no cuda": (["--checkpoint", "{tiny}", "--device", "cuda"], "CUDA is not available"),
    "repetition penalty 0": (["--checkpoint", "{tiny}", "--repetition-penalty", "0"],
                             "need --repetition-penalty > 0 (1 is none), got 0.0"),
    "no chat template": (["--checkpoint", "{no_template}", "--interactive"], "--interactive needs a chat template"),
}


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """(exit code, stdout, stderr) of generate.py for every case, run side by side to save time."""
    root = tmp_path_factory.mktemp("bad")
    tiny = save_tiny_checkpoint(root / "tiny")
    (root / "garbled_config").mkdir()
    (root / "garbled_config" / "config.json").write_text("{not json")
    garbled = save_tiny_checkpoint(root / "garbled_weights")
    (garbled / "model.safetensors").write_bytes(b"\x00" * 100)
    (root / "empty.txt").write_text("\n  \n")
    no_template = save_tiny_checkpoint(root / "no_template")
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    paths = {"tiny": tiny, "garbled_config": root / "garbled_config",
             "garbled_weights": garbled, "empty_file": root / "empty.txt", "no_template": no_template}
    procs = {case: subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *(a.format(**paths) for a in args)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for case, (args, _) in BAD_INPUTS.items()}
    return {case: (p.wait(timeout=600), *p.communicate()) for case, p in procs.items()}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_one_line_exit_2(case, bad_input_results):
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    returncode, stdout, stderr = bad_input_results[case]
    assert returncode == 2, stderr
    assert stdout == ""
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert BAD_INPUTS[case][1] in stderr


# Every check of generate.validate: the arguments given (beside VALID's), and what the one line says.
VALID = dict(device="cpu", dtype="float32", max_new_tokens=200, temperature=None, top_k=None, top_p=None,
             repetition_penalty=None, max_seq_len=None, prefill_chunk=2048, batch_size=8, prompt=None, prompt_file=None,
             prompts_file=None, no_chat=False, interactive=False)
BAD_ARGUMENTS = {
    "unknown device": (dict(device="tpu"), "unknown device 'tpu' (supported: cpu, cuda)"),
    "no cuda": (dict(device="cuda"), "--device cuda, but CUDA is not available on this machine"),
    "unknown dtype": (dict(dtype="float8"), "unknown dtype 'float8' (supported: float32, bfloat16, float16)"),
    "no new tokens": (dict(max_new_tokens=0), "need --max-new-tokens >= 1, got 0"),
    "negative temperature": (dict(temperature=-0.5), "need --temperature >= 0 (0 is greedy), got -0.5"),
    "NaN temperature": (dict(temperature=float("nan")), "need --temperature >= 0 (0 is greedy), got nan"),
    "negative top-k": (dict(top_k=-1), "need --top-k >= 0 (0 keeps all tokens), got -1"),
    "top-p 0": (dict(top_p=0.0), "need --top-p in (0, 1] (1 keeps all tokens), got 0.0"),
    "top-p above 1": (dict(top_p=1.5), "need --top-p in (0, 1] (1 keeps all tokens), got 1.5"),
    "repetition penalty 0": (dict(repetition_penalty=0.0), "need --repetition-penalty > 0 (1 is none), got 0.0"),
    "negative repetition penalty": (dict(repetition_penalty=-1.2), "need --repetition-penalty > 0 (1 is none), got -1.2"),
    "max-seq-len 0": (dict(max_seq_len=0), "need --max-seq-len >= 1, got 0"),
    "negative prefill chunk": (dict(prefill_chunk=-1), "need --prefill-chunk >= 0 (0: all at once), got -1"),
    "batch size 0": (dict(batch_size=0), "need --batch-size >= 1, got 0"),
    "interactive with a prompt": (dict(interactive=True, prompt=["Hi"]), "--interactive reads the turns from stdin"),
    "interactive with a prompt file": (dict(interactive=True, prompt_file="p.txt"), "it takes no --prompt"),
    "interactive with a prompts file": (dict(interactive=True, prompts_file="p.txt"), "it takes no --prompt"),
    "interactive without the chat template": (dict(interactive=True, no_chat=True), "--prompts-file or --no-chat"),
    "empty prompt": (dict(prompt=["  "]), "the prompt is empty"),
    "an empty prompt of several": (dict(prompt=["Hi", ""]), "the prompt of --prompt number 2 is empty"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_validate_names_each_bad_argument_in_one_line(case):
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    given, message = BAD_ARGUMENTS[case]
    with pytest.raises(generate.BadInput) as e:
        generate.validate(**VALID | given)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_validate_takes_the_edges_of_each_range():
    generate.validate(**VALID)
    generate.validate(**VALID | dict(max_new_tokens=1, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1e-3,
                                     max_seq_len=1, prefill_chunk=0, batch_size=1, prompt=["Hi", "Ho"]))
    generate.validate(**VALID | dict(interactive=True))


def test_embedded_model_knows_paris(smollm2_checkpoint):
    result = run("--prompt", PROMPT, "--max-new-tokens", "20")   # no --checkpoint: the embedded default
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_embedded_model_runs_its_gate_by_default(smollm2_checkpoint):
    """The README's first command: a page of text, longer than the gate's window, so tokens leave the
    window and the trained gate drops some of them; --gate dense is the dense cache."""
    args = ("--prompt-file", "prompts/with-statement.md", "--max-new-tokens", "4")
    gated, dense = run(*args), run(*args, "--gate", "dense")
    assert gated.returncode == 0 and dense.returncode == 0, gated.stderr + dense.stderr
    assert generate.DEFAULT_GATE.name in gated.stderr
    admitted = float(gated.stderr.split("admitted ")[1].split("%")[0])
    assert 0 < admitted < 100, gated.stderr
    assert "write-gated" not in dense.stderr and "admitted" not in dense.stderr


@pytest.mark.parametrize("config, device, expected", [
    ({"dtype": "bfloat16"}, "cpu", "float32"),          # a CPU runs float32 whatever the checkpoint says
    ({"dtype": "float16", "torch_dtype": "bfloat16"}, "cuda", "float16"),   # config.json's dtype first
    ({"torch_dtype": "bfloat16"}, "cuda", "bfloat16"),  # else the older torch_dtype
    ({"torch_dtype": "float32"}, "cuda", "float32"),    # the checkpoint's own, even float32
    ({}, "cuda", "bfloat16"),                           # neither: bfloat16
    ({"torch_dtype": "int8"}, "cuda", "bfloat16"),      # nothing a model runs in: bfloat16
])
def test_default_dtype_is_float32_on_a_cpu_and_the_checkpoints_own_on_cuda(tmp_path, config, device, expected):
    from model import default_dtype
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert default_dtype(tmp_path, device) == expected


def test_device_cuda_loads_the_checkpoints_dtype(tiny_checkpoint, monkeypatch):
    """generate.main with --device cuda and no --dtype asks load for the checkpoint's dtype. CUDA's presence is
    faked and load stopped there: this machine has no GPU to load onto."""
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = {}

    class Loaded(Exception):
        pass

    def load(checkpoint, device, dtype, tp, compiled=False):
        asked.update(device=device, dtype=dtype)
        raise Loaded

    monkeypatch.setattr(generate, "load", load)
    for given, expected in ((None, config.get("dtype") or config.get("torch_dtype") or "bfloat16"), ("float16", "float16")):
        with pytest.raises(Loaded):
            generate.main(checkpoint=str(tiny_checkpoint), prompt=PROMPT, device="cuda", dtype=given, gate="dense")
        assert asked == dict(device="cuda", dtype=getattr(torch, expected))


def test_the_statistics_line_says_the_dtype(tiny_checkpoint):
    proc = run("--checkpoint", str(tiny_checkpoint), "--prompt", PROMPT, "--max-new-tokens", "2", "--gate", "dense")
    assert proc.returncode == 0, proc.stderr
    assert "| dtype: float32" in proc.stderr
