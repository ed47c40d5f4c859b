"""Qwen3ForCausalLM: model.py against transformers, the key the gate reads, the refused configs, the gated
cache against the visibility-rule oracle (DESIGN.md), greedy generate.py against transformers' generate, and the authors' gate files
at the real shapes of the three models they publish gates for."""
import pytest
import torch

import gate
import generate
from cache import DenseCache
from model import CheckpointError, LlamaConfig, Transformer
from test_gate import authors_checkpoint
from test_gated_cache import generate as prefill_and_decode
from test_gated_cache import oracle_logits, random_gates, setup_learned, visibility_mask
from tiny import hf_call, save_tiny_checkpoint
from tokenizer import Tokenizer

CONFIGS = {   # hf_side.QWEN3's head dim is 24, not hidden / heads = 16
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa-bias-head-dim-32": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, attention_bias=True),
}

# The published config.json of the three models with published gates, as public copies hold them.
# Llama-3.1-8B: citsjtu2020/LLM-Prof, sglang/Model_Config.md (the base model's file; the Instruct model has
# the same architecture and other EOS ids). Qwen3-4B-Thinking-2507: akougkas/warpio-cli,
# warpio-docs/ai-docs/model_cards/qwen3:4b.md; Qwen3-4B-Instruct-2507 has the same shapes (36 blocks, 32 / 8
# heads, key length 128, 2560 / 9728 wide, rope base 5e6 in its GGUF metadata; 36 layers, 32 Q and 8 KV heads
# on its model card).
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
QWEN3_4B_2507 = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560, "initializer_range": 0.02,
    "intermediate_size": 9728, "max_position_embeddings": 262144, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 5000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}
# model -> (config.json, gate hidden width: the authors' g_expand 4.0 for Llama, 1.5 for Qwen3, times head dim 128)
PUBLISHED = {"llama-3.1-8b-instruct": (LLAMA_31_8B, 512), "qwen3-4b-instruct-2507": (QWEN3_4B_2507, 192),
             "qwen3-4b-thinking-2507": (QWEN3_4B_2507, 192)}


def both(tmp_path, **config) -> tuple[Transformer, dict, torch.Tensor]:
    """Our model loaded from the checkpoint transformers saved (at tmp_path), transformers' config, tokens (1, 48)."""
    hf_config = hf_call("save_random_model", tmp_path, "qwen3", **config)
    tokens = torch.randint(0, hf_config["vocab_size"], (1, 48), generator=torch.Generator().manual_seed(1))
    return Transformer.from_pretrained(tmp_path), hf_config, tokens


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    ours, hf_config, tokens = both(tmp_path, **CONFIGS[name])
    assert ours.config.qk_norm and ours.config.head_dim == hf_config["head_dim"]
    assert (ours.output.weight is ours.tok_embeddings.weight) == hf_config["tie_word_embeddings"]
    expected = hf_call("logits", tmp_path, tokens)                        # (1, T, vocab)
    with torch.no_grad():
        logits = ours(tokens)
    assert expected.std() > 0.5, "logits too flat to compare"
    torch.testing.assert_close(logits, expected, rtol=0, atol=2e-5)


def test_dense_cache_decode_equals_full_forward(tmp_path):
    ours, _, tokens = both(tmp_path, **CONFIGS["gqa-tied"])
    c, T, P = ours.config, tokens.shape[1], 20
    with torch.no_grad():
        full = ours(tokens)                                               # (1, T, vocab)
        ours.setup_caches(lambda i: DenseCache(1, c.n_kv_heads, T, c.head_dim, torch.float32))
        steps = [ours(tokens[:, :P], torch.arange(P))]
        steps += [ours(tokens[:, t:t + 1], torch.tensor([t])) for t in range(P, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-5)


def test_gate_reads_the_normed_key_before_rope_and_the_cached_key_after(tmp_path):
    """As the authors' Qwen3 patch does: k_pre is k_norm(k_proj(x)) before RoPE, k_post the key the cache holds."""
    ours, hf_config, tokens = both(tmp_path, **CONFIGS["gqa-untied"])
    normed, cached = hf_call("qwen3_keys", tmp_path, tokens)
    seen = []
    gates = random_gates(ours)
    for g in gates:
        g.register_forward_hook(lambda m, args, out: seen.append(args[:2]))
    gate.install(ours, gates)
    with torch.no_grad():
        ours(tokens)
    assert len(seen) == len(normed) == hf_config["num_hidden_layers"]
    for i, ((k_pre, k_post), expected_pre) in enumerate(zip(seen, normed)):
        torch.testing.assert_close(k_pre, expected_pre, rtol=0, atol=1e-5)                  # (1, Hkv, T, D)
        torch.testing.assert_close(k_post, cached[i], rtol=0, atol=1e-5)


DROP = object()   # an edit that removes the key


@pytest.mark.parametrize("edit, message", [
    ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window=true is not supported"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, r"layer_types has 'sliding_attention' in layers \[1\]"),
    ({"head_dim": DROP}, r"lacks required fields \['head_dim'\]"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                          "original_max_position_embeddings": 32768}}, "rope scaling type 'yarn' is not supported"),
    ({"partial_rotary_factor": 0.5}, r"unsupported fields \['partial_rotary_factor'\]"),
    ({"model_type": "llama"}, r"architecture \['Qwen3ForCausalLM'\] / model_type 'llama' is not supported"),
])
def test_refused_configs_name_the_field(edit, message):
    config = {k: v for k, v in {**QWEN3_4B_2507, "num_hidden_layers": 2, **edit}.items() if v is not DROP}
    with pytest.raises(CheckpointError, match=message):
        LlamaConfig.from_hf(config)


