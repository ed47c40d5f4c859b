"""Train the write gates by self-distillation (DESIGN.md, Training); the model stays frozen.

Teacher: the model with full causal attention, under no_grad. Student: the same model where every key
at least W behind the query has log g added to its attention logit (soft admission; gradients reach g
through the softmax). Loss = MSE of the final normed hidden states + lambda * the lifetime-weighted
regularizer. AdamW (lr 1e-3, wd 0.01), 10% linear warm-up then cosine to 0; gates in float32.

    python data.py                                        # once: the offline corpora under data/
    python train_gate.py --lambda 0.16                    # the embedded SmolLM2 on data/train
    python train_gate.py --out runs/gate-0.16 --resume    # continue from the run's last checkpoint
    torchrun --nproc_per_node 2 train_gate.py --lambda 0.16   # data parallel (gloo on CPU, NCCL on GPU)
    python train_gate.py --out runs/gate-0.16 --export gates/my-gate.safetensors --setting 40%
    python train_gate.py --record-admission gates/my-gate.safetensors --threshold 0.46 --setting 20%   # a 2nd setting

Progress goes to stderr (one line per step) and to OUT/log.jsonl; OUT/checkpoint.pt is rewritten
atomically every --save-every steps, on Ctrl-C and at the end, when OUT/gate.safetensors is written too.
"""
import argparse
import json
import math
import os
import platform
import random
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from convert_gguf import checkpoint_or_default
from data import DataError, chat_prefix, make_retrieval_samples, make_samples, read_documents
from gate import WriteGate, check_fits, load_gates, save_gates
from model import CheckpointError, Transformer
from tokenizer import Tokenizer

# The flags that fix a run's trajectory, with their defaults (checkpoint None: the embedded SmolLM2).
# --resume takes them from the checkpoint; one given again must agree with it.
# The retrieval settings default to the prose-only recipe, which is also what a run saved before they existed did.
TRAJECTORY = dict(checkpoint=None, data="data/train", seq_len=1024, steps=1000, batch_size=1, lam=0.16, window=256,
                  threshold=0.1, lr=1e-3, weight_decay=0.01, warmup=0.1, hidden=0, seed=0, dtype="float32",
                  retrieval_mix=0.0, retrieval_samples=1024, answer_weight=0.0, init=None)


class TrainError(Exception):
    """A run that cannot go on as asked; the message names the problem in one line."""


class NonFiniteLoss(TrainError):
    """The loss became NaN or infinite: the run stops without updating the gates."""


# ---------------------------------------------------------------------------------------------
# The student's attention: soft admission without a T x T bias for all heads

