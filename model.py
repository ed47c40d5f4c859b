"""Llama and Qwen3 in plain PyTorch: config from a Hugging Face config.json, lazy safetensors loading.

One model for both: Qwen3 is a Llama with an RMSNorm on each query and key head before RoPE
(q_norm, k_norm), an explicit head_dim and possibly biased attention projections.

The model knows nothing of KV-cache policy. Each attention layer computes q, the key before and
after RoPE and v, asks its `gate` (if any) for one admission score per KV head and token, and hands
everything to its `cache`, which writes and attends (see cache.py). Without a cache a layer runs
plain causal attention over the tokens it is given.
"""
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the problem in one line."""


# The architectures a config.json may name, with the model_type that goes with each.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}
# Keys of a config.json that describe the file or training, not the forward pass.
_METADATA_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id", "attention_dropout",
    "pretraining_tp", "output_hidden_states", "output_attentions", "return_dict", "id2label",
    "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "transformers.js_config",
    "tokenizer_class", "max_length", "quantization_config_ignored", "pruned_heads", "tie_encoder_decoder",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "add_cross_attention", "cross_attention_hidden_size",
    "is_decoder", "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
}
# Keys whose only supported value is the one given: anything else changes the math.
_FIXED_KEYS = {"hidden_act": "silu", "mlp_bias": False}
# Qwen3's sliding-window keys: read only to refuse sliding attention, which changes the math.
_QWEN3_KEYS = {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}


@dataclass
class LlamaConfig:
    vocab_size: int
    dim: int                      # hidden size
    n_layers: int
    n_heads: int                  # Hq
    n_kv_heads: int               # Hkv
    intermediate_size: int
    head_dim: int = 0             # D; 0 means dim // n_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)   # {} or Llama-3 "llama3" scaling parameters
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on the q, k, v and output projections
    qk_norm: bool = False         # Qwen3: RMSNorm (weight (D,)) on each query and key head before RoPE

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(f"num_attention_heads {self.n_heads} is not a multiple of num_key_value_heads {self.n_kv_heads}")
        rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise CheckpointError(f"rope scaling type {rope_type!r} is not supported (supported: none, 'llama3')")

    def shard(self, world: int) -> "LlamaConfig":
        """One rank's share under tensor parallelism over `world` processes: its query and KV heads and its slice
        of the MLP (whole heads each, so every query head's KV head is on its rank). CheckpointError, one line,
        where world does not divide them."""
        if world == 1:
            return self
        sizes = {"query heads": self.n_heads, "KV heads": self.n_kv_heads, "intermediate size": self.intermediate_size}
        bad = [f"{name} {n}" for name, n in sizes.items() if n % world]
        if bad:
            raise CheckpointError(f"tensor parallelism over {world} processes needs {world} to divide the model's "
                                  f"query heads, KV heads and intermediate size, and it does not divide its "
                                  f"{', '.join(bad)}")
        return replace(self, n_heads=self.n_heads // world, n_kv_heads=self.n_kv_heads // world,
                       intermediate_size=self.intermediate_size // world)

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Build from the dict of a Hugging Face LlamaForCausalLM or Qwen3ForCausalLM config.json; fail
        loudly on anything else."""
        model_type = hf.get("model_type", "llama")
        archs = hf.get("architectures") or [a for a, t in ARCHITECTURES.items() if t == model_type][:1]
        if len(archs) != 1 or ARCHITECTURES.get(archs[0]) != model_type:
            raise CheckpointError(f"architecture {archs} / model_type {model_type!r} is not supported (supported: "
                                  + ", ".join(f"{a} with model_type {t!r}" for a, t in ARCHITECTURES.items()) + ")")
        qwen3 = model_type == "qwen3"
        for key, supported in _FIXED_KEYS.items():
            if key in hf and hf[key] != supported:
                raise CheckpointError(f"config.json {key}={hf[key]!r} is not supported (supported: {supported!r})")
        if qwen3:
            if hf.get("use_sliding_window"):
                raise CheckpointError("config.json use_sliding_window=true is not supported (sliding-window attention; "
                                      "supported: full attention in every layer)")
            sliding = [i for i, t in enumerate(hf.get("layer_types") or []) if t != "full_attention"]
            if sliding:
                raise CheckpointError(f"config.json layer_types has {hf['layer_types'][sliding[0]]!r} in layers "
                                      f"{sliding[:8]}{'...' if len(sliding) > 8 else ''}, which is not supported "
                                      f"(supported: 'full_attention' in every layer)")
        # transformers 5 keeps rope_theta inside rope_parameters; 4.x has rope_theta and rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        mapping = {
            "vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
            "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
            "intermediate_size": "intermediate_size", "head_dim": "head_dim", "rms_norm_eps": "rms_norm_eps",
            "max_position_embeddings": "max_position_embeddings", "tie_word_embeddings": "tie_word_embeddings",
            "attention_bias": "attention_bias",
        }
        supported = set(mapping) | {"rope_theta", "rope_scaling", "rope_parameters"} | (_QWEN3_KEYS if qwen3 else set())
        known = supported | _METADATA_KEYS | set(_FIXED_KEYS)
        unknown = sorted(k for k in hf if k not in known and not k.startswith("_"))
        if unknown:
            raise CheckpointError(f"config.json has unsupported fields {unknown} (supported: {sorted(supported)})")
        # Qwen3's defaults for these differ from Llama's (head_dim 128, eps 1e-6): demand them, guess neither.
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
        missing = [k for k in required + (["head_dim", "rms_norm_eps"] if qwen3 else []) if k not in hf]
        if missing:
            raise CheckpointError(f"config.json lacks required fields {missing}")
        kwargs = {ours: hf[theirs] for theirs, ours in mapping.items() if hf.get(theirs) is not None}
        kwargs.setdefault("n_kv_heads", kwargs["n_heads"])
        return cls(**kwargs, rope_theta=float(theta), rope_scaling=rope, qk_norm=qwen3)