def test_qwen3_keys_are_unknown_to_llama():
    with pytest.raises(CheckpointError, match=r"unsupported fields \['use_sliding_window'\]"):
        LlamaConfig.from_hf({**LLAMA_31_8B, "use_sliding_window": False})


@pytest.mark.parametrize("name, n_params", [("llama-3.1-8b-instruct", 8_030_261_248),
                                            ("qwen3-4b-instruct-2507", 4_022_468_096)])
def test_published_configs_build_the_published_model(name, n_params):
    """Built on the meta device from the real config.json, the model has the real parameter count
    (Qwen3-4B's tied head counted once), so every shape, the q/k norms included, is the real one."""
    config = LlamaConfig.from_hf(PUBLISHED[name][0])
    with torch.device("meta"):
        model = Transformer(config)
    tied = {"output.weight"} if config.tie_word_embeddings else set()
    assert sum(p.numel() for n, p in model.named_parameters() if n not in tied) == n_params
    assert config.qk_norm == name.startswith("qwen3") and (config.n_kv_heads, config.head_dim) == (8, 128)


def tiny_qwen3(n_kv_heads: int = 2, seed: int = 0) -> Transformer:
    """A random Qwen3 from our own config: head dim 24, biased projections, q/k norm weights away from one."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, intermediate_size=96,
                         head_dim=24, rms_norm_eps=1e-6, attention_bias=True, qk_norm=True)
    model = Transformer(config).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("window, prompt_len", [(1, 5), (3, 20), (8, 5), (8, 20)])
def test_gated_qwen3_matches_visibility_oracle(window, prompt_len):
    """test_gated_cache's oracle test on a Qwen3: prefill and 40 decode steps through the write-gated cache
    give the logits of dense attention under the visibility mask of DESIGN.md."""
    model = tiny_qwen3()
    steps = 40
    setup_learned(model, random_gates(model), window, prompt_len + steps)
    prompt = torch.randint(0, 97, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    tokens, logits = prefill_and_decode(model, prompt, steps)
    stats = gate.admission_stats(model)
    assert 0.15 < stats["admitted_fraction"] < 0.85, stats   # both admission outcomes are exercised
    expected = oracle_logits(model, tokens, lambda g: visibility_mask(g, window, gate.DEFAULT_THRESHOLD))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_gated_qwen3_decode_traces_fullgraph():
    """The Qwen3 decode step traces whole (fullgraph, one graph for every step as the stores grow). The eager
    backend keeps this to the tracing, which is what the q/k norms could break; test_gated_cache compiles the
    same step with Inductor for the Llama."""
    model = tiny_qwen3()
    setup_learned(model, random_gates(model), window=3, max_seq_len=16)
    prompt = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(6))

    def run(step, stance_after_first="default"):
        logits = [model(prompt, torch.arange(6))[:, -1:]]
        for pos in range(6, 12):
            logits.append(step(logits[-1].argmax(-1), torch.tensor([pos])).clone())
            torch.compiler.set_stance(stance_after_first)
        torch.compiler.set_stance("default")
        return torch.cat(logits, 1)

    eager = run(model)
    torch._dynamo.reset()
    compiled = run(torch.compile(model, fullgraph=True, dynamic=False, backend="eager"), "fail_on_recompile")
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def thinking_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("qwen3-thinking"), "qwen3-thinking", seed=3)


def test_greedy_matches_transformers(thinking_checkpoint, tmp_path, capsys):
    """generate.py's tokens equal transformers' greedy generate on a tiny Qwen3 checkpoint (the Thinking
    template, whose prompt opens a <think> block); the CLI's main prints their text, densely, with every
    token admitted (--gate full, window 2), and with a gate file in the authors' .pt layout."""
    tok = Tokenizer(thinking_checkpoint)
    prompt = "What is the capital of France?"
    prompt_ids = tok.encode_prompt(prompt)
    expected = hf_call("greedy", thinking_checkpoint, prompt_ids, 40, tok.stop_ids)
    expected = expected[:-1] if expected[-1] in tok.stop_ids else expected   # ours does not return the stop token
    assert len(expected) >= 10, "the random model stops too soon to compare much"

    model, _ = generate.load(thinking_checkpoint)
    generate.setup_caches(model, len(prompt_ids) + 40)
    new, _ = generate.generate(model, prompt_ids, 40, stop_ids=tok.stop_ids)
    assert new == expected

    c = model.config
    authors_checkpoint(tmp_path / "tiny-qwen3-0.16.pt", c.n_layers, c.n_kv_heads, c.head_dim, hidden=36)
    for options in [{}, {"gate": "full", "window": 2}, {"gate": str(tmp_path / "tiny-qwen3-0.16.pt")}]:
        generate.main(checkpoint=str(thinking_checkpoint), prompt=prompt, max_new_tokens=40, **options)
        printed = capsys.readouterr()
        assert printed.out == tok.decode(expected) + "\n", options
        assert ("admitted" in printed.err) == bool(options)


