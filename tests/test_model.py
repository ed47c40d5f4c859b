"""model.py and the dense cache against transformers' LlamaForCausalLM on tiny random configs (Qwen3: test_qwen3.py)."""
import contextlib

import pytest
import torch

from cache import DenseCache
from model import CheckpointError, LlamaConfig, Transformer
from tiny import hf_call

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}
CONFIGS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa-head-dim": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32),
    "gqa-llama3-rope": dict(num_attention_heads=8, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
    "gqa-attention-bias": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True),
}


def both(tmp_path, **config) -> tuple[Transformer, torch.Tensor, torch.Tensor]:
    """Our model loaded from the checkpoint transformers saved; tokens (1, 48) and transformers' logits."""
    hf_config = hf_call("save_random_model", tmp_path, "llama", **config)
    ours = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, hf_config["vocab_size"], (1, 48), generator=torch.Generator().manual_seed(1))
    expected = hf_call("logits", tmp_path, tokens)                      # (1, T, vocab)
    return ours, tokens, expected


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    ours, tokens, expected = both(tmp_path, **CONFIGS[name])
    with torch.no_grad():
        logits = ours(tokens)
    assert expected.std() > 0.5, "logits too flat to compare"
    torch.testing.assert_close(logits, expected, rtol=0, atol=2e-5)


def test_llama3_rope_scaling_changes_logits(tmp_path):
    # Guards the test above: with positions past original_max_position_embeddings the scaling matters.
    ours, tokens, expected = both(tmp_path, **CONFIGS["gqa-llama3-rope"])
    plain = Transformer(LlamaConfig(**{**ours.config.__dict__, "rope_scaling": {}}))
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (plain(tokens) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["gqa-tied", "gqa-llama3-rope"])
def test_dense_cache_decode_equals_full_forward(tmp_path, name):
    """Prefill of the first 20 tokens, then one token at a time through DenseCache: same logits as one pass."""
    ours, tokens, _ = both(tmp_path, **CONFIGS[name])
    c, T, P = ours.config, tokens.shape[1], 20
    with torch.no_grad():
        full = ours(tokens)                                             # (1, T, vocab)
        ours.setup_caches(lambda i: DenseCache(1, c.n_kv_heads, T + 4, c.head_dim, torch.float32))
        steps = [ours(tokens[:, :P], torch.arange(P))]
        steps += [ours(tokens[:, t:t + 1], torch.tensor([t])) for t in range(P, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-5)


def test_bad_config_is_named(tmp_path):
    hf_call("save_random_model", tmp_path, "llama")
    config = (tmp_path / "config.json").read_text().replace('"hidden_act": "silu"', '"hidden_act": "gelu"')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="hidden_act"):
        Transformer.from_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    hf_call("save_random_model", tmp_path, "llama")
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.w3\.weight"):
        Transformer.from_pretrained(tmp_path)


def test_wide_projections_are_column_major_with_the_checkpoints_values(tmp_path):
    """from_pretrained stores the projections wider than tall column-major (model.Linear), one copy, the tied
    embedding sharing the head's; names, shapes and values are the checkpoint's (q/k/v and the MLP's gate and up
    projections stacked, fuse_projections)."""
    from safetensors.torch import load_file
    from model import Linear, fuse_projections, hf_to_ours
    hf_call("save_random_model", tmp_path, "llama", **CONFIGS["gqa-tied"])
    ours = Transformer.from_pretrained(tmp_path)
    saved = fuse_projections({hf_to_ours(k): v for k, v in load_file(tmp_path / "model.safetensors").items()})
    assert set(ours.state_dict()) == set(Transformer(ours.config).state_dict())
    layouts = set()
    for name, module in ours.named_modules():
        if isinstance(module, Linear):
            w, wide = module.weight, module.out_features > module.in_features
            assert w.t().is_contiguous() if wide else w.is_contiguous(), name
            torch.testing.assert_close(w, saved.get(f"{name}.weight", saved["tok_embeddings.weight"]), rtol=0, atol=0)
            layouts.add(wide)
    assert layouts == {True, False}, "the tiny model should have projections of both kinds"
    assert ours.output.weight is ours.tok_embeddings.weight


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n inside the block, the caller's count restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def test_compiled_decode_loads_every_projection_row_major(tmp_path):
    """compiled=True (generate.py --compile) with several threads stores every projection row-major, for Inductor's
    multiply-and-sum, with the checkpoint's values (with one thread, the eager layout); lay_out_for_decode turns a
    model from one layout to the other and back, the tied embedding sharing the head's tensor throughout."""
    from model import Linear
    hf_call("save_random_model", tmp_path, "llama", **CONFIGS["gqa-tied"])

    def layouts(model):
        return {name: m.weight.is_contiguous() for name, m in model.named_modules() if isinstance(m, Linear)}

    with torch_threads(1):
        one_thread = Transformer.from_pretrained(tmp_path, compiled=True)
    with torch_threads(2):
        eager, compiled = Transformer.from_pretrained(tmp_path), Transformer.from_pretrained(tmp_path, compiled=True)
        assert all(layouts(compiled).values()) and not all(layouts(eager).values())
        assert layouts(one_thread) == layouts(eager)
        for name, value in compiled.state_dict().items():
            torch.testing.assert_close(value, eager.state_dict()[name], rtol=0, atol=0)
        before = layouts(eager)
        eager.lay_out_for_decode(compiled=True)
        assert layouts(eager) == layouts(compiled) and eager.output.weight is eager.tok_embeddings.weight
        eager.lay_out_for_decode()
        assert layouts(eager) == before and eager.output.weight is eager.tok_embeddings.weight
        for name, value in compiled.state_dict().items():
            torch.testing.assert_close(value, eager.state_dict()[name], rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_one_row_linear_equals_f_linear_eager_and_compiled(layout, threads):
    """A decode step's one-row product in either layout, eager and compiled, and the input gradient the gate
    trainer backpropagates through it: F.linear on the contiguous weight. With 3 threads the eager product runs
    as 3 blocks of 16 output columns (Linear.split_product)."""
    import torch.nn.functional as F
    from model import Linear, column_major
    torch.manual_seed(0)
    layer = Linear(16, 48, bias=True).requires_grad_(False)
    reference = layer.weight.clone()
    if layout == "column-major":
        layer.weight = torch.nn.Parameter(column_major(layer.weight), requires_grad=False)
    x = torch.randn(1, 1, 16, requires_grad=True)
    expected = F.linear(x, reference, layer.bias)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    with torch_threads(threads):
        y = layer(x)
        (grad,) = torch.autograd.grad(y.square().sum(), x)
        compiled = torch.compile(layer, fullgraph=True)
        y_compiled = compiled(x.detach())
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_compiled, expected.detach(), rtol=1e-5, atol=1e-5)