@dataclass(frozen=True)
class TensorParallel:
    """This process's share of a model split over `world` processes (gpt-fast's tensor parallelism, started by
    torchrun): rank `rank` holds query and KV heads and MLP columns rank*n/world..(rank+1)*n/world - 1 of each
    layer, and `group` sums the partial outputs of the row-parallel projections. world 1: the whole model."""
    rank: int = 0
    world: int = 1
    group: dist.ProcessGroup | None = None


def start_tensor_parallel(device: str) -> tuple[TensorParallel, str]:
    """The TensorParallel of this process and its device: under torchrun (WORLD_SIZE > 1) the process group is
    started, gloo on CPUs and NCCL on GPUs with one GPU per process (cuda:LOCAL_RANK); else the whole model."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return TensorParallel(), device
    if torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return TensorParallel(dist.get_rank(), dist.get_world_size(), dist.group.WORLD), device


def all_reduce(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """The sum over the ranks of a row-parallel projection's partial outputs; x itself in one process. A functional
    collective, which a compiled step traces (fullgraph) and a CUDA graph captures."""
    return x if group is None else funcol.all_reduce(x, "sum", group)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Hugging Face's semantics: normalise in float32, then the weight multiplies in the input dtype. For float32
        # both are one fused op (one dispatch eager, where the spelled-out form is eight).
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_frequencies(config: LlamaConfig) -> Tensor:
    """Inverse frequencies (D/2,) in float64, with Llama-3 scaling when the config asks for it."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    s = config.rope_scaling
    if s:
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        is_medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(is_medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq


def rope_tables(angles: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and the signed sin that apply_rope takes, (..., D) in dtype, from the angles (..., D/2) of one frequency
    each: cos = cat(cos, cos) and sin_signed = cat(-sin, sin), Hugging Face's sin with its first half negated."""
    cos, sin = angles.cos(), angles.sin()
    cos, sin_signed = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    return (cos, sin_signed) if dtype == torch.float32 else (cos.to(dtype), sin_signed.to(dtype))


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotate-half RoPE (the Hugging Face layout), x * cos + rotate_half(x) * sin, where rotate_half(x) =
    cat(-x2, x1) is x rolled by D/2 with its first half negated, the sign carried by sin_signed (rope_tables): three
    ops. x: (B, H, T, D); cos, sin_signed: (T, D) or (B, 1, T, D)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


class Linear(nn.Linear):
    """nn.Linear whose one-row product (a decode step) streams its weight near the memory's rate on a CPU, in
    whichever of two layouts the weight is stored (Transformer.lay_out_for_decode picks them for eager or compiled
    decode); `weight` is (out, in) either way, as checkpoints hold it.

    - Row-major (contiguous): compiled for a CPU, the one-row product is a multiply-and-sum that Inductor fuses
      into one vectorised pass over the weight, where the BLAS matrix-vector product reads it at a third to a half
      of the memory's rate on this project's CPU (SmolLM2's head: 11 ms against 3.8 ms, 1 thread). Eager it is
      F.linear, at that BLAS rate.
    - Column-major (an (out, in) view of an (in, out) contiguous tensor): eager, F.linear then multiplies the row
      by the contiguous (in, out) matrix, the BLAS product that streams (SmolLM2's head: 4.4 ms against 8.8 ms, 2
      threads). Compiled it is that same BLAS call on one thread, slower with several than the multiply-and-sum
      over row-major weights (SmolLM2's compiled gated step at 1k, 2 threads: 37.2 against 31.2 ms, BENCHMARKS.md).
    - Eager with several threads, in either layout: the BLAS runs a one-row product on one thread, so the output
      columns are cut into one block per thread and multiplied as a batch (split_product), which the BLAS runs
      in parallel (SmolLM2's down projections, 2 threads: 35 against 20 GB/s; its head 53 against 28; a whole
      eager step 1.06-1.09x faster, BENCHMARKS.md). Compiled, the blocks would be copied out first (7 GB/s).
    More rows (a prefill) or a GPU: F.linear, whatever the layout.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.shape[:-1].numel() == 1:
            if torch.compiler.is_compiling():
                if self.weight.stride(-1) == 1:
                    y = (x[..., None, :] * self.weight).sum(-1)                             # (..., out)
                    return y if self.bias is None else y + self.bias
            elif (blocks := math.gcd(self.out_features, torch.get_num_threads())) > 1:
                return self.split_product(x, blocks)
        return F.linear(x, self.weight, self.bias)

    def split_product(self, x: Tensor, blocks: int) -> Tensor:
        """One row x (..., in) times the weight, its output columns in `blocks` equal blocks, one matrix product
        each, batched: weight.t() (in, out) -> (blocks, in, out / blocks) is a view in either layout."""
        columns = self.weight.t().unflatten(1, (blocks, -1)).transpose(0, 1)               # (blocks, in, out/blocks)
        y = torch.bmm(x.reshape(1, 1, -1).expand(blocks, 1, -1), columns)                 # (blocks, 1, out/blocks)
        y = y.view(*x.shape[:-1], -1)                                                      # (..., out)
        return y if self.bias is None else y + self.bias


def column_major(weight: Tensor) -> Tensor:
    """weight (out, in) with the same values, stored as the contiguous (in, out) matrix (one copy, no second one)."""
    return weight.t().contiguous().t()


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.group = group    # tensor parallelism: the heads are this rank's, wo's output a partial sum
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        bias = config.attention_bias
        # q_proj, k_proj and v_proj stacked along the output features, one product for the three (fuse_projections).
        self.wqkv = Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim, bias=bias)
        self.wo = Linear(config.n_heads * config.head_dim, config.dim, bias=bias)
        # Qwen3's per-head norms; one weight (D,) shared by all heads, as its checkpoints store it.
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        # Both set from outside (setup_caches, gate.install); the layer only calls them.
        self.cache: nn.Module | None = None   # (q, k, v, g, input_pos) -> (B, Hq, T, D)
        self.gate: nn.Module | None = None    # (k_pre, k_post, input_pos) -> g (B, Hkv, T)

    def forward(self, x: Tensor, cos: Tensor, sin_signed: Tensor, input_pos: Tensor) -> Tensor:
        B, T, _ = x.shape
        Hq, Hkv = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(B, T, Hq + 2 * Hkv, self.head_dim).transpose(1, 2)     # (B, Hq+2Hkv, T, D)
        qk, v = qkv.split((Hq + Hkv, Hkv), dim=1)                                       # (B, Hq+Hkv, T, D), (B, Hkv, T, D)
        if self.q_norm is not None:
            # The gate's pre-RoPE key is the normed one, as in the authors' Qwen3 patch (see README).
            q, k_pre = qk.split((Hq, Hkv), dim=1)
            q, k_pre = self.q_norm(q), self.k_norm(k_pre)                                  # (B, H, T, D)
            q, k = apply_rope(q, cos, sin_signed), apply_rope(k_pre, cos, sin_signed)
        else:
            q, k = apply_rope(qk, cos, sin_signed).split((Hq, Hkv), dim=1)               # one rotation for both
            k_pre = qk[:, Hq:] if self.gate is not None else None                          # (B, Hkv, T, D)
        g = self.gate(k_pre, k, input_pos) if self.gate is not None else None            # (B, Hkv, T)
        if self.cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, Hq, T, D)
        else:
            y = self.cache(q, k, v, g, input_pos)                                         # (B, Hq, T, D)
        return all_reduce(self.wo(y.transpose(1, 2).reshape(B, T, -1)), self.group)               # (B, T, dim)


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.group = group    # tensor parallelism: the intermediate columns are this rank's, w2's output a partial sum
        # gate_proj and up_proj stacked along the output features, one product for the two (fuse_projections).
        self.w13 = Linear(config.dim, 2 * config.intermediate_size, bias=False)
        self.w2 = Linear(config.intermediate_size, config.dim, bias=False)   # down_proj

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)                                          # (B, T, I) each
        return all_reduce(self.w2(F.silu(gate) * up), self.group)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.attention = Attention(config, group)
        self.ffn_norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.feed_forward = FeedForward(config, group)

    # Every block runs the same code on tensors of the same shapes: compiled, the block becomes one
    # subgraph that every layer calls, compiled once instead of once per layer (the step stays one graph,
    # so a CUDA graph still captures it whole). Eager, this is a plain call.
    @torch.compiler.nested_compile_region
    def forward(self, x: Tensor, cos: Tensor, sin_signed: Tensor, input_pos: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin_signed, input_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: LlamaConfig, tp: TensorParallel = TensorParallel()):
        """config: the checkpoint's; under tensor parallelism self.config is this rank's share of it
        (LlamaConfig.shard), from which its caches are built. The embeddings, norms and head are replicated."""
        super().__init__()
        self.tp = tp
        self.config = config = config.shard(tp.world)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, tp.group) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(config).float(), persistent=False)   # (D/2,)

    def lay_out_for_decode(self, compiled: bool = False) -> None:
        """Store each projection in the layout its one-row products read fastest on a CPU (see Linear), one weight
        at a time. Eager: those wider than tall (the head, the fused q/k/v, the MLP's fused gate and up projections)
        column-major, the narrower ones row-major, where the CPU's BLAS reads them faster than the other layout
        (SmolLM2's down projection). Compiled with several threads: every one row-major, for Inductor's
        multiply-and-sum, which runs on all of them where the BLAS runs a one-row product on one (with one thread
        the BLAS is as fast: the eager layout, 0.95x for the other in SmolLM2's compiled gated step). A tied embedding
        keeps sharing the head's tensor: one copy, whose rows a lookup reads strided when it is column-major (about
        50 ms per 1,000 prompt tokens for SmolLM2's, against 0.4 ms contiguous). Names, shapes and values stay as
        they were; a second call with the other mode lays the weights out again."""
        tied = self.output.weight is self.tok_embeddings.weight
        for m in self.modules():
            if isinstance(m, Linear) and m.weight.device.type == "cpu":
                column = m.out_features > m.in_features and not (compiled and torch.get_num_threads() > 1)
                if m.weight.is_contiguous() == column:   # not in the layout wanted
                    weight = m.weight.detach()
                    m.weight = nn.Parameter(column_major(weight) if column else weight.contiguous(),
                                            requires_grad=m.weight.requires_grad)
        if tied:
            self.tok_embeddings.weight = self.output.weight

    def setup_caches(self, make_cache) -> None:
        """Give every layer its own cache: make_cache(layer_index) returns the module (see cache.py)."""
        for i, layer in enumerate(self.layers):
            layer.attention.cache = make_cache(i)

    def body(self, tokens: Tensor, input_pos: Tensor | None = None, recompute: bool = False) -> Tensor:
        """Final-normed hidden states (B, T, dim). tokens: (B, T); input_pos: (T,) positions of the tokens, shared
        by the rows, or (B, T), each row's own (a decode step of rows at different positions).
        recompute: under autograd, keep only each block's input and recompute the block in backward
        (activation checkpointing, for training at long sequences)."""
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        # The angles are built in float32 from the positions, so no (S_max, D) table need be kept.
        angles = input_pos.float()[..., None] * self.inv_freq                          # (T, D/2) or (B, T, D/2)
        if angles.dim() == 3:
            angles = angles[:, None]                                                   # (B, 1, T, D/2), over the heads
        x = self.tok_embeddings(tokens)                                                # (B, T, dim)
        cos, sin_signed = rope_tables(angles, x.dtype)                                        # (T, D) or (B, 1, T, D)
        for layer in self.layers:
            if recompute and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin_signed, input_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin_signed, input_pos)
        return self.norm(x)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab) in float32."""
        return self.output(self.body(tokens, input_pos)).float()

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", tp: TensorParallel = TensorParallel(),
                        compiled: bool = False) -> "Transformer":
        """Load a Hugging Face Llama or Qwen3 directory (config.json + *.safetensors, single or sharded); under
        tensor parallelism only this rank's slices of the split weights are read (read_tensor). compiled: the
        weights laid out for a compiled decode step, else for an eager one (lay_out_for_decode)."""
        from safetensors import safe_open
        checkpoint = Path(checkpoint)
        config = LlamaConfig.from_hf(read_json(checkpoint / "config.json"))
        with torch.device("meta"):
            model = cls(config, tp)
        index = checkpoint / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(read_json(index)["weight_map"].values()))
        else:
            files = sorted(p.name for p in checkpoint.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{checkpoint} holds no *.safetensors weights")
        # Checked in the checkpoint's tensors (wq, wk, wv, w1, w3 apart), so that a message names the file's own.
        expected = {name: p.shape for name, p in split_projections(model.state_dict(), model.config).items()}
        state = {}
        for name in files:
            with safe_open(checkpoint / name, framework="pt", device=str(device)) as f:
                for hf_name in f.keys():
                    ours = hf_to_ours(hf_name)
                    if ours is None:
                        continue
                    state[ours] = read_tensor(f, hf_name, ours, tp).to(dtype)
        if config.tie_word_embeddings or ("output.weight" not in state and "tok_embeddings.weight" in state):
            state.setdefault("output.weight", state.get("tok_embeddings.weight"))
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        wrong = sorted(f"{n} {tuple(state[n].shape)} != {tuple(expected[n])}" for n in set(state) & set(expected)
                       if state[n].shape != expected[n])
        if missing or extra or wrong:
            raise CheckpointError(f"{checkpoint}: weights do not match config.json: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                                  f"unexpected {extra[:5]}, wrong shapes {wrong[:5]}")
        model.load_state_dict(fuse_projections(state), assign=True)
        del state   # the model holds the weights now: each one re-laid out below is freed as it goes
        model.inv_freq = rope_frequencies(config).float().to(device)
        if config.tie_word_embeddings:
            model.output.weight = model.tok_embeddings.weight
        model.lay_out_for_decode(compiled)
        return model.eval().requires_grad_(False)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(checkpoint: str | Path, device: str | torch.device) -> str:
    """The dtype a run takes when none is asked for. On a CPU float32: bf16 matrix products are slow there
    without AVX512-BF16, and the embedded model is stored in float32. On a GPU the checkpoint's own
    (config.json's `dtype`, else `torch_dtype`, else bfloat16): the published Llama and Qwen3 models are bf16,
    which takes half of float32's memory and feeds the tensor cores, where float32 tiles would be slower."""
    if torch.device(device).type == "cpu":
        return "float32"
    config = read_json(Path(checkpoint) / "config.json")
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return name if name in DTYPES else "bfloat16"


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None


_HF_LAYER_NAMES = {
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm",
    "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
}


# The weights tensor parallelism splits, by the dim that is split: 0 for the column-parallel projections (their
# output features: whole heads, MLP columns), 1 for the row-parallel ones (their input features), whose partial
# outputs all_reduce sums. Named as the checkpoint's tensors, before fuse_projections stacks a rank's slices.
_SPLIT_DIM = {"attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "feed_forward.w1": 0, "feed_forward.w3": 0,
              "attention.wo": 1, "feed_forward.w2": 1}


# The projections the model holds fused, each with the checkpoint's tensors it stacks along its output features, in
# order (gpt-fast's wqkv and w13): one product instead of three or two. An eager one-row decode step on the dev CPU
# (2 threads, weights cold) measured 148 us for SmolLM2's fused q/k/v product against 195 us for three, 393 against
# 440 us for the gate and up projections.
_FUSED = {"attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
          "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3")}


def fuse_projections(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """state, in hf_to_ours's names, with each fused projection's tensors (weights and biases) concatenated into the
    model's (_FUSED): layers.{i}.attention.wq/wk/wv.* into layers.{i}.attention.wqkv.*, feed_forward.w1/w3.* into
    feed_forward.w13.*. In place: the pieces are dropped as each group is stacked, so one extra group is held at a
    time. Under tensor parallelism they are this rank's slices (read_tensor), so wqkv is the rank's heads of each."""
    for fused, parts in _FUSED.items():
        first = f".{parts[0]}."
        for name in [n for n in state if first in n]:
            names = [name.replace(first, f".{p}.") for p in parts]
            if all(n in state for n in names):
                state[name.replace(first, f".{fused}.")] = torch.cat([state.pop(n) for n in names])
    return state


def split_projections(state: dict[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """The inverse of fuse_projections: a model's state_dict with each fused projection's tensors split (views) into
    the checkpoint's, named as hf_to_ours names them. config: the model's own (a rank's share under tensor
    parallelism)."""
    D = config.head_dim
    sizes = {"attention.wqkv": (config.n_heads * D, config.n_kv_heads * D, config.n_kv_heads * D),
             "feed_forward.w13": (config.intermediate_size, config.intermediate_size)}
    out = {}
    for name, t in state.items():
        fused = next((f for f in _FUSED if f".{f}." in name), None)
        if fused is None:
            out[name] = t
            continue
        for part, piece in zip(_FUSED[fused], t.split(sizes[fused])):
            out[name.replace(f".{fused}.", f".{part}.")] = piece
    return out


def read_tensor(f, hf_name: str, ours: str, tp: TensorParallel) -> Tensor:
    """The tensor `hf_name` of an open safetensors file as this rank holds it: for a split weight (_SPLIT_DIM) or
    a column-parallel bias only its slice is read (get_slice); a row-parallel bias is added once, by rank 0;
    anything else whole (replicated)."""
    module, _, kind = ours.rpartition(".")
    split = _SPLIT_DIM.get(module.partition(".")[2].partition(".")[2])     # layers.{i}.<module>
    if tp.world == 1 or split is None:
        return f.get_tensor(hf_name)
    if kind == "bias" and split == 1:
        bias = f.get_tensor(hf_name)
        return bias if tp.rank == 0 else torch.zeros_like(bias)
    sliced = f.get_slice(hf_name)
    n = sliced.get_shape()[split] // tp.world
    own = slice(tp.rank * n, (tp.rank + 1) * n)
    return sliced[own] if split == 0 else sliced[:, own]


def hf_to_ours(name: str) -> str | None:
    """Map a Hugging Face Llama or Qwen3 tensor name to ours, one to one: q_proj, k_proj and v_proj to wq, wk and wv,
    gate_proj and up_proj to w1 and w3, which fuse_projections then stacks; None for buffers we rebuild (rotary
    inv_freq)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name == "model.embed_tokens.weight":
        return "tok_embeddings.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers":
        module = ".".join(parts[3:-1])
        if module in _HF_LAYER_NAMES:
            return f"layers.{parts[2]}.{_HF_LAYER_NAMES[module]}.{parts[-1]}"
    return name   # left as is, so the mismatch check names it
