"""Tiny random Llama and Qwen3 checkpoints in Hugging Face format, built by transformers itself, for CPU tests,
and hf_call, which runs the tests' transformers side (hf_side.py) in transformers' own process.

`save_tiny_checkpoint(dir, template="chatml" | "llama3" | "qwen3-instruct" | "qwen3-thinking", **config)`
writes config.json, model.safetensors, generation_config.json, tokenizer.json (a byte-level BPE trained
here on a few lines of text) and tokenizer_config.json with the chat template. The qwen3 templates make a
Qwen3ForCausalLM with Qwen's tokenizer pipeline; the others a LlamaForCausalLM.
"""
import atexit
import functools
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from hf_process import HFProcess

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
# Qwen3-4B-Thinking-2507's template, verbatim from a copy of its tokenizer_config.json in public code
# (akougkas/warpio-cli, warpio-docs/ai-docs/model_cards/qwen3:4b.md: its config.json beside it has the
# 2507 values, 262144 positions and rope_theta 5e6). The prompt ends with an opened <think> block.
QWEN3_THINKING_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n<think>\n' }}
{%- endif %}"""
# Qwen3-4B-Instruct-2507's: the same but for a prompt that stops at "assistant\n" (no copy of the official
# file was found; this is what the mlx-community conversion's template is quoted as, in public code).
# Both still render <think>...</think> into an assistant turn after the last user query.
QWEN3_INSTRUCT_TEMPLATE = QWEN3_THINKING_TEMPLATE.replace("assistant\\n<think>\\n' }}", "assistant\\n' }}")
TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE,
             "qwen3-instruct": QWEN3_INSTRUCT_TEMPLATE, "qwen3-thinking": QWEN3_THINKING_TEMPLATE}
# (bos, eos, end of turn) of each template's tokenizer; Qwen3's tokenizer has no BOS.
SPECIAL = {"chatml": ("<|im_start|>", "<|im_end|>", "<|im_end|>"),
           "llama3": ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
           "qwen3-instruct": (None, "<|im_end|>", "<|im_end|>"), "qwen3-thinking": (None, "<|im_end|>", "<|im_end|>")}
# Qwen2/3's pre-tokenizer split (its tokenizer.json), before the byte-level mapping.
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome. Paris and Rome are old cities.",
    "A transformer writes the key and value of every token into its cache, and reads them back later.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; dates like 26 Jul 2024 and 01 Jan 2025.",
    "Café, naïve, über, 東京, 😀: text with characters of more than one byte.",
    "system user assistant: you are a helpful assistant. What is the answer? The answer is yes.",
]


def tiny_tokenizer(template: str = "chatml") -> Tokenizer:
    """A byte-level BPE of about 400 tokens; Llama 3's adds BOS in its post-processor, as the real one does.
    Qwen3's has its NFC normaliser, split pattern and <think> </think> as added tokens that are not special."""
    qwen3 = template.startswith("qwen3")
    specials = {"chatml": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
                }.get(template, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(models.BPE())
    if qwen3:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if qwen3:
        tok.add_tokens([AddedToken("<think>", normalized=False), AddedToken("</think>", normalized=False)])
    if template == "llama3":
        bos = SPECIAL["llama3"][0]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


@functools.cache
def transformers_process() -> HFProcess:
    """One process for the whole session: transformers is imported once."""
    process = HFProcess(Path(__file__).with_name("hf_side.py"))
    atexit.register(process.close)
    return process


def hf_call(name: str, *args, **kwargs):
    """hf_side.py's function `name`, called in transformers' process (hf_process.py says why not in this one)."""
    return transformers_process()(name, *args, **kwargs)


def save_tiny_checkpoint(path: str | Path, template: str = "chatml", seed: int = 0, **config) -> Path:
    """A complete checkpoint directory: the model, its generation config and a tokenizer with a chat template."""
    path = Path(path)
    qwen3 = template.startswith("qwen3")
    tok = tiny_tokenizer(template)
    bos, eos, end_of_turn = SPECIAL[template]
    # Qwen3's config.json names <|endoftext|> as BOS, and EOS beside <|im_end|>, though the tokenizer adds no BOS.
    model_bos, model_eos = ("<|endoftext|>", {eos, "<|endoftext|>"}) if qwen3 else (bos, {eos, end_of_turn})
    eos_ids = sorted(tok.token_to_id(t) for t in model_eos)
    hf_call("save_random_model", path, "qwen3" if qwen3 else "llama", seed, vocab_size=tok.get_vocab_size(),
            bos_token_id=tok.token_to_id(model_bos), eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids, **config)
    tok.save(str(path / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
                        "clean_up_tokenization_spaces": False, "model_max_length": 512, "chat_template": TEMPLATES[template]}
    if qwen3:   # as Qwen3-4B-*-2507's tokenizer_config.json has them
        tokenizer_config |= {"tokenizer_class": "Qwen2Tokenizer", "pad_token": "<|endoftext|>", "unk_token": None,
                             "add_bos_token": False, "errors": "replace", "split_special_tokens": False}
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return path
