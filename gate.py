"""The write gate: per layer, per KV head, one admission score g in [1e-3, 1] for each new token.

    x = concat(RMSNorm_pre(k_pre), RMSNorm_post(k_post))       # (2D,), float32
    g = max(sigmoid(w2_h . gelu(W1_h x + b1_h) + b2_h), 1e-3)

Also here: the gate file (safetensors with the authors' tensor names and shapes, metadata in the
header, among it the file's sparsity settings; their .pt files load too), the baseline policies (full,
none, random:P, sink:N) that stand in for a learned gate, and build_caches, the one place every caller's
caches are built (dense, or gates and write-gated caches on one page pool).

    python gate.py FILE      # prints a gate file's metadata, its settings and its shapes
"""
import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cache import (DenseCache, Eviction, PagePool, WriteGatedCache, allocated_bytes, pages_for, resolve_backend,
                   summed_counts)
from kernels import float32
from model import CheckpointError, RMSNorm, Transformer

GATE_NORM_EPS = 1e-6
MIN_GATE = 1e-3
DEFAULT_WINDOW = 256
DEFAULT_THRESHOLD = 0.1


class GateError(CheckpointError):
    """A gate file or policy that cannot be used as asked; the message names the problem in one line."""


class WriteGate(nn.Module):
    """One layer's gates: an independent two-layer MLP per KV head over the normed pre/post-RoPE key."""

    def __init__(self, n_kv_heads: int, head_dim: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or 4 * head_dim
        self.n_kv_heads, self.head_dim, self.hidden = n_kv_heads, head_dim, hidden
        self.pre_key_norm = RMSNorm(head_dim, GATE_NORM_EPS)
        self.post_key_norm = RMSNorm(head_dim, GATE_NORM_EPS)
        # Initialised as PyTorch's Conv1d would be (uniform +-1/sqrt(fan_in)), like the authors' gates.
        bound1, bound2 = (2 * head_dim) ** -0.5, hidden ** -0.5
        self.w1 = nn.Parameter(torch.empty(n_kv_heads, hidden, 2 * head_dim).uniform_(-bound1, bound1))  # (Hkv, hidden, 2D)
        self.b1 = nn.Parameter(torch.empty(n_kv_heads, hidden).uniform_(-bound1, bound1))                # (Hkv, hidden)
        self.w2 = nn.Parameter(torch.empty(n_kv_heads, hidden).uniform_(-bound2, bound2))                # (Hkv, hidden)
        self.b2 = nn.Parameter(torch.empty(n_kv_heads).uniform_(-bound2, bound2))                        # (Hkv,)

    def forward(self, k_pre: Tensor, k_post: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """k_pre, k_post: (B, Hkv, T, D) -> g: (B, Hkv, T) float32.

        Written for few ops in an eager decode step, where each costs more than its arithmetic: both norms in one
        call over the concatenated keys, each half then taking its own weight, and the heads' MLPs as products
        batched over the KV heads with the biases folded in (baddbmm). Compiled for a CPU, one token (a decode
        step): multiply-and-sum products instead, as model.Linear's, which Inductor fuses into passes over the
        weights where it calls the BLAS for baddbmm (SmolLM2's 30 gates: 1.05 against 1.94 ms, 1 thread)."""
        B, H, T, D = k_pre.shape
        x = torch.cat((float32(k_pre), float32(k_post)), dim=-1).view(B, H, T, 2, D)
        weight = torch.stack((self.pre_key_norm.weight, self.post_key_norm.weight))               # (2, D)
        x = F.rms_norm(x, (D,), eps=GATE_NORM_EPS) * weight                                       # (B, Hkv, T, 2, D)
        x = x.transpose(0, 1).reshape(H, B * T, 2 * D)                                            # (Hkv, B*T, 2D)
        if torch.compiler.is_compiling() and x.device.type == "cpu" and B * T == 1:
            h = F.gelu((x * self.w1).sum(-1) + self.b1)                                            # (Hkv, hidden)
            logit = ((h * self.w2).sum(-1) + self.b2).view(H, 1, 1)                                # (Hkv, 1, 1)
        else:
            h = F.gelu(torch.baddbmm(self.b1[:, None, :], x, self.w1.transpose(1, 2)))           # (Hkv, B*T, hidden)
            logit = torch.baddbmm(self.b2.view(H, 1, 1), h, self.w2[:, :, None])                   # (Hkv, B*T, 1)
        return torch.sigmoid(logit).clamp_min(MIN_GATE).view(H, B, T).transpose(0, 1)              # (B, Hkv, T)

    def official_state(self) -> dict[str, Tensor]:
        """The authors' per-layer tensors: conv1/conv2 are grouped 1x1 convolutions, one group per KV head."""
        H, K, D = self.n_kv_heads, self.hidden, self.head_dim
        return {
            "pre_key_norm.weight": self.pre_key_norm.weight.detach(),   # (D,)
            "post_key_norm.weight": self.post_key_norm.weight.detach(),  # (D,)
            "conv1.weight": self.w1.detach().reshape(H * K, 2 * D, 1),   # rows [h*K, (h+1)*K) are W1_h
            "conv1.bias": self.b1.detach().reshape(H * K),
            "conv2.weight": self.w2.detach().reshape(H, K, 1),
            "conv2.bias": self.b2.detach(),
        }

    @classmethod
    def from_official(cls, state: dict[str, Tensor]) -> "WriteGate":
        """The inverse of official_state; shapes are checked by the loader."""
        H, K, _ = state["conv2.weight"].shape
        gate = cls(H, state["pre_key_norm.weight"].shape[0], K)
        with torch.no_grad():
            gate.pre_key_norm.weight.copy_(state["pre_key_norm.weight"])
            gate.post_key_norm.weight.copy_(state["post_key_norm.weight"])
            gate.w1.copy_(state["conv1.weight"].reshape(gate.w1.shape))
            gate.b1.copy_(state["conv1.bias"].reshape(gate.b1.shape))
            gate.w2.copy_(state["conv2.weight"].reshape(gate.w2.shape))
            gate.b2.copy_(state["conv2.bias"])
        return gate


# -------------------------------------------------------------------------------------------------
# The gate file: model.layers.{i}.self_attn.g_predictors.<name>, exactly as the authors write them.
#
# One trained gate serves several sparsities: a higher tau admits fewer tokens with the same weights. The
# header holds them as its settings, each picked by name (FILE@NAME) or by tau (--threshold):
#   settings         {"40%": {"threshold": 0.1, "admitted_per_layer": [...]}, "20%": {"threshold": 0.46, ...}}
#   default_setting  "20%"    (what FILE alone runs at)
# admitted_per_layer: the share of tokens with g > tau per layer, measured on the training split; it sizes
# the default page pool. Files from before settings (a single threshold and admitted_per_layer in the
# header; the authors' .pt, none) load as one setting named after their tau, e.g. "tau0.1".

_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.g_predictors\.(.+)")
_NAMES = ("pre_key_norm.weight", "post_key_norm.weight", "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")
# Header fields that are numbers or JSON; every other field (base_model, training, ...) is free-form text.
_TYPED_METADATA = {"window": int, "lambda": float, "settings": json.loads,
                   "threshold": float, "admitted_per_layer": json.loads}   # the last two: files from before settings


def save_gates(path: str | Path, gates: list[WriteGate], metadata: dict | None = None,
               dtype: torch.dtype = torch.float32) -> None:
    """Write a gate file. metadata: window, lambda, base_model, settings, default_setting, training (any value;
    non-strings go as JSON); settings are checked as load_gates checks them.
    Written beside and then renamed over path, so a reader never sees half a file (exports rewrite files in place)."""
    from safetensors.torch import save_file
    with_settings(metadata or {}, path)
    tensors = {f"model.layers.{i}.self_attn.g_predictors.{name}": t.to("cpu", dtype).contiguous()
               for i, gate in enumerate(gates) for name, t in gate.official_state().items()}
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items() if v is not None}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)


