"""tokenizer.py against transformers' tokenizer: chat templates, BOS, stop tokens, streaming decode."""
import json

import jinja2
import pytest

from tiny import LLAMA3_TEMPLATE, SPECIAL, hf_call, save_tiny_checkpoint, tiny_tokenizer
from tokenizer import StreamDecoder, Tokenizer, compile_chat_template

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": " Hi 😀 "},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "東京?\n"}],
    # Reasoning inline, under its own key and under another name, and a None that transformers drops: Qwen3's
    # templates turn each into <think> ... </think> after the last user turn.
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nAdd.\n</think>\n\n4"},
     {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": "Add again."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "thinking": "Greet.", "tool_calls": None}],
]


class HFTokenizer:
    """transformers' AutoTokenizer of a checkpoint, kept in transformers' process (tiny.hf_call): the methods the
    tests use are called there."""

    def __init__(self, path):
        self.handle, self.bos_token_id, self.eos_token_id = hf_call("open_tokenizer", path)

    def __call__(self, text):
        return hf_call("call_tokenizer", self.handle, "__call__", text)

    def apply_chat_template(self, messages, **kwargs):
        return hf_call("call_tokenizer", self.handle, "apply_chat_template", messages, **kwargs)

    def convert_tokens_to_ids(self, token):
        return hf_call("call_tokenizer", self.handle, "convert_tokens_to_ids", token)

    def decode(self, ids, **kwargs):
        return hf_call("call_tokenizer", self.handle, "decode", ids, **kwargs)


def hf_chat_ids(hf, messages, add_generation_prompt):
    out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out


@pytest.fixture(scope="module", params=["chatml", "llama3", "qwen3-instruct", "qwen3-thinking"])
def tiny_pair(request, tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, Tokenizer(path), HFTokenizer(path)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(tiny_pair, conversation, add_generation_prompt):
    _, ours, hf = tiny_pair
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours.render_chat(messages, add_generation_prompt) == expected
    assert ours.encode_chat(messages, add_generation_prompt) == hf_chat_ids(hf, messages, add_generation_prompt)


def test_one_bos_and_stop_ids(tiny_pair):
    template, ours, hf = tiny_pair
    chat = ours.encode_prompt("Hi")
    if SPECIAL[template][0] is None:   # Qwen3: no BOS at all
        assert hf.bos_token_id is None and chat[0] == hf.convert_tokens_to_ids("<|im_start|>")
    else:
        assert chat[:1] == [hf.bos_token_id] and chat[1] != hf.bos_token_id   # the template's BOS, not a second one
    assert ours.encode("Hi") == hf("Hi")["input_ids"]                      # raw text: what the post-processor adds
    end_of_turn = hf.convert_tokens_to_ids(SPECIAL[template][2])
    # Qwen3's config.json ends a reply at <|endoftext|> too.
    also = {hf.convert_tokens_to_ids("<|endoftext|>")} if template.startswith("qwen3") else set()
    assert ours.stop_ids == {hf.eos_token_id, end_of_turn} | also
    assert ours.encode_prompt("Hi", chat=False) == ours.encode("Hi")


@pytest.mark.parametrize("template", ["qwen3-instruct", "qwen3-thinking"])
def test_qwen3_thinking_markers(tmp_path, template):
    """The Thinking template opens a <think> block in the prompt, the Instruct one does not; both keep a reply's
    <think> ... </think> (added tokens, not special) when decoding, as transformers does."""
    path = save_tiny_checkpoint(tmp_path, template)
    ours, hf = Tokenizer(path), HFTokenizer(path)
    prompt = ours.encode_prompt("Hi")
    think, end_think = hf.convert_tokens_to_ids("<think>"), hf.convert_tokens_to_ids("</think>")
    assert (think in prompt) == (template == "qwen3-thinking")
    assert prompt == hf_chat_ids(hf, [{"role": "user", "content": "Hi"}], True)
    reply = ours.encode("Some thought.\n</think>\n\nParis.", add_special_tokens=False)
    assert end_think in reply
    assert ours.decode(reply) == hf.decode(reply, skip_special_tokens=True) == "Some thought.\n</think>\n\nParis."


def test_template_raise_exception():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        compile_chat_template(LLAMA3_TEMPLATE).render(messages=messages, bos_token="<s>")


def test_chat_template_jinja_file(tmp_path):
    """transformers 5 saves the template beside tokenizer_config.json, in chat_template.jinja."""
    path = save_tiny_checkpoint(tmp_path, "chatml")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "chat_template.jinja").write_text(config.pop("chat_template").replace("helpful", "jinja-file"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = Tokenizer(path), HFTokenizer(path)
    assert "jinja-file" in ours.render_chat(CONVERSATIONS[0])
    assert ours.encode_chat(CONVERSATIONS[0]) == hf_chat_ids(hf, CONVERSATIONS[0], True)


def test_stream_decoder_holds_split_characters(tmp_path):
    tok = tiny_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer(tmp_path)
    text = "Café 東京 😀 naïve, über 🤖!"
    ids = ours.encode(text, add_special_tokens=False)
    assert any("\ufffd" in ours.decode([i]) for i in ids), "no character is split across tokens: the test tests nothing"
    stream = StreamDecoder(ours)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_smollm2_tokenizer_matches_transformers(smollm2_checkpoint):
    ours, hf = Tokenizer(smollm2_checkpoint), HFTokenizer(smollm2_checkpoint)
    for messages in CONVERSATIONS:
        assert ours.render_chat(messages) == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.encode_chat(messages) == hf_chat_ids(hf, messages, True)
    assert ours.stop_ids == {hf.convert_tokens_to_ids("<|im_end|>")}
    document = ours.decode(ours.encode_document("Some text."), skip_special_tokens=False)
    assert document.endswith("<|im_start|>user\nSome text.<|im_end|>\n")
