"""The gate file format, the authors' .pt import, the mismatch errors and the built-in policies."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gate
from model import LlamaConfig, Transformer
from tiny import save_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
# random:0.3, seed 0, layer 1, head 0, positions 0..31 (see test_random_policy_admits_about_p_deterministically).
PINNED_RANDOM_BITS = "00111111000001011011100000010001"


def tiny_model(n_layers=2, n_kv_heads=2, head_dim=16) -> Transformer:
    config = LlamaConfig(vocab_size=97, dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=n_kv_heads,
                         intermediate_size=96, head_dim=head_dim)
    return Transformer(config).eval().requires_grad_(False)


class AuthorsGate(nn.Module):
    """The authors' GatingPredictor, conv path (reference/wgkv_code.md 1.2), to produce and check .pt files."""

    def __init__(self, n_kv_heads, head_dim, hidden):
        super().__init__()
        self.H, self.D = n_kv_heads, head_dim
        self.pre_key_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.post_key_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.conv1 = nn.Conv1d(n_kv_heads * 2 * head_dim, n_kv_heads * hidden, 1, groups=n_kv_heads)
        self.conv2 = nn.Conv1d(n_kv_heads * hidden, n_kv_heads, 1, groups=n_kv_heads)
        with torch.no_grad():   # norms away from 1, so a swapped pre/post would show
            self.pre_key_norm.weight.uniform_(0.5, 1.5)
            self.post_key_norm.weight.uniform_(0.5, 1.5)

    def forward(self, k_pre, k_post):
        B, H, T, D = k_pre.shape
        x = torch.stack((self.pre_key_norm(k_pre), self.post_key_norm(k_post)), dim=2)   # (B, H, 2, T, D)
        x = x.permute(0, 1, 2, 4, 3).reshape(B, H * 2 * D, T)                          # channel block h = [pre_h, post_h]
        return torch.sigmoid(self.conv2(F.gelu(self.conv1(x)))).clamp_min(1e-3)         # (B, H, T)


def authors_checkpoint(path, n_layers=2, n_kv_heads=2, head_dim=16, hidden=24):
    torch.manual_seed(0)
    layers = [AuthorsGate(n_kv_heads, head_dim, hidden) for _ in range(n_layers)]
    # As train.py saves them: a flat dict of float32 nn.Parameters under the full Hugging Face names.
    torch.save({f"model.layers.{i}.self_attn.g_predictors.{n}": p for i, m in enumerate(layers)
                for n, p in m.named_parameters()}, path)
    return layers