def load_gates(path: str | Path) -> tuple[list[WriteGate], dict]:
    """Read a gate file (.safetensors, or the authors' .pt) -> (one float32 WriteGate per layer, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise GateError(f"gate file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                state = {name: f.get_tensor(name) for name in f.keys()}
                header = f.metadata() or {}
        except Exception as e:   # the safetensors reader has no error type of its own for a corrupt file
            raise GateError(f"gate file {path} is not readable safetensors: {e}") from None
        metadata = {}
        for k, v in header.items():
            try:
                metadata[k] = _TYPED_METADATA[k](v) if k in _TYPED_METADATA else v
            except ValueError:
                raise GateError(f"gate file {path}: metadata {k}={v!r} is not a number or JSON") from None
    elif path.suffix in (".pt", ".pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:   # unpickling refuses anything but tensors and plain containers
            raise GateError(f"gate file {path} is not a weights-only torch file: {str(e).splitlines()[0]}") from None
        if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
            raise GateError(f"gate file {path} is not a flat dict of tensors")
        # The authors name their files {model}-{lambda}.pt.
        named = re.fullmatch(r"(.+)-(\d*\.?\d+)", path.stem)
        metadata = {"base_model": named[1], "lambda": float(named[2])} if named else {}
    else:
        raise GateError(f"gate file {path}: unknown type {path.suffix!r} (expected .safetensors or .pt)")
    return _gates_from_state(state, path), with_settings(metadata, path)


def with_settings(metadata: dict, source: str | Path) -> dict:
    """metadata with its settings and default_setting, checked (GateError, one line); a file from before settings
    gets its one setting from its threshold (DEFAULT_THRESHOLD if none) and admitted_per_layer."""
    metadata = dict(metadata)
    threshold, admitted = metadata.pop("threshold", None), metadata.pop("admitted_per_layer", None)
    if "settings" not in metadata:
        tau = DEFAULT_THRESHOLD if threshold is None else threshold
        measured = {} if admitted is None else {"admitted_per_layer": admitted}
        metadata["settings"] = {f"tau{tau:g}": {"threshold": tau} | measured}
        metadata["default_setting"] = f"tau{tau:g}"
    settings = metadata["settings"]
    if not isinstance(settings, dict) or not settings:
        raise GateError(f"gate file {source}: settings {settings!r} is not a mapping of names to settings")
    share = lambda x: isinstance(x, (int, float)) and 0 <= x <= 1
    for name, setting in settings.items():
        tau = setting.get("threshold") if isinstance(setting, dict) else None
        admitted = setting.get("admitted_per_layer") if isinstance(setting, dict) else None
        if (not name or "@" in name or not share(tau)
                or not (admitted is None or isinstance(admitted, list) and all(map(share, admitted)))):
            raise GateError(f"gate file {source}: setting {name!r} needs a name without '@', a threshold in [0, 1] "
                            f"and, if any, admitted_per_layer as shares in [0, 1] (got {setting!r})")
    if metadata.get("default_setting") not in settings:
        raise GateError(f"gate file {source}: default_setting {metadata.get('default_setting')!r} is none of its "
                        f"settings ({', '.join(settings)})")
    return metadata


def describe_settings(metadata: dict) -> str:
    """The settings on one line, for messages: '40% (tau 0.1), 20% (tau 0.46, the default)'."""
    return ", ".join(f"{name} (tau {s['threshold']:g}{', the default' if name == metadata['default_setting'] else ''})"
                     for name, s in metadata["settings"].items())


def choose_setting(metadata: dict, name: str | None, threshold: float | None, source: str | Path) -> tuple[str, dict]:
    """The setting a gate file runs at, as (name, {threshold, admitted_per_layer if measured}): the one named
    (FILE@NAME), else the one at the given tau (--threshold), else the file's default. A tau the file has no
    setting for runs as one without a measured admission, named after it."""
    settings = metadata["settings"]
    if name is not None:
        if name not in settings:
            raise GateError(f"gate file {source} has no setting {name!r}; its settings: {describe_settings(metadata)}")
        if threshold is not None and threshold != settings[name]["threshold"]:
            raise GateError(f"--threshold {threshold:g} contradicts {source}@{name}, whose tau is "
                            f"{settings[name]['threshold']:g}: give one of them")
        return name, settings[name]
    if threshold is None:
        return metadata["default_setting"], settings[metadata["default_setting"]]
    named = [n for n, s in settings.items() if s["threshold"] == threshold]
    return (named[0], settings[named[0]]) if named else (f"tau{threshold:g}", {"threshold": threshold})


def _gates_from_state(state: dict[str, Tensor], source: Path) -> list[WriteGate]:
    layers: dict[int, dict[str, Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        m = _KEY.fullmatch(key)
        if m and m[2] in _NAMES:
            layers.setdefault(int(m[1]), {})[m[2]] = tensor.float()
        else:
            unknown.append(key)
    if unknown:
        raise GateError(f"gate file {source}: unexpected tensors {sorted(unknown)[:3]} (expected model.layers.N.self_attn.g_predictors.*)")
    if not layers or sorted(layers) != list(range(len(layers))):
        raise GateError(f"gate file {source}: layers {sorted(layers)[:8]} are not 0..N-1")
    gates = []
    for i, tensors in sorted(layers.items()):
        missing = [n for n in _NAMES if n not in tensors]
        if missing:
            raise GateError(f"gate file {source}: layer {i} lacks {missing}")
        H, K = tensors["conv2.weight"].shape[:2]
        D = tensors["pre_key_norm.weight"].shape[0]
        expected = {"pre_key_norm.weight": (D,), "post_key_norm.weight": (D,), "conv1.weight": (H * K, 2 * D, 1),
                    "conv1.bias": (H * K,), "conv2.weight": (H, K, 1), "conv2.bias": (H,)}
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise GateError(f"gate file {source}: layer {i} {name} has shape {tuple(tensors[name].shape)}, "
                                f"expected {shape} for {H} KV heads, head dim {D}, hidden width {K}")
        gates.append(WriteGate.from_official(tensors))
    return gates


def check_fits(gates: list[nn.Module], model: Transformer, source: str = "gate") -> None:
    """Raise GateError naming the first way the learned gates do not fit the model, and both shapes. The gates are
    the whole model's (a gate file's): under tensor parallelism they have every rank's KV heads."""
    c = model.config
    n_kv_heads = c.n_kv_heads * model.tp.world
    learned = [g for g in gates if isinstance(g, WriteGate)]
    # Both shapes in every message: a gate for another model is the usual cause (Llama-3.1-8B's and Qwen3-4B's
    # differ only in the layer count).
    theirs = f"{len(gates)} layers" + (f", {learned[0].n_kv_heads} KV heads, head dim {learned[0].head_dim}" if learned else "")
    shapes = f" (gate: {theirs}; model: {c.n_layers} layers, {n_kv_heads} KV heads, head dim {c.head_dim})"
    if len(gates) != c.n_layers:
        raise GateError(f"{source} has {len(gates)} layers, the model has {c.n_layers}{shapes}")
    for i, gate in enumerate(gates):
        if isinstance(gate, WriteGate):
            if gate.n_kv_heads != n_kv_heads:
                raise GateError(f"{source} has {gate.n_kv_heads} KV heads in layer {i}, the model has {n_kv_heads}{shapes}")
            if gate.head_dim != c.head_dim:
                raise GateError(f"{source} has head dim {gate.head_dim} in layer {i}, the model has {c.head_dim}{shapes}")


