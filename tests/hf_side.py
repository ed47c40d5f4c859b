"""transformers' side of the tests, run in the child process that hf_process.py starts (it says why; the tests
call these through tiny.hf_call): tiny random models that transformers builds and saves, their logits,
greedy generate, the keys its Qwen3 writes, and its tokenizer. Only plain values and tensors go back."""
from pathlib import Path

import torch
import transformers

LLAMA = dict(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False,
             bos_token_id=0, eos_token_id=1)
QWEN3 = LLAMA | dict(head_dim=24)   # a head dim that is not hidden / heads (16)
ARCHITECTURES = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, LLAMA),
                 "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config, QWEN3)}
TOKENIZERS = []   # open_tokenizer's handles index this


def randomized(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """Norm weights away from one and biases away from zero, so that a norm or bias left out shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def save_random_model(path: Path, architecture: str, seed: int = 0, **config) -> dict:
    """A transformers Llama or Qwen3 with random weights large enough that logits differ clearly, norms not
    all ones, saved to path; returns its config as a dict."""
    model_class, config_class, defaults = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    model = randomized(model_class(config_class(**(defaults | config))))
    model.save_pretrained(path)
    return model.config.to_dict()


def load(checkpoint: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def logits(checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load(checkpoint)(tokens).logits                                   # (B, T, vocab)


def greedy(checkpoint: Path, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int],
           repetition_penalty: float = 1.0) -> list[int]:
    """generate's new tokens, greedy, the stop token it ended on included."""
    ids = torch.tensor([prompt_ids])                                             # (1, T)
    # An explicit mask: transformers would otherwise mask every prompt token equal to pad_token_id.
    out = load(checkpoint).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_new_tokens, eos_token_id=sorted(stop_ids),
                                    pad_token_id=max(stop_ids), repetition_penalty=repetition_penalty)
    return out[0, len(prompt_ids):].tolist()


def qwen3_keys(checkpoint: Path, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's k_norm(k_proj(x)) before RoPE, (1, Hkv, T, D), and the key its DynamicCache holds after."""
    model, normed = load(checkpoint), []
    for layer in model.model.layers:
        layer.self_attn.k_norm.register_forward_hook(lambda m, args, out: normed.append(out.transpose(1, 2)))
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(tokens, cache=cache, use_cache=True)
    return normed, [layer.keys for layer in cache.layers]


def open_tokenizer(path: Path) -> tuple[int, int | None, int | None]:
    """AutoTokenizer of path, kept here: (its handle for call_tokenizer, bos_token_id, eos_token_id)."""
    TOKENIZERS.append(transformers.AutoTokenizer.from_pretrained(path))
    return len(TOKENIZERS) - 1, TOKENIZERS[-1].bos_token_id, TOKENIZERS[-1].eos_token_id


def call_tokenizer(handle: int, method: str, *args, **kwargs):
    """A method of an open tokenizer; a BatchEncoding comes back as a dict."""
    out = getattr(TOKENIZERS[handle], method)(*args, **kwargs)
    return dict(out) if isinstance(out, transformers.BatchEncoding) else out