class _SoftGatedAttention(torch.autograd.Function):
    """Causal softmax attention with log g_j added to the logit of each key j at least W behind the query.

    Computed one block of queries at a time, flash-attention style: forward keeps only the output and
    the log-sum-exp, backward recomputes each block's probabilities. Memory is O(Hq * block * T) for
    the working block instead of O(Hq * T * T) per layer, so 8k tokens train on a CPU. FlexAttention's
    score_mod would express the same thing, but it has no backward on the CPU."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, log_g: Tensor, window: int, block: int) -> Tensor:
        B, Hq, T, D = q.shape
        Hkv = k.shape[1]
        G = Hq // Hkv
        f32 = torch.promote_types(q.dtype, torch.float32)   # at least float32 (float64 for gradcheck)
        qf = q.to(f32).view(B, Hkv, G, T, D)                                                  # (B, Hkv, G, T, D)
        kf, vf = k.to(f32), v.to(f32)                                                         # (B, Hkv, T, D)
        o = torch.empty_like(qf)                                                              # (B, Hkv, G, T, D)
        lse = qf.new_empty(B, Hkv, G, T)                                                      # (B, Hkv, G, T)
        for s in range(0, T, block):
            e = min(s + block, T)
            scores, _ = _block_scores(qf[:, :, :, s:e], kf[:, :, :e], log_g[:, :, :e].to(f32), s, window)
            lse[:, :, :, s:e] = torch.logsumexp(scores, dim=-1)
            p = torch.exp(scores - lse[:, :, :, s:e, None])                                   # (B, Hkv, G, Tb, e)
            o[:, :, :, s:e] = (p.view(B, Hkv, -1, e) @ vf[:, :, :e]).view(B, Hkv, G, e - s, D)
        ctx.save_for_backward(q, k, v, log_g, o, lse)
        ctx.window, ctx.block = window, block
        return o.view(B, Hq, T, D).to(q.dtype)

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, log_g, o, lse = ctx.saved_tensors
        B, Hq, T, D = q.shape
        Hkv = k.shape[1]
        G = Hq // Hkv
        f32 = o.dtype
        qf, kf, vf = q.to(f32).view(B, Hkv, G, T, D), k.to(f32), v.to(f32)
        dof = do.to(f32).view(B, Hkv, G, T, D)                                                # (B, Hkv, G, T, D)
        delta = (dof * o).sum(-1)                                                             # (B, Hkv, G, T)
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        dlog_g = torch.zeros_like(log_g, dtype=f32)                                           # (B, Hkv, T)
        scale = D ** -0.5
        for s in range(0, T, ctx.block):
            e = min(s + ctx.block, T)
            scores, far = _block_scores(qf[:, :, :, s:e], kf[:, :, :e], log_g[:, :, :e].to(f32), s, ctx.window)
            p = torch.exp(scores - lse[:, :, :, s:e, None])                                   # (B, Hkv, G, Tb, e)
            do_b = dof[:, :, :, s:e].reshape(B, Hkv, -1, D)                                    # (B, Hkv, G*Tb, D)
            dv[:, :, :e] += p.view(B, Hkv, -1, e).transpose(-1, -2) @ do_b
            dp = (do_b @ vf[:, :, :e].transpose(-1, -2)).view_as(p)                            # (B, Hkv, G, Tb, e)
            ds = p * (dp - delta[:, :, :, s:e, None])                                          # d loss / d logit
            dlog_g[:, :, :e] += (ds.sum(2) * far).sum(-2)                                      # log g enters far logits as is
            ds = ds.view(B, Hkv, -1, e)                                                        # (B, Hkv, G*Tb, e)
            dq[:, :, :, s:e] = (ds @ kf[:, :, :e]).view(B, Hkv, G, e - s, D) * scale
            dk[:, :, :e] += ds.transpose(-1, -2) @ qf[:, :, :, s:e].reshape(B, Hkv, -1, D) * scale
        return dq.view(B, Hq, T, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dlog_g.to(log_g.dtype), None, None


def _block_scores(q: Tensor, k: Tensor, log_g: Tensor, start: int, window: int) -> tuple[Tensor, Tensor]:
    """Logits of queries start..start+Tb-1 over keys 0..e-1: scaled q.k, + log g where i - j >= W, -inf where j > i.

    q: (B, Hkv, G, Tb, D); k: (B, Hkv, e, D); log_g: (B, Hkv, e). Returns scores (B, Hkv, G, Tb, e) and
    the far mask (Tb, e)."""
    B, Hkv, G, Tb, D = q.shape
    e = k.shape[2]
    scores = (q.reshape(B, Hkv, G * Tb, D) @ k.transpose(-1, -2)).view(B, Hkv, G, Tb, e) * D ** -0.5
    i = torch.arange(start, start + Tb, device=q.device)[:, None]                              # (Tb, 1)
    j = torch.arange(e, device=q.device)[None, :]                                              # (1, e)
    far = i - j >= window                                                                      # (Tb, e)
    bias = torch.where(far, log_g[:, :, None, :], 0.0).masked_fill(j > i, float("-inf"))       # (B, Hkv, Tb, e)
    return scores + bias[:, :, None], far


def soft_gated_attention(q: Tensor, k: Tensor, v: Tensor, g: Tensor, window: int, block: int = 256) -> Tensor:
    """q: (B, Hq, T, D); k, v: (B, Hkv, T, D); g: (B, Hkv, T) in (0, 1] -> (B, Hq, T, D) in q's dtype."""
    return _SoftGatedAttention.apply(q, k, v, torch.log(g), window, block)


class SoftGatedAttention(nn.Module):
    """The student's per-layer attention, in the place of a cache: cache(q, k, v, g, input_pos).
    It keeps the layer's g of the last call, which the regularizer reads."""

    def __init__(self, window: int, block: int):
        super().__init__()
        self.window, self.block = window, block
        self.g: Tensor | None = None   # (B, Hkv, T)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, input_pos: Tensor) -> Tensor:
        self.g = g
        return soft_gated_attention(q, k, v, g, self.window, self.block)


class Distiller:
    """The teacher and the student of one frozen model: the same layers, wired to the gates and the
    soft-gated attention for the student pass only."""

    def __init__(self, model: Transformer, gates: nn.ModuleList, window: int, threshold: float, block: int = 256,
                 activation_checkpointing: bool = False):
        self.model, self.gates, self.window, self.threshold = model, gates, window, threshold
        self.blocks, self.recompute = list(model.layers), activation_checkpointing
        self.attns = [SoftGatedAttention(window, block) for _ in self.blocks]

    def wire(self, student: bool) -> None:
        for b, gate, attn in zip(self.blocks, self.gates, self.attns):
            b.attention.gate, b.attention.cache = (gate, attn) if student else (None, None)

    def loss(self, x: Tensor, lam: float, answer_mask: Tensor | None = None, answer_weight: float = 0.0
             ) -> tuple[Tensor, Tensor]:
        """x: (B, T) token ids -> the loss to back-propagate, and (loss, distill, reg, admitted share,
        mean g, answer distill) as a float64 CPU tensor of statistics.

        answer_mask: (B, T), True at the positions that predict an answer token. Their MSE, weighted by
        answer_weight, joins the loss: the all-position mean hardly sees the few positions where a token far
        behind the window is needed. Without answer positions (or at weight 0) the loss is the paper's."""
        self.wire(student=False)
        with torch.no_grad():
            target = self.model.body(x).float()                                               # (B, T, dim)
        self.wire(student=True)
        hidden_states = self.model.body(x, recompute=self.recompute).float()                  # (B, T, dim)
        gs = torch.stack([a.g for a in self.attns])                                           # (L, B, Hkv, T)
        for a in self.attns:
            a.g = None
        distill = F.mse_loss(hidden_states, target)
        reg = regularizer(gs, self.window)
        loss = distill + lam * reg
        answer = torch.zeros_like(distill)
        if answer_mask is not None and answer_mask.any():
            answer = F.mse_loss(hidden_states[answer_mask], target[answer_mask])                # over (n_answer, dim)
            if answer_weight:
                loss = loss + answer_weight * answer
        with torch.no_grad():
            stats = torch.stack([loss, distill, reg, (gs > self.threshold).float().mean(), gs.mean(), answer])
        return loss, stats.double().cpu()