# -------------------------------------------------------------------------------------------------
# Baseline policies: same call contract as WriteGate, (k_pre, k_post, input_pos) -> g (B, Hkv, T).

class ConstantGate(nn.Module):
    """`full` (g = 1: every token admitted, the dense cache) or `none` (g = 0: the window only)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, k_pre: Tensor, k_post: Tensor, input_pos: Tensor) -> Tensor:
        return torch.full(k_pre.shape[:3], self.value, dtype=torch.float32, device=k_pre.device)   # (B, Hkv, T)


class SinkGate(nn.Module):
    """`sink:N` (StreamingLLM): the first N positions are admitted, the rest only pass through the window."""

    def __init__(self, n_sink: int):
        super().__init__()
        self.n_sink = n_sink

    def forward(self, k_pre: Tensor, k_post: Tensor, input_pos: Tensor) -> Tensor:
        B, H, T = k_pre.shape[:3]
        g = (input_pos.expand(B, T) < self.n_sink).float()                                        # (B, T)
        return g[:, None].expand(B, H, T)                                                         # (B, Hkv, T)


def hash32(x):
    """A 32-bit integer mixer for Python ints and int64 tensors alike (multipliers < 2^31: no int64 overflow)."""
    x = x & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
    x = ((x ^ (x >> 15)) * 0x5BD1E995) & 0xFFFFFFFF
    return x ^ (x >> 16)


class RandomGate(nn.Module):
    """`random:P`: admit each (layer, KV head, position) with probability P.

    The draw is a hash of (seed, layer, head, position), not a generator: prefill and decode agree,
    every run is the same, batch rows share the decision, and the decode step needs no RNG state.
    """

    def __init__(self, fraction: float, n_kv_heads: int, layer: int, seed: int = 0):
        super().__init__()
        self.fraction = fraction
        salt = hash32(hash32(seed) ^ layer)
        self.register_buffer("head_keys", hash32(hash32(torch.arange(n_kv_heads) ^ salt)), persistent=False)  # (Hkv,)

    def forward(self, k_pre: Tensor, k_post: Tensor, input_pos: Tensor) -> Tensor:
        pos = input_pos.long().expand(k_pre.shape[0], k_pre.shape[2])                            # (B, T)
        h = hash32(self.head_keys[:, None] ^ hash32(pos)[:, None, :])                           # (B, Hkv, T) in [0, 2^32)
        uniform = (h >> 8).float() * 2.0 ** -24                                                   # (B, Hkv, T) in [0, 1)
        return (uniform < self.fraction).float()


@dataclass
class Policy:
    kind: str                 # "file", "full", "none", "random", "sink", or "given" (gate modules, not a spec)
    path: Path | None = None  # the gate file, for kind "file"
    setting: str | None = None   # PATH@SETTING: one of the file's settings (None: chosen by tau, else its default)
    fraction: float = 0.0     # random:P
    n_sink: int = 0           # sink:N

    def __str__(self) -> str:
        if self.kind == "file":
            return f"{self.path}@{self.setting}" if self.setting else str(self.path)
        return {"random": f"random:{self.fraction:g}", "sink": f"sink:{self.n_sink}"}.get(self.kind, self.kind)


def parse_policy(spec: str) -> Policy:
    """The --gate value: PATH | PATH@SETTING | full | none | random:P | sink:N."""
    if spec in ("full", "none"):
        return Policy(spec)
    kind, _, arg = spec.partition(":")
    if kind == "random":
        try:
            fraction = float(arg)
        except ValueError:
            fraction = -1.0
        if not 0.0 <= fraction <= 1.0:
            raise GateError(f"gate policy {spec!r}: random:P needs a fraction P in [0, 1]")
        return Policy("random", fraction=fraction)
    if kind == "sink":
        if not arg.isdigit():
            raise GateError(f"gate policy {spec!r}: sink:N needs a whole number of tokens N >= 0")
        return Policy("sink", n_sink=int(arg))
    if Path(spec).is_file():
        return Policy("file", path=Path(spec))
    path, at, setting = spec.rpartition("@")
    if at and setting and Path(path).is_file():
        return Policy("file", path=Path(path), setting=setting)
    raise GateError(f"gate {spec!r} is neither a file nor a policy "
                    "(expected PATH, PATH@SETTING, full, none, random:P or sink:N)")


def make_gates(policy: Policy, model: Transformer, seed: int = 0) -> tuple[list[nn.Module], dict]:
    """One gate module per layer for the policy, for the model's KV heads (under tensor parallelism this rank's,
    rank_heads), and the gate file's metadata ({} for the built-ins)."""
    c = model.config
    if policy.kind == "file":
        gates, metadata = load_gates(policy.path)
        check_fits(gates, model, f"gate file {policy.path}")
        return rank_heads(gates, model.tp), metadata
    if policy.kind == "random":
        gates = [RandomGate(policy.fraction, c.n_kv_heads * model.tp.world, i, seed) for i in range(c.n_layers)]
        return rank_heads(gates, model.tp), {}
    if policy.kind == "sink":
        return [SinkGate(policy.n_sink) for _ in range(c.n_layers)], {}
    return [ConstantGate(1.0 if policy.kind == "full" else 0.0) for _ in range(c.n_layers)], {}