def test_authors_pt_and_our_safetensors_give_identical_g(tmp_path):
    authors = authors_checkpoint(tmp_path / "tiny-0.16.pt")
    gates, metadata = gate.load_gates(tmp_path / "tiny-0.16.pt")
    # no tau in the authors' files: one setting at the default tau, no admission measured
    assert metadata == {"base_model": "tiny", "lambda": 0.16, "settings": {"tau0.1": {"threshold": 0.1}},
                        "default_setting": "tau0.1"}
    gate.save_gates(tmp_path / "g.safetensors", gates, {"window": 4})
    ours, _ = gate.load_gates(tmp_path / "g.safetensors")
    k_pre, k_post = torch.randn(2, 2, 7, 16) * 3, torch.randn(2, 2, 7, 16) * 3
    for a, g, o in zip(authors, gates, ours):
        expected = a(k_pre, k_post)
        torch.testing.assert_close(g(k_pre, k_post), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(o(k_pre, k_post), g(k_pre, k_post))
    # float16 files are allowed: the same gate to half precision.
    gate.save_gates(tmp_path / "h.safetensors", gates, dtype=torch.float16)
    half, _ = gate.load_gates(tmp_path / "h.safetensors")
    torch.testing.assert_close(half[0](k_pre, k_post), gates[0](k_pre, k_post), rtol=0, atol=5e-3)


def test_file_has_the_authors_names_and_shapes(tmp_path):
    from safetensors import safe_open
    gates = [gate.WriteGate(2, 16, 24) for _ in range(2)]
    gate.save_gates(tmp_path / "g.safetensors", gates)
    with safe_open(str(tmp_path / "g.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    p = "model.layers.1.self_attn.g_predictors."
    assert len(shapes) == 12
    assert shapes[p + "pre_key_norm.weight"] == shapes[p + "post_key_norm.weight"] == (16,)
    assert shapes[p + "conv1.weight"] == (48, 32, 1) and shapes[p + "conv1.bias"] == (48,)
    assert shapes[p + "conv2.weight"] == (2, 24, 1) and shapes[p + "conv2.bias"] == (2,)


def test_metadata_round_trips_and_sets_the_defaults(tmp_path):
    """A file from before settings: its single tau and admission load as its one setting."""
    training = {"steps": 100, "data": "prose"}
    gates = [gate.WriteGate(2, 16) for _ in range(2)]
    gate.save_gates(tmp_path / "g.safetensors", gates, {"window": 6, "threshold": 0.2, "lambda": 0.16,
                                                         "base_model": "tiny", "training": training,
                                                         "admitted_per_layer": [0.25, 0.5]})
    _, metadata = gate.load_gates(tmp_path / "g.safetensors")
    assert metadata == {"window": 6, "lambda": 0.16, "base_model": "tiny", "training": json.dumps(training),
                        "settings": {"tau0.2": {"threshold": 0.2, "admitted_per_layer": [0.25, 0.5]}},
                        "default_setting": "tau0.2"}
    model = tiny_model()
    setup = gate.setup_write_gated(model, str(tmp_path / "g.safetensors"), batch_size=1, max_seq_len=20,
                                   dtype=torch.float32, device="cpu", page_size=1)
    assert (setup.window, setup.threshold, setup.capacity) == (6, 0.2, 14)
    assert model.layers[0].attention.cache.window == 6
    assert setup.policy == f"{tmp_path / 'g.safetensors'}@tau0.2" and "admission in training" in setup.budget
    setup = gate.setup_write_gated(model, str(tmp_path / "g.safetensors"), batch_size=1, max_seq_len=20,
                                   dtype=torch.float32, device="cpu", window=3, threshold=0.5, global_capacity=2, page_size=1)
    assert (setup.window, setup.threshold, setup.capacity) == (3, 0.5, 2)
    assert "records no admission rate" in setup.budget   # measured at 0.2, not at 0.5
    setup = gate.setup_write_gated(model, str(tmp_path / "g.safetensors"), batch_size=1, max_seq_len=20,
                                   dtype=torch.float32, device="cpu", global_capacity=2, page_size=16)
    assert setup.capacity == 16   # whole pages


# One gate at two sparsities, as the shipped lambda 0.16 gate holds them.
SETTINGS = {"40%": {"threshold": 0.1, "admitted_per_layer": [0.4, 0.3]},
            "20%": {"threshold": 0.46, "admitted_per_layer": [0.2, 0.1]}}
LISTED = "40% (tau 0.1), 20% (tau 0.46, the default)"


def settings_file(path: Path) -> Path:
    gate.save_gates(path, [gate.WriteGate(2, 16) for _ in range(2)], {"window": 4, "settings": SETTINGS,
                                                                      "default_setting": "20%"})
    return path


def test_a_setting_is_picked_by_name_or_tau_and_sizes_the_pool(tmp_path):
    path = settings_file(tmp_path / "g.safetensors")
    _, metadata = gate.load_gates(path)
    assert metadata == {"window": 4, "settings": SETTINGS, "default_setting": "20%"}
    model = tiny_model()

    def setup(spec: str, threshold: float | None = None) -> tuple[str, float, int]:
        s = gate.setup_write_gated(model, spec, batch_size=1, max_seq_len=100, dtype=torch.float32, device="cpu",
                                   threshold=threshold)
        return s.policy, s.threshold, s.pool_pages

    def pages(admitted: list[float] | None) -> int:   # capacity 96 = 100 - W, whole pages of 16
        return gate.pool_pages(None, n_layers=2, batch_size=1, n_kv_heads=2, head_dim=16, capacity=96, page_size=16,
                               dense_tokens=100, element_size=4, admitted_per_layer=admitted)[0]

    assert pages([0.2, 0.1]) < pages([0.4, 0.3]) < pages(None)
    assert setup(str(path)) == (f"{path}@20%", 0.46, pages([0.2, 0.1]))             # the file's default
    assert setup(f"{path}@40%") == (f"{path}@40%", 0.1, pages([0.4, 0.3]))         # by name
    assert setup(str(path), threshold=0.1) == (f"{path}@40%", 0.1, pages([0.4, 0.3]))   # by tau
    assert setup(f"{path}@40%", threshold=0.1)[0] == f"{path}@40%"
    # A tau the file has no setting for: no admission measured there, so the pool is the full need.
    assert setup(str(path), threshold=0.3) == (f"{path}@tau0.3", 0.3, pages(None))
    with pytest.raises(gate.GateError) as e:
        setup(f"{path}@30%")
    assert str(e.value) == f"gate file {path} has no setting '30%'; its settings: {LISTED}"
    with pytest.raises(gate.GateError, match=r"--threshold 0.46 contradicts .*@40%, whose tau is 0.1"):
        setup(f"{path}@40%", threshold=0.46)


@pytest.mark.parametrize("settings, default, message", [
    (SETTINGS, "30%", "default_setting '30%' is none of its settings (40%, 20%)"),
    (SETTINGS, None, "default_setting None is none of its settings"),
    ([0.1], "x", "is not a mapping of names to settings"),
    ({"a@b": {"threshold": 0.1}}, "a@b", "needs a name without '@'"),
    ({"x": {"admitted_per_layer": [0.1, 0.1]}}, "x", "a threshold in [0, 1]"),
    ({"x": {"threshold": 0.1, "admitted_per_layer": [1.5, 0.1]}}, "x", "admitted_per_layer as shares in [0, 1]"),
])
def test_bad_settings_are_refused_in_one_line(tmp_path, settings, default, message):
    from safetensors.torch import load_file, save_file
    metadata = {"settings": settings} | ({"default_setting": default} if default else {})
    with pytest.raises(gate.GateError, match=re.escape(message)):   # not written
        gate.save_gates(tmp_path / "bad.safetensors", [gate.WriteGate(2, 16)], metadata)
    assert not (tmp_path / "bad.safetensors").exists()
    # nor read, when written by other means
    tensors = load_file(settings_file(tmp_path / "good.safetensors"))
    save_file(tensors, str(tmp_path / "bad.safetensors"), {k: v if isinstance(v, str) else json.dumps(v)
                                                          for k, v in metadata.items()})
    with pytest.raises(gate.GateError, match=re.escape(message)) as e:
        gate.load_gates(tmp_path / "bad.safetensors")
    assert "\n" not in str(e.value)


def test_generate_lists_the_settings_of_an_unknown_one(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    path = settings_file(tmp_path / "g.safetensors")
    p = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(checkpoint), "--gate", f"{path}@30%",
                        "--max-new-tokens", "2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"has no setting '30%'; its settings: {LISTED}" in p.stderr


def test_gate_settings_are_the_policies_of_a_comparison(tmp_path):
    two = settings_file(tmp_path / "two.safetensors")
    (tmp_path / "sub").mkdir()
    again = settings_file(tmp_path / "sub" / "two.safetensors")
    one = tmp_path / "one.safetensors"
    gate.save_gates(one, [gate.WriteGate(2, 16) for _ in range(2)], {"threshold": 0.2})
    model = tiny_model()
    # every setting of a file, the one of FILE@SETTING, each once; the path where two files share a stem
    policies = gate.gate_settings([str(one), str(two), f"{two}@40%", f"{again}@20%"], model)
    assert {name: spec for name, (spec, _) in policies.items()} == {
        "one": f"{one}@tau0.2", "two@40%": f"{two}@40%", "two@20%": f"{two}@20%", f"{again}@20%": f"{again}@20%"}
    assert policies["two@40%"][1]["settings"] == SETTINGS
    with pytest.raises(gate.GateError, match="has no setting '30%'"):
        gate.gate_settings([f"{two}@30%"], model)
    with pytest.raises(gate.GateError, match="built-in policy, not a gate file"):
        gate.gate_settings(["full"], model)


@pytest.mark.parametrize("model_kwargs, message, model_shape", [
    ({"n_layers": 3}, "has 2 layers, the model has 3", "3 layers, 2 KV heads, head dim 16"),
    ({"n_kv_heads": 4}, "has 2 KV heads in layer 0, the model has 4", "2 layers, 4 KV heads, head dim 16"),
    ({"head_dim": 8}, "has head dim 16 in layer 0, the model has 8", "2 layers, 2 KV heads, head dim 8"),
])
def test_mismatched_gate_names_the_mismatch(tmp_path, model_kwargs, message, model_shape):
    gate.save_gates(tmp_path / "g.safetensors", [gate.WriteGate(2, 16) for _ in range(2)])
    with pytest.raises(gate.GateError, match=message) as e:
        gate.setup_write_gated(tiny_model(**model_kwargs), str(tmp_path / "g.safetensors"), batch_size=1,
                               max_seq_len=8, dtype=torch.float32, device="cpu")
    assert f"(gate: 2 layers, 2 KV heads, head dim 16; model: {model_shape})" in str(e.value)


def test_inconsistent_hidden_width_names_it(tmp_path):
    state = {f"model.layers.0.self_attn.g_predictors.{k}": v for k, v in gate.WriteGate(2, 16, 24).official_state().items()}
    state["model.layers.0.self_attn.g_predictors.conv1.weight"] = torch.zeros(2 * 20, 32, 1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(gate.GateError, match=r"layer 0 conv1.weight has shape \(40, 32, 1\), expected \(48, 32, 1\) .*hidden width 24"):
        gate.load_gates(tmp_path / "bad.pt")


def test_bad_files_get_one_line(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    torch.save({"model.layers.0.mlp.weight": torch.zeros(1)}, tmp_path / "other.pt")
    for path, message in [(tmp_path / "none.pt", "not found"), (tmp_path / "junk.safetensors", "not readable"),
                          (tmp_path / "other.pt", "unexpected tensors")]:
        with pytest.raises(gate.GateError, match=message) as e:
            gate.load_gates(path)
        assert "\n" not in str(e.value)


def test_cli_prints_metadata_settings_and_shapes(tmp_path, capsys):
    gate.save_gates(tmp_path / "g.safetensors", [gate.WriteGate(2, 16) for _ in range(3)], {"lambda": 0.16})
    run = subprocess.run([sys.executable, "gate.py", str(tmp_path / "g.safetensors")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "lambda: 0.16" in run.stdout and "layers: 3, KV heads: 2, head dim: 16, hidden: 64" in run.stdout
    assert "  tau0.1   0.1    yes      -         not measured\n" in run.stdout
    gate.main(str(settings_file(tmp_path / "s.safetensors")))
    out = capsys.readouterr().out
    assert ("  NAME     TAU    DEFAULT  ADMITTED  PER LAYER (measured on the training split)\n"
            "  40%      0.1             35.0%     0.40 0.30\n"
            "  20%      0.46   yes      15.0%     0.20 0.10\n") in out
    assert "window: 4" in out and "default_setting" not in out
    with pytest.raises(SystemExit) as e:   # in-process: a second interpreter start is slow
        gate.main(str(tmp_path / "missing.pt"))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err.count("\n") == 1 and "not found" in err


@pytest.mark.parametrize("spec, message", [
    ("random:1.5", "fraction P in"), ("random:", "fraction P in"), ("sink:-1", "whole number"),
    ("sink:x", "whole number"), ("no/such/file.safetensors", "neither a file nor a policy"),
    ("no/such/file.safetensors@20%", "neither a file nor a policy"),
])
def test_bad_policy_specs(spec, message):
    with pytest.raises(gate.GateError, match=message):
        gate.parse_policy(spec)


def test_policy_specs(tmp_path):
    assert str(gate.parse_policy("random:0.25")) == "random:0.25"
    assert gate.parse_policy("sink:4").n_sink == 4
    assert gate.parse_policy("full").kind == "full"
    path = settings_file(tmp_path / "g@1.safetensors")   # an '@' in the file's own name
    assert gate.parse_policy(str(path)) == gate.Policy("file", path)
    assert gate.parse_policy(f"{path}@40%") == gate.Policy("file", path, "40%")
    assert str(gate.parse_policy(f"{path}@40%")) == f"{path}@40%"


def test_random_policy_admits_about_p_deterministically():
    k = torch.zeros(1, 4, 20000, 8)
    pos = torch.arange(20000)
    g = gate.RandomGate(0.3, 4, layer=1, seed=0)(k, k, pos)
    assert g.shape == (1, 4, 20000)
    assert ((g == 0) | (g == 1)).all()
    assert abs(g.mean().item() - 0.3) < 0.01
    assert all(abs(g[0, h].mean().item() - 0.3) < 0.02 for h in range(4))
    # Heads and layers draw differently; the same (seed, layer) draws the same, one position at a time too.
    assert not torch.equal(g[0, 0], g[0, 1])
    assert not torch.equal(g, gate.RandomGate(0.3, 4, layer=2, seed=0)(k, k, pos))
    again = gate.RandomGate(0.3, 4, layer=1, seed=0)
    assert torch.equal(torch.cat([again(k[:, :, :1], k[:, :, :1], pos[p:p + 1]) for p in range(50)], -1), g[..., :50])
    # The same on every run and machine: the hash is pure integer arithmetic (this pins it).
    bits = "".join(str(int(x)) for x in g[0, 0, :32])
    assert bits == PINNED_RANDOM_BITS


def test_sink_and_constant_policies():
    k = torch.zeros(2, 3, 10, 8)
    pos = torch.arange(10)
    assert torch.equal(gate.SinkGate(4)(k, k, pos), (pos < 4).float().expand(2, 3, 10))
    assert torch.equal(gate.ConstantGate(1.0)(k, k, pos), torch.ones(2, 3, 10))
    assert torch.equal(gate.ConstantGate(0.0)(k, k, pos), torch.zeros(2, 3, 10))


def test_stats_count_tokens_and_bytes():
    model = tiny_model()
    setup = gate.setup_write_gated(model, "sink:2", batch_size=1, max_seq_len=30, dtype=torch.float32, device="cpu",
                                   window=4, page_size=1)
    assert setup.capacity == 2 and setup.pool_pages == 2 * 2 * 2   # sink:N needs no more than N global slots
    model(torch.randint(0, 97, (1, 10)))
    for pos in range(10, 15):
        model(torch.randint(0, 97, (1, 1)), torch.tensor([pos]))
    stats = gate.admission_stats(model)
    per_token = 2 * 16 * 4   # K and V, head dim 16, float32
    n_heads = 2 * 2          # layers x KV heads
    assert stats["admitted_fraction"] == pytest.approx(2 / 15)
    assert stats["admitted_fraction_per_layer"] == [pytest.approx(2 / 15)] * 2
    assert stats["bytes_in_use"] == n_heads * (2 + 4) * per_token
    assert stats["dense_bytes"] == n_heads * 15 * per_token
    assert stats["capacity_drops"] == 0
    assert stats["bytes_allocated"] >= n_heads * (2 + 4) * per_token
    assert (stats["pages_in_use"], stats["pool_pages"]) == (n_heads * 2, n_heads * 2)


@pytest.mark.parametrize("spec, budget", [("300MiB", gate.Budget("bytes", 300 * 2**20)), ("2GB", gate.Budget("bytes", 2e9)),
                                          ("512 kib", gate.Budget("bytes", 512 * 1024)), ("20000", gate.Budget("tokens", 20000)),
                                          ("40%", gate.Budget("share", 40)), ("12.5%", gate.Budget("share", 12.5)),
                                          ("Unlimited", gate.Budget("unlimited")), (None, None)])
def test_budget_forms(spec, budget):
    assert gate.parse_budget(spec) == budget


@pytest.mark.parametrize("spec", ["", "abc", "0", "-5", "0MiB", "150%", "1.5", "10 pages", "5TiB"])
def test_bad_budgets_say_what_is_expected(spec):
    with pytest.raises(gate.GateError, match="--kv-budget"):
        gate.parse_budget(spec)


def test_pool_pages_from_each_budget():
    shape = dict(n_layers=2, batch_size=1, n_kv_heads=2, head_dim=16, capacity=100, page_size=10, dense_tokens=110,
                 element_size=4, admitted_per_layer=None)
    full = 2 * 2 * 10                                     # layers x heads x pages of a whole capacity
    per_page = 10 * (2 * 16 * 4 + 4)
    assert gate.pool_pages(None, **shape)[0] == full        # no record of the gate's admission: the full need
    assert gate.pool_pages(gate.Budget("unlimited"), **shape)[0] == full
    assert gate.pool_pages(gate.Budget("tokens", 95), **shape)[0] == 10
    assert gate.pool_pages(gate.Budget("bytes", 7 * per_page + 1), **shape)[0] == 7
    dense = 2 * 2 * 110 * 2 * 16 * 4
    assert gate.pool_pages(gate.Budget("share", 25), **shape)[0] == int(0.25 * dense // per_page)
    assert gate.pool_pages(gate.Budget("tokens", 10**9), **shape)[0] == full   # a budget past the need buys nothing
    # From the gate's admission in training: margin x rate x capacity per layer, plus a page per head.
    shape["admitted_per_layer"] = [0.1, 0.5]
    pages, how = gate.pool_pages(None, **shape)
    expected = sum(-(-round(min(1.0, gate.BUDGET_MARGIN * r) * 100 * 2) // 10) + 2 for r in (0.1, 0.5))
    assert pages == expected < full and "admission in training" in how