def regularizer(gs: Tensor, window: int) -> Tensor:
    """The authors' sparsity penalty: mean over (layer, batch, head, s) of o_s + (1 - o_s)(1 - (1 - g_s)^2),
    o_s = min(W / (N - s), 1), the share of key s's future queries that see it inside the window anyway.

    gs: (L, B, Hkv, N) -> scalar. 1 - (1 - g)^2 equals g at 0 and 1 and is concave, pushing g to 0 or 1."""
    N = gs.shape[-1]
    s = torch.arange(N, device=gs.device, dtype=torch.float32)
    o = (window / (N - s)).clamp(max=1.0)                                                     # (N,)
    return (o + (1 - o) * (1 - (1 - gs) ** 2)).mean()


def learning_rate(step: int, steps: int, lr: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` share of steps, then cosine to 0 (step counts from 0)."""
    n_warm = max(1, round(warmup * steps))
    if step < n_warm:
        return lr * (step + 1) / n_warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))


def sample_index(i: int, n: int, seed: int) -> int:
    """The i-th draw from n samples: epoch i // n visits all n samples in its own seeded order,
    so the data order is a pure function of (seed, step) and a resumed run sees what it would have."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + i // n))
    return int(order[i % n])


def sample_row(i: int, n_prose: int, n_retrieval: int, mix: float, seed: int) -> int:
    """Row of the run's samples (prose rows first, then retrieval rows) that the i-th sample of the run reads:
    a retrieval sample with probability mix, decided by (seed, i) alone. At mix 0 the prose order of a
    prose-only run."""
    if n_retrieval and random.Random(f"mix/{seed}/{i}").random() < mix:
        return n_prose + sample_index(i, n_retrieval, seed + 1)
    return sample_index(i, n_prose, seed)


# ---------------------------------------------------------------------------------------------
# The run

def format_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


ADMISSION_SAMPLES = 8


def measure_admission(distiller: "Distiller", samples: Tensor, rows: list[int], device: str) -> list[float]:
    """Per layer, the share of tokens whose g > tau over the given training samples, in the student's pass as
    training runs it: what the gate admits in training, which sizes the page pool by default (gate.py)."""
    shares = []
    distiller.wire(student=True)
    with torch.no_grad():
        for row in rows:
            distiller.model.body(samples[row][None].to(device))
            shares.append(torch.stack([(a.g > distiller.threshold).float().mean() for a in distiller.attns]).cpu())
            for a in distiller.attns:
                a.g = None
    distiller.wire(student=False)
    return [round(x, 4) for x in torch.stack(shares).mean(0).tolist()]


def run_admission(run: Path, gates: nn.ModuleList, args: dict, device: str, distiller: "Distiller | None" = None) -> list[float]:
    """measure_admission on the first ADMISSION_SAMPLES samples the run trained on (building the model if needed)."""
    samples, _, n_prose = load_samples(run)
    rows = [sample_row(i, n_prose, samples.shape[0] - n_prose, args.get("retrieval_mix", 0.0), args["seed"])
            for i in range(min(ADMISSION_SAMPLES, args["steps"] * args["batch_size"]))]
    if distiller is None:
        model = Transformer.from_pretrained(args["checkpoint"], dtype=getattr(torch, args["dtype"]), device=device)
        distiller = Distiller(model, gates.to(device), args["window"], args["threshold"])
    return measure_admission(distiller, samples, rows, device)


def tokenized_documents(checkpoint: str, data: str) -> tuple[Tokenizer, list, list[list[int]]]:
    """The checkpoint's tokenizer, the documents under data ((name, text) pairs) and their token ids."""
    tok = Tokenizer(checkpoint)
    docs = read_documents(data)
    return tok, docs, [e.ids for e in tok.backend.encode_batch([text for _, text in docs], add_special_tokens=False)]


def record_admission(path: str, checkpoint: str | None, data: str | None, seq_len: int | None, device: str | None,
                     threshold: float | None = None, setting: str | None = None) -> list[float]:
    """Measure a gate file's admission per layer on the training split (measure_admission on the first
    ADMISSION_SAMPLES samples of a seed-0 run's order, at the sequence length it was trained at unless
    given) at one tau, and write it into the file as the setting of that tau, which becomes the file's default
    (as --export's one setting is). The tau: threshold, else the setting named's, else the default setting's.

    The setting at that tau, if the file has one, is replaced (and renamed to setting, if given); else one is
    added, named setting or after its admission ("20%"). The file keeps its trained tau under training.threshold
    and adds this command to its training.commands (the gate file's twin of --export's). A file without
    training.threshold is an export from before that record, whose single tau was always the trained one."""
    check_file_setting(threshold, setting)
    gates, metadata = load_gates(path)
    settings, default = metadata["settings"], metadata["default_setting"]
    tau = threshold if threshold is not None else settings.get(setting, settings[default])["threshold"]
    name = setting or next((n for n, s in settings.items() if s["threshold"] == tau), None)
    check_setting_free(settings, name, tau, path)       # before the measurement, which takes minutes
    training = json.loads(metadata.get("training", "{}"))
    training.setdefault("threshold", settings[default]["threshold"])
    training["commands"] = training.get("commands", []) + [command_line()]
    checkpoint = str(checkpoint_or_default(checkpoint))
    seq_len = seq_len or training.get("seq_len") or TRAJECTORY["seq_len"]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Transformer.from_pretrained(checkpoint, dtype=torch.float32, device=device)
    check_fits(gates, model, path)
    tok, _, ids = tokenized_documents(checkpoint, data or TRAJECTORY["data"])
    samples = make_samples(ids, chat_prefix(tok), seq_len)                                    # (N, seq_len)
    rows = [sample_index(i, samples.shape[0], 0) for i in range(min(ADMISSION_SAMPLES, samples.shape[0]))]
    gates = nn.ModuleList(gates).to(device)
    admitted = measure_admission(Distiller(model, gates, metadata.get("window", TRAJECTORY["window"]), tau),
                                 samples, rows, device)
    name = name or admission_name(admitted)
    check_setting_free(settings, name, tau, path)
    from safetensors.torch import load_file
    dtype = next(iter(load_file(path).values())).dtype                                        # keep the file's precision
    save_gates(path, list(gates), metadata | {"settings": put_setting(settings, name, tau, admitted),
                                              "default_setting": name, "training": training}, dtype=dtype)
    return admitted


def admission_name(admitted_per_layer: list[float]) -> str:
    """A setting's name when none is given: its measured admission in whole percent, e.g. "20%"."""
    return f"{round(100 * sum(admitted_per_layer) / len(admitted_per_layer))}%"


def check_setting_free(settings: dict, name: str | None, tau: float, path: str) -> None:
    """A setting is its tau: a name held by another tau would make FILE@NAME mean two things."""
    if name in settings and settings[name]["threshold"] != tau:
        raise TrainError(f"{path} has the setting {name} at tau {settings[name]['threshold']:g} already; "
                         f"name the one at tau {tau:g} with another --setting")


def put_setting(settings: dict, name: str, tau: float, admitted_per_layer: list[float]) -> dict:
    """settings with name at tau, in the place of the setting at tau if there is one (renamed), else added last."""
    new = {name: {"threshold": tau, "admitted_per_layer": admitted_per_layer}}
    placed = {}
    for n, s in settings.items():
        placed |= new if s["threshold"] == tau else {n: s}
    return placed if name in placed else placed | new


def export_gates(run: Path, gates: nn.ModuleList, state: dict, path: Path, dtype: torch.dtype,
                 admitted_per_layer: list[float], threshold: float | None = None, setting: str | None = None) -> None:
    """Write the gate file (gate.py's format) with what a reader needs to know of its training, and one setting,
    its default: threshold (default: the trained one), at which admitted_per_layer was measured, named setting
    (default: after its admission, "20%"); --record-admission adds others."""
    a = state["args"]
    tau, name = a["threshold"] if threshold is None else threshold, setting or admission_name(admitted_per_layer)
    metadata = {
        "window": a["window"], "lambda": a["lam"],
        "settings": {name: {"threshold": tau, "admitted_per_layer": admitted_per_layer}}, "default_setting": name,
        "base_model": Path(a["checkpoint"]).name,
        "training": {"steps": state["step"], "of_steps": a["steps"], "seq_len": a["seq_len"], "batch_size": a["batch_size"],
                     "threshold": a["threshold"],
                     "lr": a["lr"], "weight_decay": a["weight_decay"], "data": a["data"], "run": str(run),
                     "retrieval_mix": a.get("retrieval_mix", 0.0), "retrieval_samples": a.get("retrieval_samples"),
                     "answer_weight": a.get("answer_weight", 0.0), "init": a.get("init"),
                     "commands": state.get("commands", []),
                     "train_seconds": round(state["elapsed"]), "machine": state["machine"],
                     "final": {k: state["last"].get(k) for k in ("distill", "reg", "admitted", "answer")}
                     if state.get("last") else None},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_gates(path, list(gates), metadata, dtype=dtype)


def check_file_setting(threshold: float | None, setting: str | None) -> None:
    """The setting a gate file gets (--export, --record-admission): admission needs 0 < tau < 1, and FILE@NAME a
    name without '@'."""
    if threshold is not None and not 0 < threshold < 1:
        raise TrainError(f"need 0 < --threshold < 1 (got {threshold})")
    if setting is not None and (not setting or "@" in setting):
        raise TrainError(f"--setting {setting!r}: a name without '@' (--gate FILE@NAME picks it)")


def command_line() -> str:
    """This process's command, as the gate files and checkpoints record it."""
    return shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])


def changed_settings(saved: dict, given: dict, free: tuple[str, ...] = ()) -> list[str]:
    """The given settings, other than the free ones, that differ from a run's saved ones, as 'key old -> new'."""
    return [f"{k} {saved[k]!r} -> {v!r}" for k, v in given.items() if k not in free and saved[k] != v]


def build_gates(model: Transformer, hidden: int) -> nn.ModuleList:
    c = model.config
    return nn.ModuleList(WriteGate(c.n_kv_heads, c.head_dim, hidden) for _ in range(c.n_layers))


def export_run(run: Path, given: dict, export: str, export_dtype: str, device: str | None,
               setting: str | None = None) -> None:
    """--export: write a run's latest gates as a gate file with one setting (named setting, else after its
    admission), at the trained tau or a given one."""
    state = load_checkpoint(run)
    trained = TRAJECTORY | state["args"]
    # tau may differ from training's: it sets admission, and a stricter one trades quality for bytes
    if changed := changed_settings(trained, given, free=("threshold",)):
        raise TrainError(f"--export writes {run} as it was trained, so only --threshold may differ ({'; '.join(changed)})")
    threshold = given.get("threshold", trained["threshold"])
    check_file_setting(threshold, setting)
    gates = nn.ModuleList(WriteGate(*shape) for shape in state["gate_shapes"])
    gates.load_state_dict(state["gates"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    admitted = run_admission(run, gates, trained | {"threshold": threshold}, device)
    # the file's commands end with this one: how it was written (its tau, say) is part of its record
    export_gates(run, gates, state | {"commands": state.get("commands", []) + [command_line()]}, Path(export),
                 getattr(torch, export_dtype), admitted, threshold, setting)
    print(export)
    print(f"exported step {state['step']}/{state['args']['steps']} of {run} ({export_dtype}, tau {threshold:g})", file=sys.stderr)


def run_settings(run: Path, given: dict, resume: bool) -> tuple[dict | None, dict]:
    """The run's checkpoint (None: a new run) and its trajectory settings: with resume, the run's own, which
    the given ones must match; else the given ones over the defaults. Resumes only what was asked, and never
    overwrites a run silently."""
    if resume:
        state = load_checkpoint(run)
        state["args"] = TRAJECTORY | state["args"]   # a run from before a setting existed ran at its default
        if changed := changed_settings(state["args"], given):
            raise TrainError(f"{run}/checkpoint.pt was written with other settings ({'; '.join(changed)}); "
                             f"resume without them or start a new --out")
        return state, dict(state["args"])
    if (run / "checkpoint.pt").exists():
        raise TrainError(f"{run} already holds a checkpoint; pass --resume to continue it or choose another --out")
    args = TRAJECTORY | given
    args["checkpoint"] = str(checkpoint_or_default(args["checkpoint"]))
    args["out"] = str(run)
    return None, args


def check_settings(a: dict, block: int, save_every: int) -> None:
    """Each setting within its range, else TrainError naming it."""
    for name, value, low in (("--seq-len", a["seq_len"], 2), ("--steps", a["steps"], 1),
                             ("--batch-size", a["batch_size"], 1), ("--window", a["window"], 1), ("--block", block, 1),
                             ("--save-every", save_every, 1)):
        if value < low:
            raise TrainError(f"{name} must be at least {low}, got {value}")
    if a["lam"] < 0 or a["lr"] <= 0 or not 0 <= a["warmup"] <= 1 or not 0 < a["threshold"] < 1:
        raise TrainError(f"need --lambda >= 0, --lr > 0, 0 <= --warmup <= 1, 0 < --threshold < 1 "
                         f"(got {a['lam']}, {a['lr']}, {a['warmup']}, {a['threshold']})")
    mix = a["retrieval_mix"]
    if not 0 <= mix <= 1 or a["answer_weight"] < 0 or (mix and a["retrieval_samples"] < 1):
        raise TrainError(f"need 0 <= --retrieval-mix <= 1, --answer-weight >= 0 and --retrieval-samples >= 1 "
                         f"(got {mix}, {a['answer_weight']}, {a['retrieval_samples']})")


def start_processes(device: str | None, batch_size: int) -> tuple[str, int, int, bool]:
    """This process's device, its rank, the number of processes and whether they are several (torchrun sets
    WORLD_SIZE): gloo on CPUs, NCCL on GPUs with one GPU per process."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if distributed:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if batch_size % world:
        raise TrainError(f"--batch-size {batch_size} is not a multiple of the {world} processes")
    return device, rank, world, distributed


def run_samples(run: Path, a: dict, resumed: bool, rank: int, say) -> tuple[Tensor, Tensor, int]:
    """The run's tokenized samples (N, seq_len), their answer mask (N, seq_len) and how many rows are prose:
    a resumed run's own (samples.pt), so it trains on exactly what it started with; else built from the
    documents (prose, then the retrieval samples) and saved beside the checkpoint."""
    if resumed and (run / "samples.pt").exists():
        return load_samples(run)
    t0 = time.time()
    tok, docs, ids = tokenized_documents(a["checkpoint"], a["data"])
    samples = make_samples(ids, chat_prefix(tok), a["seq_len"])                               # (N, seq_len)
    n_prose = samples.shape[0]
    answer_mask = torch.zeros(samples.shape, dtype=torch.bool)                                # (N, seq_len)
    if a["retrieval_mix"]:
        planted, planted_mask = make_retrieval_samples(tok, ids, a["seq_len"], a["retrieval_samples"], a["seed"])
        samples, answer_mask = torch.cat([samples, planted]), torch.cat([answer_mask, planted_mask])
    say(f"data: {len(docs)} documents under {a['data']} -> {n_prose} prose and {samples.shape[0] - n_prose} retrieval "
        f"samples of {a['seq_len']} tokens ({time.time() - t0:.0f} s to build)")
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        save_atomic({"ids": samples.int(), "answer_mask": answer_mask, "prose": n_prose}, run / "samples.pt")
    return samples, answer_mask, n_prose


def start_gates(model: Transformer, a: dict, state: dict | None,
                device: str) -> tuple[nn.ModuleList, torch.optim.Optimizer]:
    """The gates and their optimizer: seeded at random, or from --init's gate file, or a resumed run's own."""
    torch.manual_seed(a["seed"])
    gates = build_gates(model, a["hidden"]).to(device)
    init = a["init"]
    if init is not None and state is None:   # start from a trained gate file (a resumed run has its own gates)
        try:
            start, _ = load_gates(init)
        except (OSError, CheckpointError) as e:
            raise TrainError(f"--init {init}: {e}") from None
        check_fits(start, model, init)
        if [(g.n_kv_heads, g.head_dim, g.hidden) for g in start] != [(g.n_kv_heads, g.head_dim, g.hidden) for g in gates]:
            raise TrainError(f"--init {init} has gates of another width than --hidden {a['hidden']} asks")
        gates.load_state_dict(nn.ModuleList(start).float().state_dict())
    optimizer = torch.optim.AdamW(gates.parameters(), lr=a["lr"], weight_decay=a["weight_decay"])
    if state is not None:
        gates.load_state_dict(state["gates"])
        optimizer.load_state_dict(state["optimizer"])
    return gates, optimizer


def catch_stop(say) -> dict:
    """Ctrl-C or SIGTERM sets stop["signal"], and the run saves after the step; a second Ctrl-C leaves at once."""
    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:   # a second Ctrl-C: leave now
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        say(f"{stop['signal']}: saving after this step (Ctrl-C again to abort without saving)")
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def step_totals(distiller: Distiller, samples: Tensor, answer_mask: Tensor, n_prose: int, step: int, a: dict,
                rank: int, world: int, device: str) -> Tensor:
    """Forward and backward over this process's share of the step's batch, leaving the gradient of the batch mean
    loss in the gates; returns the sums over its samples of loss, distill, reg, admitted, g mean, answer distill
    and the count of retrieval samples, (7,) float64."""
    batch_size, local = a["batch_size"], a["batch_size"] // world
    totals = torch.zeros(7, dtype=torch.float64)
    for i in range(local):
        row = sample_row(step * batch_size + rank * local + i, n_prose, samples.shape[0] - n_prose, a["retrieval_mix"],
                         a["seed"])
        x, mask = samples[row][None].to(device), answer_mask[row][None].to(device)               # (1, T) x 2
        loss, stats = distiller.loss(x, a["lam"], mask, a["answer_weight"])
        (loss / batch_size).backward()
        totals += torch.cat([stats, stats.new_tensor([float(row >= n_prose)])])
    return totals


def all_reduce(gates: nn.ModuleList, totals: Tensor, stopping: Tensor, device: str) -> tuple[Tensor, Tensor]:
    """The gates' gradients, the step's totals and the stop flag summed over the processes."""
    flat = torch.cat([p.grad.reshape(-1) for p in gates.parameters()])
    dist.all_reduce(flat)   # the sum of the ranks' (loss / batch_size) gradients is the batch mean's
    offset = 0
    for p in gates.parameters():
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    both = torch.cat([totals, stopping]).to(device)
    dist.all_reduce(both)
    return both[:-1].cpu(), both[-1:].cpu()


def step_stats(totals: Tensor, batch_size: int, run: Path, step: int) -> list[float | None]:
    """The step's means of loss, distill, reg, admitted, g mean, and its answer distill per retrieval sample (None
    without one); NonFiniteLoss when any is not finite, before the gates are updated."""
    stats = (totals[:5] / batch_size).tolist()
    stats.append(totals[5].item() / totals[6].item() if totals[6] else None)   # answer distill per retrieval sample
    if not all(math.isfinite(v) for v in stats if v is not None):
        kept = f"the last good checkpoint is {run}/checkpoint.pt (step {step_saved(run)})" if (run / "checkpoint.pt").exists() \
            else "no checkpoint was written yet"
        raise NonFiniteLoss(f"loss is not finite at step {step + 1} ({stats[0]}); stopped without updating the gates; {kept}")
    return stats


def train(checkpoint: str | None = None, data: str | None = None, out: str | None = None, seq_len: int | None = None,
          steps: int | None = None, batch_size: int | None = None, lam: float | None = None, window: int | None = None,
          threshold: float | None = None, lr: float | None = None, weight_decay: float | None = None,
          warmup: float | None = None, hidden: int | None = None, seed: int | None = None, dtype: str | None = None,
          retrieval_mix: float | None = None, retrieval_samples: int | None = None, answer_weight: float | None = None,
          init: str | None = None, device: str | None = None, activation_checkpointing: bool = False, block: int = 256, save_every: int = 25,
          threads: int = 0, resume: bool = False, export: str | None = None, export_dtype: str = "float16",
          setting: str | None = None) -> None:
    """Train (or, with export, write a run's latest gates); None takes the default or the resumed run's value."""
    given = {k: v for k, v in locals().items() if k in TRAJECTORY and v is not None}
    run = Path(out if out is not None else f"runs/gate-{given.get('lam', TRAJECTORY['lam']):g}")
    if threads:
        torch.set_num_threads(threads)
    if export is not None:   # export a run's latest checkpoint, nothing else
        export_run(run, given, export, export_dtype, device, setting)
        return
    state, args = run_settings(run, given, resume)
    check_settings(args, block, save_every)
    steps, batch_size, seq_len = args["steps"], args["batch_size"], args["seq_len"]
    device, rank, world, distributed = start_processes(device, batch_size)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)

    model = Transformer.from_pretrained(args["checkpoint"], dtype=getattr(torch, args["dtype"]), device=device)
    if seq_len > model.config.max_position_embeddings:
        raise TrainError(f"--seq-len {seq_len} exceeds the model's context of {model.config.max_position_embeddings} tokens")
    samples, answer_mask, n_prose = run_samples(run, args, state is not None, rank, say)        # (N, seq_len) x 2
    gates, optimizer = start_gates(model, args, state, device)
    step, elapsed, last = (state["step"], state["elapsed"], state["last"]) if state is not None else (0, 0.0, None)
    if state is not None:
        say(f"resumed {run} at step {step}/{steps}")
    distiller = Distiller(model, gates, args["window"], args["threshold"], block, activation_checkpointing)
    commands = (state.get("commands", []) if state is not None else []) + [command_line()]
    snapshot = lambda: {"step": step, "elapsed": elapsed, "args": args, "gates": gates.state_dict(),  # noqa: E731
                        "commands": commands, "gate_shapes": [(g.n_kv_heads, g.head_dim, g.hidden) for g in gates],
                        "optimizer": optimizer.state_dict(), "machine": machine(device, world), "last": last}
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        trim_log(run / "log.jsonl", step)
    stop = catch_stop(say)

    tokens_per_step = batch_size * seq_len
    start_step, start_time = step, time.time()
    say(f"training {sum(p.numel() for p in gates.parameters()):,} gate parameters on {machine(device, world)}: "
        f"{steps} steps x {batch_size} x {seq_len} tokens, lambda {args['lam']:g}, W {args['window']}, "
        f"tau {args['threshold']:g}")
    while step < steps:
        t_step = time.time()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, args["lr"], args["warmup"])
        totals = step_totals(distiller, samples, answer_mask, n_prose, step, args, rank, world, device)
        stopping = torch.tensor([stop["signal"] is not None], dtype=torch.float64)
        if distributed:
            totals, stopping = all_reduce(gates, totals, stopping, device)
        stats = step_stats(totals, batch_size, run, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.time() - t_step
        elapsed += dt
        last = dict(zip(("loss", "distill", "reg", "admitted", "g_mean", "answer"), stats))
        rate = (time.time() - start_time) / (step - start_step)
        answer = f" answer {stats[5]:.5f}" if stats[5] is not None else ""
        say(f"step {step}/{steps} loss {stats[0]:.5f} distill {stats[1]:.5f}{answer} reg {stats[2]:.4f} "
            f"admit {100 * stats[3]:.1f}% lr {optimizer.param_groups[0]['lr']:.1e} "
            f"{tokens_per_step / dt:.0f} tok/s eta {format_time(rate * (steps - step))}")
        if rank == 0:
            with open(run / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **last, "lr": optimizer.param_groups[0]["lr"],
                                    "tokens_per_s": tokens_per_step / dt, "seconds": elapsed}) + "\n")
        if stopping.item() or step % save_every == 0 or step == steps:
            if rank == 0:
                save_atomic(snapshot(), run / "checkpoint.pt")
            if stopping.item():
                say(f"saved {run}/checkpoint.pt at step {step}; continue with --resume")
                raise SystemExit(130)
    if rank == 0:
        export_gates(run, gates, snapshot(), run / "gate.safetensors", torch.float32,
                     run_admission(run, gates, args, device, distiller))
        say(f"done: {run}/gate.safetensors ({format_time(elapsed)} of training)")
        print(run / "gate.safetensors")
    if distributed:
        dist.destroy_process_group()


def load_samples(run: Path) -> tuple[Tensor, Tensor, int]:
    """The run's tokenized samples (N, seq_len), their answer mask (N, seq_len) and how many rows are prose."""
    saved = torch.load(run / "samples.pt", weights_only=True)
    if isinstance(saved, Tensor):   # a prose-only run from before retrieval samples
        saved = {"ids": saved, "answer_mask": torch.zeros(saved.shape, dtype=torch.bool), "prose": saved.shape[0]}
    return saved["ids"].long(), saved["answer_mask"], saved["prose"]


def load_checkpoint(run: Path) -> dict:
    path = run / "checkpoint.pt"
    if not path.exists():
        raise TrainError(f"{path} not found: nothing to resume or export")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # a truncated or foreign file; torch raises several types
        raise TrainError(f"{path} is unreadable: {str(e).splitlines()[0]}") from None


def step_saved(run: Path) -> int:
    return load_checkpoint(run)["step"]


def trim_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint being resumed (written after it, then lost with the process), and
    the half-written last line a killed process may leave."""
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record["step"] <= step:
                kept.append(line)
        path.write_text("".join(l + "\n" for l in kept))


def machine(device: str, world: int) -> str:
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else f"{platform.processor() or platform.machine()} CPU"
    return f"{world} x {name}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(record_admission_file: str | None = None, **kwargs) -> None:
    try:
        if record_admission_file is not None:
            if kwargs["threads"]:
                torch.set_num_threads(kwargs["threads"])
            admitted = record_admission(record_admission_file, kwargs["checkpoint"], kwargs["data"], kwargs["seq_len"],
                                        kwargs["device"], kwargs["threshold"], kwargs["setting"])
            print(record_admission_file)
            print(f"admitted per layer: {' '.join(f'{a:.2f}' for a in admitted)}", file=sys.stderr)
            return
        train(**kwargs)
    except (TrainError, DataError, CheckpointError) as e:
        print(f"train_gate.py: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, NonFiniteLoss) else 2)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = lambda key: f" (default: {TRAJECTORY[key]}; with --resume: the run's)"
    p.add_argument("--checkpoint", help="model directory (default: the embedded SmolLM2-135M-Instruct; with --resume: the run's)")
    p.add_argument("--data", help="folder (or file) of .txt/.md/.jsonl documents" + d("data"))
    p.add_argument("--out", help="run directory: checkpoint.pt, log.jsonl, samples.pt, gate.safetensors (default: runs/gate-LAMBDA)")
    p.add_argument("--seq-len", type=int, help="tokens per sample: chat prefix + a piece of a document" + d("seq_len"))
    p.add_argument("--steps", type=int, help="optimizer steps" + d("steps"))
    p.add_argument("--batch-size", type=int, help="sequences per step, over all processes" + d("batch_size"))
    p.add_argument("--lambda", dest="lam", type=float, help="weight of the sparsity regularizer" + d("lam"))
    p.add_argument("--window", type=int, help="W: every token is visible to the next W-1 queries" + d("window"))
    p.add_argument("--threshold", type=float, help="tau: a token is admitted when g > tau" + d("threshold")
                   + "; with --export or --record-admission, the tau of the file's setting, admission per layer "
                   "measured at it (default: the run's, or the file's default setting's)")
    p.add_argument("--lr", type=float, help="AdamW peak learning rate" + d("lr"))
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay" + d("weight_decay"))
    p.add_argument("--warmup", type=float, help="share of the steps with linear warm-up, then cosine to 0" + d("warmup"))
    p.add_argument("--hidden", type=int, help="gate MLP width, 0: 4 x head dim" + d("hidden"))
    p.add_argument("--seed", type=int, help="seeds the gate initialisation and the data order" + d("seed"))
    p.add_argument("--retrieval-mix", type=float,
                   help="share of samples with facts planted in the text and asked for at the end" + d("retrieval_mix"))
    p.add_argument("--retrieval-samples", type=int, help="retrieval samples built for the run" + d("retrieval_samples"))
    p.add_argument("--answer-weight", type=float,
                   help="weight of the distillation loss on the answer positions, added to the all-position loss"
                   + d("answer_weight"))
    p.add_argument("--init", help="start the gates from this gate file instead of at random" + d("init"))
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="the frozen model's precision; gates stay float32 (bfloat16 is slow on CPUs without it)" + d("dtype"))
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each layer in backward instead of keeping its activations (long sequences)")
    p.add_argument("--block", type=int, default=256, help="queries per block of the soft-gated attention (default: 256)")
    p.add_argument("--save-every", type=int, default=25, help="steps between checkpoints (default: 25)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (default: 0, torch's choice)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--export", help="write OUT's latest checkpoint as a gate file at this path and exit")
    p.add_argument("--record-admission", dest="record_admission_file", metavar="GATE_FILE",
                   help="measure a gate file's admission per layer on --data (the training split) at --threshold (else "
                   "at the tau of --setting, else of its default setting) and write it into the file as the setting "
                   "of that tau, replacing one there or adding one, which becomes the file's default; the admission "
                   "sizes generate.py's default --kv-budget; then exit")
    p.add_argument("--setting", help="with --export or --record-admission: the name of the setting written, which "
                   "--gate FILE@NAME picks (default: the one at its tau, else its admission in whole percent: 20%%)")
    p.add_argument("--export-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="precision of the exported gate file (default: float16)")
    main(**vars(p.parse_args()))