def rank_heads(gates: list[nn.Module], tp) -> list[nn.Module]:
    """The gates of this rank's KV heads (model.TensorParallel: rank r of N holds heads r*H/N..(r+1)*H/N - 1), cut
    in place from the whole model's: a learned gate's per-head weights, a random gate's per-head keys (so each
    head admits what it admits in one process); the other policies treat every head alike."""
    for gate in gates if tp.world > 1 else ():
        if isinstance(gate, WriteGate):
            n = gate.n_kv_heads // tp.world
            own = slice(tp.rank * n, (tp.rank + 1) * n)
            for name in ("w1", "b1", "w2", "b2"):
                setattr(gate, name, nn.Parameter(getattr(gate, name)[own].clone()))
            gate.n_kv_heads = n
        elif isinstance(gate, RandomGate):
            n = gate.head_keys.shape[0] // tp.world
            gate.head_keys = gate.head_keys[tp.rank * n:(tp.rank + 1) * n].clone()
    return gates


def gate_settings(specs: list[str], model: Transformer) -> dict[str, tuple[str, dict]]:
    """The gate files' settings as policies of a table that compares them: {name: (PATH@SETTING, metadata)},
    every setting of a PATH, the one of a PATH@SETTING. name: the file's stem, with @SETTING where the file
    has several (its path where two files share a stem). A setting given twice runs once."""
    policies, seen = {}, set()
    for spec in specs:
        policy = parse_policy(spec)
        if policy.kind != "file":
            raise GateError(f"gate {spec!r} is a built-in policy, not a gate file (expected PATH or PATH@SETTING)")
        _, metadata = make_gates(policy, model)   # checks that the gates fit the model
        if policy.setting is not None:
            choose_setting(metadata, policy.setting, None, policy.path)   # a setting the file lacks: GateError
        for setting in [policy.setting] if policy.setting else metadata["settings"]:
            if (policy.path.resolve(), setting) in seen:
                continue
            seen.add((policy.path.resolve(), setting))
            suffix = f"@{setting}" if len(metadata["settings"]) > 1 else ""
            name = policy.path.stem + suffix if policy.path.stem + suffix not in policies else f"{policy.path}{suffix}"
            policies[name] = (f"{policy.path}@{setting}", metadata)
    return policies