@pytest.mark.parametrize("name", PUBLISHED)
def test_authors_gate_files_at_real_shapes(tmp_path, name):
    """A file in the authors' exact layout ({model}-{lambda}.pt, flat float32 parameters) at the real shapes
    of the model loads, fits a model built from that model's config.json and computes the authors' g; in
    another model it names both shapes (Qwen3-4B's Instruct and Thinking gates have the same shapes)."""
    config, hidden = PUBLISHED[name]
    c = LlamaConfig.from_hf(config)
    path = tmp_path / f"{name}-0.16.pt"
    authors = authors_checkpoint(path, c.n_layers, c.n_kv_heads, c.head_dim, hidden)
    with torch.device("meta"):
        model = Transformer(c)
    gates, metadata = gate.make_gates(gate.parse_policy(str(path)), model)
    assert metadata == {"base_model": name, "lambda": 0.16, "settings": {"tau0.1": {"threshold": 0.1}},
                        "default_setting": "tau0.1"}   # no tau in the authors' files: the default one, unmeasured
    assert len(gates) == c.n_layers and gates[0].hidden == hidden
    # 33,825,024 (Llama) and 14,275,872 (Qwen3) parameters, as the authors' code sizes them.
    assert sum(p.numel() for g in gates for p in g.parameters()) == c.n_layers * (
        2 * c.head_dim + c.n_kv_heads * hidden * (2 * c.head_dim + 2) + c.n_kv_heads)
    k_pre, k_post = torch.randn(1, c.n_kv_heads, 5, c.head_dim), torch.randn(1, c.n_kv_heads, 5, c.head_dim)
    with torch.no_grad():
        torch.testing.assert_close(gates[-1](k_pre, k_post), authors[-1](k_pre, k_post), rtol=1e-5, atol=1e-6)
    other_config = QWEN3_4B_2507 if name.startswith("llama") else LLAMA_31_8B
    with torch.device("meta"):
        other = Transformer(LlamaConfig.from_hf(other_config))
    o = other.config
    with pytest.raises(gate.GateError) as e:
        gate.make_gates(gate.parse_policy(str(path)), other)
    assert f"has {c.n_layers} layers, the model has {o.n_layers}" in str(e.value)
    assert (f"(gate: {c.n_layers} layers, 8 KV heads, head dim 128; model: {o.n_layers} layers, 8 KV heads, "
            f"head dim 128)") in str(e.value)


def test_gate_of_another_width_is_named(tmp_path):
    """Head dim and KV heads are named too, with both shapes, when a gate meets a model they do not fit."""
    model = tiny_qwen3(n_kv_heads=1)
    authors_checkpoint(tmp_path / "g-0.16.pt", n_layers=2, n_kv_heads=2, head_dim=24, hidden=36)
    with pytest.raises(gate.GateError, match=r"has 2 KV heads in layer 0, the model has 1 \(gate: 2 layers, "
                                             r"2 KV heads, head dim 24; model: 2 layers, 1 KV heads, head dim 24\)"):
        gate.make_gates(gate.parse_policy(str(tmp_path / "g-0.16.pt")), model)
