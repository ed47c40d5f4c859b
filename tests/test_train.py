"""The gate trainer on tiny random models: soft-gated attention, regularizer, a step, a run, resume, DDP."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import train_gate
from data import chat_prefix, make_samples, read_documents
from gate import load_gates, save_gates
from model import Transformer
from tokenizer import Tokenizer as ChatTokenizer

REPO = Path(__file__).resolve().parent.parent
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("The write gate decides which tokens enter the cache. Old tokens leave the window and are kept "
        "only when admitted. Numbers like 12345 and words like admission, eviction and selection recur. ")


def make_tiny_model(path: Path, seed: int = 0, n_layers: int = 2) -> Path:
    """A random Llama (2 layers, 4 query / 2 KV heads, D = 8) with a small BPE tokenizer and a ChatML template."""
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT * 4], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": tok.get_vocab_size(),
              "hidden_size": 32, "num_hidden_layers": n_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": True}
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)
    V, C, I = config["vocab_size"], 32, 64
    w = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    state = {"model.embed_tokens.weight": w(V, C), "model.norm.weight": torch.ones(C)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        state |= {p + "input_layernorm.weight": torch.ones(C), p + "post_attention_layernorm.weight": torch.ones(C),
                  p + "self_attn.q_proj.weight": w(C, C), p + "self_attn.k_proj.weight": w(16, C),
                  p + "self_attn.v_proj.weight": w(16, C), p + "self_attn.o_proj.weight": w(C, C),
                  p + "mlp.gate_proj.weight": w(I, C), p + "mlp.up_proj.weight": w(I, C), p + "mlp.down_proj.weight": w(C, I)}
    save_file(state, str(path / "model.safetensors"))
    return path


def make_docs(path: Path, n: int = 3, repeat: int = 6) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (path / f"doc{i}.txt").write_text(f"Document {i}. " + TEXT * repeat)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return make_tiny_model(root / "model"), make_docs(root / "docs")


def run_args(model: Path, data: Path, out: Path, **overrides) -> dict:
    args = dict(checkpoint=str(model), data=str(data), out=str(out), seq_len=64, steps=6, batch_size=1, lam=0.05,
                window=8, threshold=0.1, lr=1e-2, weight_decay=0.01, warmup=0.1, hidden=0, seed=0, dtype="float32",
                device="cpu", activation_checkpointing=False, block=16, save_every=2, threads=1, resume=False,
                export=None, export_dtype="float16")
    return args | overrides


def cli(args: dict) -> list[str]:
    flags = []
    for k, v in args.items():
        flag = "--lambda" if k == "lam" else "--" + k.replace("_", "-")
        if v is True:
            flags.append(flag)
        elif v not in (None, False):
            flags += [flag, str(v)]
    return flags


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------

def dense_soft_gated(q, k, v, g, window):
    """The oracle: a full T x T bias (log g beyond the window, -inf above the diagonal) and plain softmax."""
    T = q.shape[2]
    G = q.shape[1] // k.shape[1]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    bias = torch.where(i - j >= window, g.log()[:, :, None, :], 0.0).masked_fill(j > i, float("-inf"))   # (B, Hkv, T, T)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                          attn_mask=bias.repeat_interleave(G, 1))


@pytest.mark.parametrize("T,block", [(37, 8), (37, 64), (64, 16)])
def test_soft_gated_attention_matches_dense_oracle(T, block):
    torch.manual_seed(0)
    B, Hq, Hkv, D, W = 2, 6, 2, 8, 5
    inputs = [torch.randn(B, Hq, T, D, dtype=torch.float64), torch.randn(B, Hkv, T, D, dtype=torch.float64),
              torch.randn(B, Hkv, T, D, dtype=torch.float64), torch.rand(B, Hkv, T, dtype=torch.float64).clamp_min(1e-3)]
    ours = [t.clone().requires_grad_() for t in inputs]
    ref = [t.clone().requires_grad_() for t in inputs]
    out = train_gate.soft_gated_attention(*ours, W, block)
    expected = dense_soft_gated(*ref, W)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)
    assert ours[3].grad[:, :, -W:].abs().max() == 0   # the last W keys are never beyond anyone's window


def test_soft_gated_attention_with_open_gates_is_causal_attention():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 50, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    out = train_gate.soft_gated_attention(q, k, v, torch.ones(1, 2, 50), window=7, block=16)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                               rtol=1e-5, atol=1e-5)


def test_regularizer_hand_computed():
    # N = 4, W = 2: o_s = min(2 / (4 - s), 1) = 1/2, 2/3, 1, 1.
    g = torch.tensor([[[[0.5, 0.1, 0.9, 0.3]]], [[[1.0, 0.0, 0.2, 0.2]]]])       # (L=2, B=1, Hkv=1, N=4)
    # layer 0: 1/2 + 1/2 * 0.75 = 0.875; 2/3 + 1/3 * 0.19 = 0.73; 1; 1
    # layer 1: 1/2 + 1/2 * 1 = 1;        2/3 + 1/3 * 0 = 2/3;     1; 1
    expected = (0.875 + (2 / 3 + 0.19 / 3) + 1 + 1 + 1 + 2 / 3 + 1 + 1) / 8
    assert train_gate.regularizer(g, window=2).item() == pytest.approx(expected, rel=1e-6)


def test_learning_rate_schedule():
    lrs = [train_gate.learning_rate(s, 100, 1e-3, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)           # linear warm-up over 10 steps
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] < 1e-6                           # then cosine towards 0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_samples_are_the_document_in_a_user_turn(tiny):
    model_dir, docs_dir = tiny
    tok = ChatTokenizer(model_dir)
    prefix = chat_prefix(tok)
    assert tok.decode(prefix, skip_special_tokens=False) == "<|im_start|>user\nPlease analyze and summarize the following text:\n\n"
    docs = read_documents(docs_dir)
    ids = [tok.encode(text, add_special_tokens=False) for _, text in docs]
    samples = make_samples(ids, prefix, 64)
    piece = 64 - len(prefix)
    assert samples.shape == (sum(len(d) // piece for d in ids), 64)
    assert samples[0].tolist() == prefix + ids[0][:piece] and samples[1].tolist() == prefix + ids[0][piece:2 * piece]


def test_a_step_trains_only_the_gates(tiny):
    model_dir, docs_dir = tiny
    model = Transformer.from_pretrained(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    gates = train_gate.build_gates(model, 0)
    gates_before = [p.detach().clone() for p in gates.parameters()]
    optimizer = torch.optim.AdamW(gates.parameters(), lr=1e-2)
    distiller = train_gate.Distiller(model, gates, window=8, threshold=0.1, block=16)
    x = torch.randint(0, model.config.vocab_size, (1, 48))
    loss, stats = distiller.loss(x, lam=0.1)
    loss.backward()
    optimizer.step()
    gate_ids = {id(p) for p in gates.parameters()}
    frozen = [p for p in model.parameters() if id(p) not in gate_ids]   # the gates sit inside the wired model
    # 2 + 6 per layer: two norms, wqkv, wo, w13, w2
    assert len(frozen) == 2 + 6 * 2 and all(p.grad is None and not p.requires_grad for p in frozen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(gates_before, gates.parameters()))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # the model's own tensors, bit for bit
    assert stats.shape == (6,) and 0 <= stats[3] <= 1 and stats[5] == 0   # no answer positions given


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny):
    model_dir, _ = tiny
    model = Transformer.from_pretrained(model_dir)
    torch.manual_seed(0)
    gates = train_gate.build_gates(model, 0)
    x = torch.randint(0, model.config.vocab_size, (1, 48))
    results = []
    for recompute in (False, True):
        gates.zero_grad()
        saved = []   # the tensors autograd keeps for backward, outside what checkpointing recomputes
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss, _ = train_gate.Distiller(model, gates, 8, 0.1, 16, activation_checkpointing=recompute).loss(x, lam=0.1)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in gates.parameters()], sum(saved)))
    (loss_plain, grads_plain, saved_plain), (loss_recomputed, grads_recomputed, saved_recomputed) = results
    assert saved_recomputed < saved_plain / 2
    torch.testing.assert_close(loss_recomputed, loss_plain, rtol=0, atol=0)
    for a, b in zip(grads_recomputed, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_loss_falls_and_lambda_sets_sparsity(tiny, tmp_path):
    model_dir, _ = tiny
    one_sample = make_docs(tmp_path / "one", n=1, repeat=2)   # every step sees the same sequence
    finals = {}
    for lam in (0.0, 1.0):
        out = tmp_path / f"run{lam}"
        train_gate.train(**run_args(model_dir, one_sample, out, lam=lam, steps=12, lr=3e-2, warmup=0.0, save_every=100))
        rows = log(out)
        assert len(rows) == 12 and all(r["step"] == i + 1 for i, r in enumerate(rows))
        if lam == 0.0:
            assert rows[-1]["distill"] < 0.7 * rows[0]["distill"]
        else:
            assert rows[-1]["loss"] < rows[0]["loss"]
        finals[lam] = rows[-1]["admitted"]
        gates, meta = load_gates(out / "gate.safetensors")
        assert len(gates) == 2 and meta["lambda"] == lam and meta["window"] == 8
    assert finals[1.0] < finals[0.0]


def test_export_writes_a_16_bit_gate_file(tiny, tmp_path, monkeypatch):
    model_dir, docs_dir = tiny
    out = tmp_path / "run"
    train_gate.train(**run_args(model_dir, docs_dir, out, steps=2))
    target = tmp_path / "gates" / "tiny-0.05.safetensors"
    train_gate.train(**run_args(model_dir, docs_dir, out, steps=2, export=str(target)))
    assert {t.dtype for t in load_file(target).values()} == {torch.float16}
    gates, meta = load_gates(target)
    assert meta["lambda"] == 0.05 and json.loads(meta["training"])["steps"] == 2
    full, full_meta = load_gates(out / "gate.safetensors")
    torch.testing.assert_close(gates[1].w1, full[1].w1, rtol=1e-3, atol=1e-4)
    # One setting, the default, at the trained tau: the admission per layer, measured on the run's training
    # samples, sizes the page pool by default; unnamed, it is named after that admission in whole percent.
    admitted = full_meta["settings"][full_meta["default_setting"]]["admitted_per_layer"]
    name = f"{round(100 * sum(admitted) / len(admitted))}%"
    assert meta["settings"] == full_meta["settings"] == {name: {"threshold": 0.1, "admitted_per_layer": admitted}}
    assert meta["default_setting"] == name and len(admitted) == 2 and all(0 <= a <= 1 for a in admitted)
    # A stricter tau at export: the same weights, the file's setting at it, its admission measured there.
    strict = tmp_path / "gates" / "tiny-0.05-strict.safetensors"
    monkeypatch.setattr(sys, "argv", ["train_gate.py", "--out", str(out), "--threshold", "0.5", "--export", str(strict),
                                      "--setting", "strict"])
    train_gate.train(**run_args(model_dir, docs_dir, out, steps=2, threshold=0.5, export=str(strict), setting="strict"))
    strict_gates, strict_meta = load_gates(strict)
    assert list(strict_meta["settings"]) == ["strict"] and strict_meta["default_setting"] == "strict"
    assert strict_meta["settings"]["strict"]["threshold"] == 0.5
    assert json.loads(strict_meta["training"])["threshold"] == 0.1
    # the file's record ends with the command that wrote it, after the run's own
    commands = json.loads(strict_meta["training"])["commands"]
    assert commands[:-1] == json.loads(full_meta["training"])["commands"] and len(commands) == 2
    assert commands[-1] == f"train_gate.py --out {out} --threshold 0.5 --export {strict} --setting strict"
    assert all(torch.equal(a, b) for g, h in zip(gates, strict_gates) for a, b in zip(g.parameters(), h.parameters()))
    distiller = train_gate.Distiller(Transformer.from_pretrained(str(model_dir), dtype=torch.float32, device="cpu"),
                                     torch.nn.ModuleList(full), window=8, threshold=0.5)   # the run's float32 gates
    samples, _, n_prose = train_gate.load_samples(out)
    rows = [train_gate.sample_row(i, n_prose, samples.shape[0] - n_prose, 0.0, seed=0) for i in range(2)]
    strict_admitted = strict_meta["settings"]["strict"]["admitted_per_layer"]
    assert strict_admitted == train_gate.measure_admission(distiller, samples, rows, "cpu")
    assert all(s <= a for s, a in zip(strict_admitted, admitted))


@pytest.mark.parametrize("problem", ["missing data", "empty data", "too long", "existing run", "nothing to resume",
                                     "resume with other settings", "export with other settings",
                                     "export with a tau out of range", "export with an '@' in the setting"])
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, problem, capsys):
    model_dir, docs_dir = tiny
    (tmp_path / "empty").mkdir()
    (tmp_path / "existing").mkdir()
    torch.save({"args": run_args(model_dir, docs_dir, tmp_path / "existing"), "step": 1}, tmp_path / "existing" / "checkpoint.pt")
    args = run_args(model_dir, docs_dir, tmp_path / "new")
    args |= {"missing data": dict(data=str(tmp_path / "nope")), "empty data": dict(data=str(tmp_path / "empty")),
             "too long": dict(seq_len=1000), "existing run": dict(out=str(tmp_path / "existing")),
             "nothing to resume": dict(resume=True),
             "resume with other settings": dict(out=str(tmp_path / "existing"), resume=True, lam=0.5),
             "export with other settings": dict(out=str(tmp_path / "existing"), export=str(tmp_path / "g.safetensors"),
                                                lam=0.5),
             "export with a tau out of range": dict(out=str(tmp_path / "existing"),
                                                    export=str(tmp_path / "g.safetensors"), threshold=1.5),
             "export with an '@' in the setting": dict(out=str(tmp_path / "existing"),
                                                       export=str(tmp_path / "g.safetensors"), setting="a@b")}[problem]
    with pytest.raises(SystemExit) as e:
        train_gate.main(**args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_gate.py: ")


def uninterrupted(args: dict, out: Path) -> tuple[list[dict], list[str]]:
    """The log of the run `args` trained in one go, and the command line of the same run into `out`, to be
    interrupted and resumed."""
    train_gate.train(**args)
    return log(Path(args["out"])), [sys.executable, str(REPO / "train_gate.py")] + cli(args | dict(out=str(out)))


def wait_for_steps(proc: subprocess.Popen, run: Path, steps: int, poll: float) -> None:
    """Wait until the training process has logged `steps` steps in run/log.jsonl; it must not stop before."""
    while not (run / "log.jsonl").exists() or len((run / "log.jsonl").read_text().splitlines()) < steps:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(poll)


def test_interrupt_nan_and_resume_follow_the_uninterrupted_trajectory(tmp_path):
    model_dir, docs_dir = make_tiny_model(tmp_path / "model"), make_docs(tmp_path / "docs")
    args = run_args(model_dir, docs_dir, tmp_path / "whole", steps=40, save_every=100)
    out = tmp_path / "parts"
    whole, cmd = uninterrupted(args, out)

    # Ctrl-C in the middle: the run saves after the current step and exits 130.
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    wait_for_steps(proc, out, 3, poll=0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, proc.stderr.read()
    stopped = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= stopped < 40

    # A model that turns NaN: the run stops before updating anything and keeps the last good checkpoint.
    weights = load_file(model_dir / "model.safetensors")
    broken = dict(weights, **{"model.layers.1.self_attn.o_proj.weight": torch.full((32, 32), float("nan"))})
    save_file(broken, str(model_dir / "model.safetensors"))
    result = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "not finite" in result.stderr and f"(step {stopped})" in result.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == stopped

    save_file(weights, str(model_dir / "model.safetensors"))
    train_gate.train(out=str(out), resume=True, device="cpu", block=16, save_every=100, threads=1)   # flags from the run
    parts = log(out)
    assert [r["step"] for r in parts] == list(range(1, 41))
    for a, b in zip(whole, parts):
        assert a["loss"] == b["loss"] and a["admitted"] == b["admitted"], a["step"]
    assert all(torch.equal(a, b) for a, b in zip(load_file(tmp_path / "whole" / "gate.safetensors").values(),
                                                 load_file(out / "gate.safetensors").values()))


def test_two_gloo_processes_match_one_process(tiny, tmp_path):
    model_dir, docs_dir = tiny
    args = run_args(model_dir, docs_dir, tmp_path / "one", batch_size=2, steps=3, save_every=100)
    train_gate.train(**args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29513",
           str(REPO / "train_gate.py")] + cli(args | dict(out=str(tmp_path / "two")))
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = load_file(tmp_path / "one" / "gate.safetensors"), load_file(tmp_path / "two" / "gate.safetensors")
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(log(tmp_path / "one"), log(tmp_path / "two")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The retrieval mix (issue 13)

def test_answer_weighted_loss_is_its_definition_and_weight_0_is_the_old_loss(tiny):
    model_dir, _ = tiny
    model = Transformer.from_pretrained(model_dir)
    torch.manual_seed(0)
    gates = train_gate.build_gates(model, 0)
    distiller = train_gate.Distiller(model, gates, window=8, threshold=0.1, block=16)
    x = torch.randint(0, model.config.vocab_size, (1, 48))
    mask = torch.zeros(1, 48, dtype=torch.bool)
    mask[0, [20, 21, 22, 40]] = True

    def grads(loss):
        loss.backward()
        out = [p.grad.clone() for p in gates.parameters()]
        gates.zero_grad(set_to_none=True)
        return out

    old, old_stats = distiller.loss(x, lam=0.1)
    old_grads = grads(old)
    zero, zero_stats = distiller.loss(x, lam=0.1, answer_mask=mask, answer_weight=0.0)
    assert torch.equal(zero, old) and all(torch.equal(a, b) for a, b in zip(grads(zero), old_grads))
    weighted, stats = distiller.loss(x, lam=0.1, answer_mask=mask, answer_weight=3.0)
    # The definition, from the two passes by hand: all-position MSE + 3 x MSE at the answer positions + lambda x reg.
    distiller.wire(student=False)
    with torch.no_grad():
        target = model.body(x).float()
    distiller.wire(student=True)
    hidden = model.body(x).float()
    gs = torch.stack([a.g for a in distiller.attns])
    sq = (hidden - target) ** 2                                                                # (1, T, dim)
    expected = sq.mean() + 3.0 * sq[0, [20, 21, 22, 40]].mean() + 0.1 * train_gate.regularizer(gs, 8)
    torch.testing.assert_close(weighted, expected, rtol=1e-6, atol=0)
    assert stats[5] == pytest.approx(sq[0, [20, 21, 22, 40]].mean().item(), rel=1e-6) and stats[5] > 0
    assert zero_stats[5] == stats[5] and old_stats[5] == 0
    expected_grads = grads(expected)
    # Two float32 graphs of the same sum, reduced in different orders: on this project's CPU one gradient entry
    # of 1.2e-4 differed by 1.8e-8 (1.5e-4 relative), so 1e-5 was tighter than float32 backprop holds.
    for a, b in zip(grads(weighted), expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_sample_rows_follow_the_mix_and_mix_0_is_the_prose_order():
    assert [train_gate.sample_row(i, 10, 5, 0.0, 3) for i in range(30)] == \
        [train_gate.sample_index(i, 10, 3) for i in range(30)]
    rows = [train_gate.sample_row(i, 10, 5, 0.3, 3) for i in range(2000)]
    share = sum(r >= 10 for r in rows) / len(rows)
    assert 0.25 < share < 0.35 and set(rows) == set(range(15))
    assert rows == [train_gate.sample_row(i, 10, 5, 0.3, 3) for i in range(2000)]


def retrieval_args(model_dir, docs_dir, out, **overrides):
    return run_args(model_dir, docs_dir, out, seq_len=256, retrieval_mix=0.5, retrieval_samples=6, answer_weight=2.0,
                    **overrides)


def test_a_retrieval_run_trains_on_training_text_only_and_records_its_mix(tiny, tmp_path):
    model_dir, docs_dir = tiny
    heldout = tmp_path / "heldout"
    heldout.mkdir()
    (heldout / "secret.txt").write_text("Zebras quarrelled over xylophones. " * 40)
    out = tmp_path / "run"
    train_gate.train(**retrieval_args(model_dir, docs_dir, out, steps=8, save_every=100))
    saved = torch.load(out / "samples.pt", weights_only=True)
    n_prose = saved["prose"]
    assert saved["ids"].shape[0] == n_prose + 6 and not saved["answer_mask"][:n_prose].any()
    assert saved["answer_mask"][n_prose:].any(dim=1).all()
    tok = ChatTokenizer(model_dir)
    texts = [tok.decode(row) for row in saved["ids"].tolist()]
    assert not any("Zebras" in t or "xylophones" in t for t in texts) and any("admission" in t for t in texts)
    rows = log(out)
    assert any(r["answer"] is not None for r in rows) and any(r["answer"] is None for r in rows)
    _, meta = load_gates(out / "gate.safetensors")
    training = json.loads(meta["training"])
    assert (training["retrieval_mix"], training["retrieval_samples"], training["answer_weight"]) == (0.5, 6, 2.0)
    assert training["commands"] and training["init"] is None


def test_init_starts_from_a_gate_file(tiny, tmp_path):
    model_dir, docs_dir = tiny
    first = tmp_path / "first"
    train_gate.train(**run_args(model_dir, docs_dir, first, steps=3, save_every=100))
    second = tmp_path / "second"
    train_gate.train(**run_args(model_dir, docs_dir, second, steps=1, lr=1e-12, warmup=0.0, save_every=100,
                                init=str(first / "gate.safetensors")))
    a, b = load_file(first / "gate.safetensors"), load_file(second / "gate.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-9)   # an lr of 1e-12 barely moves them
    assert json.loads(load_gates(second / "gate.safetensors")[1]["training"])["init"] == str(first / "gate.safetensors")
    with pytest.raises(train_gate.TrainError, match="--init"):
        train_gate.train(**run_args(model_dir, docs_dir, tmp_path / "third", steps=1, init=str(tmp_path / "none.safetensors")))


def test_sigkill_resumes_from_the_last_checkpoint_on_the_uninterrupted_trajectory(tmp_path):
    model_dir, docs_dir = make_tiny_model(tmp_path / "model"), make_docs(tmp_path / "docs")
    args = retrieval_args(model_dir, docs_dir, tmp_path / "whole", steps=30, save_every=3)
    out = tmp_path / "parts"
    whole, cmd = uninterrupted(args, out)
    for kill_after in (5, 14):   # kill twice, the second time a resumed process
        proc = subprocess.Popen(cmd + (["--resume"] if kill_after > 5 else []), cwd=REPO, stderr=subprocess.PIPE, text=True)
        wait_for_steps(proc, out, kill_after, poll=0.005)
        proc.kill()   # SIGKILL: no handler runs, nothing is saved
        proc.wait(timeout=60)
        done = len((out / "log.jsonl").read_text().splitlines())
        saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
        assert done - 3 <= saved <= done and saved % 3 == 0   # at most --save-every steps lost
    # A checkpoint half-written when the process died, and a torn last log line, are never read.
    (out / "checkpoint.pt.tmp").write_bytes(b"PK\x03\x04 half a zip")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 99, "lo')
    train_gate.train(out=str(out), resume=True, device="cpu", block=16, save_every=3, threads=1)
    parts = log(out)
    assert [r["step"] for r in parts] == list(range(1, 31))
    for a, b in zip(whole, parts):
        assert a["loss"] == b["loss"] and a["answer"] == b["answer"] and a["admitted"] == b["admitted"], a["step"]
    assert all(torch.equal(a, b) for a, b in zip(load_file(tmp_path / "whole" / "gate.safetensors").values(),
                                                 load_file(out / "gate.safetensors").values()))


def test_record_admission_adds_or_replaces_a_setting(tiny, tmp_path, monkeypatch):
    """A gate file from before settings (one tau, no admission) gets its admission measured on the training split
    as an export measures it; a new tau adds its setting, which becomes the default; a tau the file has measures
    that setting again, in its place; its gates are untouched and its record grows by each command."""
    model_dir, docs_dir = tiny
    out = tmp_path / "run"
    train_gate.train(**run_args(model_dir, docs_dir, out, steps=2))
    gates, meta = load_gates(out / "gate.safetensors")
    trained = json.loads(meta["training"])
    # Also from before training.threshold was recorded: its single tau then was the trained one.
    old = tmp_path / "old.safetensors"
    older = {k: v for k, v in trained.items() if k != "threshold"}
    save_gates(old, gates, {"window": 8, "lambda": 0.05, "threshold": 0.1, "training": older}, dtype=torch.float16)
    before = load_file(old)
    record = lambda **kw: train_gate.record_admission(str(old), str(model_dir), str(docs_dir), None, "cpu", **kw)
    monkeypatch.setattr(sys, "argv", ["train_gate.py", "--record-admission", str(old)])
    admitted = record()
    _, after = load_gates(old)
    assert after["settings"] == {"tau0.1": {"threshold": 0.1, "admitted_per_layer": admitted}}
    assert after["default_setting"] == "tau0.1" and len(admitted) == 2 and all(0 <= a <= 1 for a in admitted)
    assert json.loads(after["training"]) == older | {"threshold": 0.1, "commands": trained["commands"] +
                                                     [f"train_gate.py --record-admission {old}"]}
    # A new tau: its setting is added, named after its admission, and becomes the default.
    monkeypatch.setattr(sys, "argv", ["train_gate.py", "--record-admission", str(old), "--threshold", "0.5"])
    strict = record(threshold=0.5)
    name = f"{round(100 * sum(strict) / len(strict))}%"
    _, after = load_gates(old)
    assert after["settings"] == {"tau0.1": {"threshold": 0.1, "admitted_per_layer": admitted},
                                 name: {"threshold": 0.5, "admitted_per_layer": strict}}
    assert after["default_setting"] == name and strict != admitted and all(s <= a for s, a in zip(strict, admitted))
    assert json.loads(after["training"])["commands"][-1] == f"train_gate.py --record-admission {old} --threshold 0.5"
    # A tau the file has: measured again in its place, renamed by --setting; --setting alone picks its tau.
    assert record(threshold=0.1, setting="loose") == admitted
    _, after = load_gates(old)
    assert list(after["settings"]) == ["loose", name] and after["default_setting"] == "loose"
    assert after["settings"]["loose"] == {"threshold": 0.1, "admitted_per_layer": admitted}
    assert record(setting=name) == strict and load_gates(old)[1]["default_setting"] == name
    # A name that another tau holds would make FILE@NAME mean two things: refused before measuring.
    with pytest.raises(train_gate.TrainError, match=f"has the setting {name} at tau 0.5 already"):
        record(threshold=0.3, setting=name)
    with pytest.raises(train_gate.TrainError, match="threshold"):
        record(threshold=1.5)
    assert all(torch.equal(before[k], t) for k, t in load_file(old).items())