# -------------------------------------------------------------------------------------------------
# Setup and statistics.

def install(model: Transformer, gates: list[nn.Module] | None) -> None:
    """Give every layer its gate (None removes them): the attention calls it on each new key."""
    for i, layer in enumerate(model.layers):
        layer.attention.gate = gates[i] if gates is not None else None


# The default pool holds what the gate admitted in training, per layer, times this margin (documents
# differ from the training average; see BENCHMARKS.md for the held-out measurement), plus one page per head
# for its partly filled last page. A gate without that record gets the full need.
BUDGET_MARGIN = 1.5
DEFAULT_PAGE_SIZE = 16
EVICTION = ("lowest-g", "snapkv")   # --evict, the first the default
SNAPKV_OBSERVE = 32    # SnapKV's observation window: the recent queries that score the stored tokens


@dataclass(frozen=True)
class Budget:
    """--kv-budget: the pool's size as bytes, tokens, a share of the dense cache, or unlimited (None: derived)."""
    kind: str           # "bytes" | "tokens" | "share" | "unlimited"
    value: float = 0.0

    def __str__(self) -> str:
        return {"bytes": f"{self.value / 2**20:g}MiB", "tokens": f"{self.value:g}", "share": f"{self.value:g}%",
                "unlimited": "unlimited"}[self.kind]


_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 1e3, "mb": 1e6, "gb": 1e9}


def parse_budget(spec: str | None) -> Budget | None:
    """'300MiB' | '20000' (tokens) | '40%' (of the dense cache) | 'unlimited'; None stays None (the default)."""
    if spec is None:
        return None
    text = spec.strip().lower()
    if text == "unlimited":
        return Budget("unlimited")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(%|b|kib|mib|gib|kb|mb|gb)?", text)
    if m is None or (m[2] is None and "." in m[1]):
        raise GateError(f"--kv-budget {spec!r}: expected bytes (300MiB, 2GiB), tokens (20000), a share of the "
                        "dense cache (40%) or unlimited")
    number = float(m[1])
    if number <= 0 or (m[2] == "%" and number > 100):
        raise GateError(f"--kv-budget {spec!r}: must be above 0 (and a share at most 100%)")
    if m[2] == "%":
        return Budget("share", number)
    if m[2] is None:
        return Budget("tokens", number)
    return Budget("bytes", number * _UNITS[m[2]])


