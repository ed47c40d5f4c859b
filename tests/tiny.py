"""Tiny random Llama checkpoints in Hugging Face format, built by transformers itself, for CPU tests.

`save_tiny_checkpoint(dir, template="chatml" | "llama3", **config)` writes config.json,
model.safetensors, generation_config.json, tokenizer.json (a byte-level BPE trained here on a few
lines of text) and tokenizer_config.json with the chat template.
"""
import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# SmolLM2-135M-Instruct's template, as its GGUF and Hugging Face repo ship it.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3's header format with the Llama-3.2 habits a renderer must get right: bos_token, a namespace,
# strftime_now for the date, raise_exception, trim, whitespace control and trim_blocks/lstrip_blocks.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- set ns = namespace(last_role="") %}
{%- for message in messages %}
    {%- if message['role'] == ns.last_role %}
        {{- raise_exception("Conversation roles must alternate") }}
    {%- endif %}
    {%- set ns.last_role = message['role'] %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE}
# (bos, eos, end of turn) of each template's tokenizer.
SPECIAL = {"chatml": ("<|im_start|>", "<|im_end|>", "<|im_end|>"),
           "llama3": ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")}

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome. Paris and Rome are old cities.",
    "A transformer writes the key and value of every token into its cache, and reads them back later.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; dates like 26 Jul 2024 and 01 Jan 2025.",
    "Café, naïve, über, 東京, 😀: text with characters of more than one byte.",
    "system user assistant: you are a helpful assistant. What is the answer? The answer is yes.",
]


def tiny_tokenizer(template: str = "chatml") -> Tokenizer:
    """A byte-level BPE of about 400 tokens; Llama 3's adds BOS in its post-processor, as the real one does."""
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"] if template == "chatml" else \
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if template == "llama3":
        bos = SPECIAL["llama3"][0]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def random_llama(seed: int = 0, **config) -> transformers.LlamaForCausalLM:
    """A transformers Llama with random weights large enough that logits differ clearly, norms not all ones."""
    defaults = dict(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                    initializer_range=0.1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(defaults | config)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model.eval()


def save_tiny_checkpoint(path: str | Path, template: str = "chatml", seed: int = 0, **config) -> Path:
    """A complete checkpoint directory: the model, its generation config and a tokenizer with a chat template."""
    path = Path(path)
    tok = tiny_tokenizer(template)
    bos, eos, end_of_turn = SPECIAL[template]
    eos_ids = sorted({tok.token_to_id(eos), tok.token_to_id(end_of_turn)})
    model = random_llama(seed, vocab_size=tok.get_vocab_size(), bos_token_id=tok.token_to_id(bos),
                         eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids, **config)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "clean_up_tokenization_spaces": False, "model_max_length": 512, "chat_template": TEMPLATES[template],
    }, indent=2))
    return path