def selected_pages(select_budget: int, window: int, page_size: int, flag: str = "--select-budget") -> int:
    """The store pages a decode step reads per KV head under a select budget of tokens attended, the window's among
    them; GateError (one line, naming `flag`) for a budget below the window plus one page."""
    if select_budget < window + page_size:
        raise GateError(f"{flag} {select_budget}: must be at least the window plus one page ({window} + {page_size})")
    return (select_budget - window) // page_size


def pool_pages(budget: Budget | None, *, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int,
               capacity: int | list[int], page_size: int, dense_tokens: int, element_size: int,
               admitted_per_layer: list[float] | None) -> tuple[int, str]:
    """Pages of the shared pool, and how they were chosen (for the setup line).

    capacity: tokens one head may hold (a list: per layer); dense_tokens: tokens per head of the dense cache
    (max_seq_len). Never more than every head's full capacity: a budget beyond that buys nothing.
    """
    heads = batch_size * n_kv_heads
    capacities = capacity if isinstance(capacity, list) else [capacity] * n_layers
    full = heads * sum(pages_for(c, page_size) for c in capacities)
    per_page = page_size * (2 * head_dim * element_size + 4)            # K, V and g
    if budget is None:
        if not admitted_per_layer or len(admitted_per_layer) != n_layers:
            return full, "the full need (the gate file records no admission rate)"
        pages = sum(pages_for(round(min(1.0, BUDGET_MARGIN * rate) * c * heads), page_size) + heads
                    for rate, c in zip(admitted_per_layer, capacities))
        return min(pages, full), f"{BUDGET_MARGIN:g}x the gate's admission in training"
    if budget.kind == "unlimited":
        return full, "unlimited"
    if budget.kind == "tokens":
        pages = pages_for(int(budget.value), page_size)
    elif budget.kind == "bytes":
        pages = int(budget.value // per_page)
    else:
        dense = n_layers * heads * dense_tokens * 2 * head_dim * element_size             # dense_bytes, from the shape
        pages = int(budget.value / 100 * dense // per_page)
    return min(pages, full), f"--kv-budget {budget}"


@dataclass
class GatedSetup:
    policy: str
    window: int
    threshold: float
    capacity: int | list[int]   # global store slots per (batch, KV head); a list: per layer
    backend: str
    max_seq_len: int
    pool_pages: int           # pages of the shared pool
    page_size: int
    budget: str               # how the pool was sized
    evict: str | None         # what makes room when the pool runs low: lowest-g, snapkv, or nothing
    select_budget: int | None = None   # tokens a decode step attends per KV head (selection), None: all
    select_pages: int = 0     # the store pages a decode step reads per KV head under it (0: all)
    evictor: Eviction | None = None   # makes room in the pool; call its after_step from the decode loop
    metadata: dict = field(default_factory=dict)


@dataclass
class CacheSetup:
    """What build_caches built."""
    allocated: int                    # bytes the caches allocated: rings, page tables and the pool, or dense K/V
    evictor: Eviction | None = None   # call its after_step between decode steps (None: nothing to evict)
    gated: GatedSetup | None = None   # the write-gated settings (None: the dense cache)


def build_caches(model: Transformer, max_seq_len: int, *, batch_size: int = 1,
                 gate: str | list[nn.Module] | None = None, **gated) -> CacheSetup:
    """Give every layer a fresh cache for max_seq_len positions, in the model's dtype and on its device: the
    one place caches are built. gate None: DenseCache, and no gates; else the write-gated caches of
    setup_write_gated, whose options `gated` holds."""
    w = model.output.weight
    caches = lambda: [layer.attention.cache for layer in model.layers]   # noqa: E731
    if gate is None:
        c = model.config
        install(model, None)
        model.setup_caches(lambda i: DenseCache(batch_size, c.n_kv_heads, max_seq_len, c.head_dim, w.dtype, w.device))
        return CacheSetup(allocated_bytes(caches()))
    setup = setup_write_gated(model, gate, batch_size=batch_size, max_seq_len=max_seq_len, dtype=w.dtype,
                              device=w.device, **gated)
    return CacheSetup(allocated_bytes(caches()), setup.evictor, setup)


def dense_bytes(model: Transformer, tokens: int, batch_size: int = 1) -> int:
    """What DenseCache holds for `tokens` positions of every layer and batch row (K and V, in the model's dtype),
    without allocating it: the dense cache a write-gated one is compared with."""
    c = model.config
    return 2 * c.n_layers * batch_size * c.n_kv_heads * tokens * c.head_dim * model.output.weight.element_size()


def setup_write_gated(model: Transformer, gate: str | list[nn.Module], *, batch_size: int, max_seq_len: int,
                      dtype: torch.dtype, device: torch.device | str, window: int | None = None,
                      threshold: float | None = None, global_capacity: int | list[int] | None = None,
                      kv_budget: str | Budget | None = None, page_size: int = DEFAULT_PAGE_SIZE,
                      evict: str | None = EVICTION[0], backend: str = "auto", seed: int = 0,
                      select_budget: int | None = None,
                      cache: type[WriteGatedCache] = WriteGatedCache) -> GatedSetup:
    """Install gates and a WriteGatedCache in every layer, their stores drawing on one PagePool.

    gate: the --gate spec (PATH | PATH@SETTING | full | none | random:P | sink:N), or one gate module per
    layer. A gate file runs at the setting named, else at the one of the given threshold, else at its default
    (choose_setting); window defaults to the file's, else W = 256, and threshold to the setting's, else
    tau = 0.1. The capacity per head defaults to what max_seq_len needs (the built-in policies that admit less
    get less; a list: one per layer); kv_budget (parse_budget's forms, or a Budget) sizes the pool, by default
    from the setting's measured admission.
    evict: lowest-g or snapkv, the Eviction that makes room when the pool runs short (cache.Eviction), or
    None for none. select_budget: Quest's selection in decode (DESIGN.md's Selection), N tokens attended per
    step per KV head, the window's W among them: (N - W) // page_size pages of the store; the pool then keeps
    page summaries. cache: WriteGatedCache or a subclass built with its arguments (eval's SnapKVCache). Bad
    input raises GateError (one line); an unavailable backend raises ValueError (one line).
    """
    if evict is not None and evict not in EVICTION:
        raise GateError(f"--evict {evict!r}: expected one of {', '.join(EVICTION)}")
    budget = kv_budget if isinstance(kv_budget, Budget) else parse_budget(kv_budget)
    if budget is not None and budget.kind in ("bytes", "tokens"):   # tensor parallelism: each rank's pool its share
        budget = replace(budget, value=budget.value / model.tp.world)
    if isinstance(gate, str):
        policy = parse_policy(gate)
        gates, metadata = make_gates(policy, model, seed)
    else:
        policy, gates, metadata = Policy("given"), gate, {}
    window = window if window is not None else metadata.get("window", DEFAULT_WINDOW)
    admitted = None
    if policy.kind == "file":
        name, setting = choose_setting(metadata, policy.setting, threshold, policy.path)
        policy = replace(policy, setting=name)
        threshold, admitted = setting["threshold"], setting.get("admitted_per_layer")
    threshold = threshold if threshold is not None else DEFAULT_THRESHOLD
    if window < 1:
        raise GateError(f"window {window} must be at least 1")
    if page_size < 1:
        raise GateError(f"page size {page_size} must be at least 1")
    select_pages = 0 if select_budget is None else selected_pages(select_budget, window, page_size)
    needed = max_seq_len - window
    if policy.kind == "none":
        needed = 0
    elif policy.kind == "sink":
        needed = min(needed, policy.n_sink)
    c = model.config
    capacity = global_capacity if global_capacity is not None else max(needed, 1)
    per_layer = capacity if isinstance(capacity, list) else [capacity] * c.n_layers
    if min(per_layer) < 1:
        raise GateError(f"global capacity {min(per_layer)} must be at least 1")
    per_layer = [pages_for(n, page_size) * page_size for n in per_layer]    # what the page table holds
    capacity = per_layer if isinstance(capacity, list) else per_layer[0]
    backend = resolve_backend(backend, device)
    install(model, [g.to(device=device, dtype=torch.float32).requires_grad_(False) for g in gates])
    n_pages, how = pool_pages(budget, n_layers=c.n_layers, batch_size=batch_size, n_kv_heads=c.n_kv_heads,
                              head_dim=c.head_dim, capacity=per_layer, page_size=page_size, dense_tokens=max_seq_len,
                              element_size=torch.empty((), dtype=dtype).element_size(),
                              admitted_per_layer=admitted)
    pool = PagePool(n_pages, page_size, c.head_dim, dtype, device, summaries=select_budget is not None)
    # A window longer than the sequence sees the same keys as one of max_seq_len slots: allocate no more.
    ring = min(window, max_seq_len)
    observe = SNAPKV_OBSERVE if evict == "snapkv" else 0
    model.setup_caches(lambda i: cache(batch_size, c.n_kv_heads, c.head_dim, ring, threshold, per_layer[i],
                                       dtype, device, backend, pool=pool, observe=observe, n_heads=c.n_heads,
                                       select_pages=select_pages))
    evictor = Eviction([layer.attention.cache for layer in model.layers], evict) if evict is not None else None
    return GatedSetup(str(policy), window, threshold, capacity, backend, max_seq_len, n_pages, page_size, how, evict,
                      select_budget, select_pages, evictor, metadata)


def admission_stats(model: Transformer, counts: list[dict[str, Tensor]] | None = None) -> dict:
    """What the write-gated caches did, read from the device once (after generation, not in the loop): the
    counts of what the caches hold now, or the given ones (cache.summed_counts, e.g. generate_rows' sum over
    prompts that have left the caches); the pool and the bytes allocated are always the caches' own.

    admitted_fraction: tokens with g > tau among all tokens scored (those still in the ring included);
    bytes_in_use: K/V held (ring + store) vs dense_bytes, a dense cache of the same tokens;
    bytes_allocated: rings, page tables and the pool, all that the caches allocated;
    capacity_drops: admitted tokens that a head without room (its capacity or the pool spent) threw away;
    pages_scored_per_step, tokens_read_per_step: what a decode step did per KV head, on average.
    """
    caches = [layer.attention.cache for layer in model.layers]
    pools = list({id(c.pool): c.pool for c in caches}.values())                                # for the page counts
    per_layer = summed_counts(caches) if counts is None else counts
    counts = {k: torch.stack([layer[k] for layer in per_layer]).tolist() for k in per_layer[0]}
    per_token = caches[0].bytes_per_token()
    admitted, seen = counts["admitted"], counts["seen"]
    return {
        "admitted_fraction": sum(admitted) / max(sum(seen), 1),
        "admitted_fraction_per_layer": [a / max(s, 1) for a, s in zip(admitted, seen)],
        "bytes_allocated": allocated_bytes(caches),
        "bytes_in_use": sum(counts["held"]) * per_token,
        "dense_bytes": sum(seen) * per_token,
        "pages_in_use": sum(p.n_pages for p in pools) - int(sum(p.n_free for p in pools)),
        "pool_pages": sum(p.n_pages for p in pools),
        "capacity_drops": sum(counts["capacity_drops"]),
        "evicted": sum(counts["evicted"]),
        # Per decode step and KV head, averaged over every layer's heads and steps: the store's pages scored
        # (selection; 0 without it) and the tokens attended, ring and store.
        "pages_scored_per_step": sum(counts["scored"]) / max(sum(counts["decoded"]), 1),
        "tokens_read_per_step": sum(counts["read"]) / max(sum(counts["decoded"]), 1),
    }


def format_stats(stats: dict, dense_allocated: int | None = None, eviction: Eviction | None = None) -> str:
    """The statistics as lines for stderr; dense_allocated: what a dense cache of the same --max-seq-len
    allocates; eviction: the Eviction that served the pool, for its policy and passes."""
    per_layer = " ".join(f"{f:.2f}" for f in stats["admitted_fraction_per_layer"])
    dense = (f" vs dense {dense_allocated / 2**20:.2f} MiB ({stats['bytes_allocated'] / max(dense_allocated, 1):.1%})"
             if dense_allocated else "")
    evicted = (f"{stats['evicted']} evicted later, by {eviction.passes} {eviction.policy} passes" if eviction else
               f"{stats['evicted']} evicted later")
    return (f"admitted {stats['admitted_fraction']:.1%} of tokens (per layer: {per_layer})\n"
            f"KV bytes in use {stats['bytes_in_use'] / 2**20:.2f} MiB vs dense {stats['dense_bytes'] / 2**20:.2f} MiB "
            f"({stats['bytes_in_use'] / max(stats['dense_bytes'], 1):.1%}); allocated {stats['bytes_allocated'] / 2**20:.2f} MiB"
            f"{dense}; pool pages in use {stats['pages_in_use']} of {stats['pool_pages']}; a decode step read "
            f"{stats['tokens_read_per_step']:.1f} tokens per KV head and scored {stats['pages_scored_per_step']:.1f} pages\n"
            f"admitted tokens lost to the capacity or the budget: {stats['capacity_drops'] + stats['evicted']} "
            f"({stats['capacity_drops']} not stored: a head without room keeps its highest-g tokens; {evicted})")


def main(file: str) -> None:
    try:
        gates, metadata = load_gates(file)
    except GateError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    for key, value in sorted(metadata.items()):   # the header's order is the writer's map order, not the file's
        if key not in ("settings", "default_setting"):
            print(f"{key}: {value}")
    print("settings (run one with --gate FILE@NAME or --threshold TAU; FILE alone runs the default):")
    print(f"  {'NAME':8} {'TAU':6} {'DEFAULT':8} {'ADMITTED':9} PER LAYER (measured on the training split)")
    for name, setting in metadata["settings"].items():
        admitted = setting.get("admitted_per_layer")
        mean = f"{sum(admitted) / len(admitted):.1%}" if admitted else "-"
        per_layer = " ".join(f"{a:.2f}" for a in admitted) if admitted else "not measured"
        default = "yes" if name == metadata["default_setting"] else ""
        print(f"  {name:8} {setting['threshold']:<6g} {default:8} {mean:9} {per_layer}")
    g = gates[0]
    n_params = sum(p.numel() for gate in gates for p in gate.parameters())
    print(f"layers: {len(gates)}, KV heads: {g.n_kv_heads}, head dim: {g.head_dim}, hidden: {g.hidden}, parameters: {n_params:,}")
    for name, t in g.official_state().items():
        print(f"  model.layers.*.self_attn.g_predictors.{name}: {tuple(t.shape)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print a write-gate file's metadata, settings and shapes.")
    parser.add_argument("file", help="a gate file (.safetensors, or the authors' .pt)")
    main(**vars(parser.parse_args()))
