"""The tokenizer of a Hugging Face checkpoint directory, without transformers.

tokenizer.json (the `tokenizers` library) encodes and decodes; tokenizer_config.json names the special
tokens and holds the chat template (or chat_template.jinja beside it), which is rendered exactly as
transformers renders it; config.json and generation_config.json give the EOS ids that end a reply.

    python tokenizer.py CHECKPOINT "What is the capital of France?"   # shows the chat prompt and its ids
"""
import json
import sys
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend

from model import CheckpointError, read_json

# The special tokens transformers passes to every chat template by name (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The names a message's reasoning (Qwen3's <think> text) may come under. transformers fills reasoning_content
# (which Qwen3's templates read) and thinking (gpt-oss's) from the first one given.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def template_messages(messages: list[dict]) -> list[dict]:
    """The messages as transformers 5 hands them to a template: keys whose value is None left out (a template
    tests for a missing key, and would print None), and the reasoning under each name templates read it by."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses, so it renders identically."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers replaces jinja's tojson, which would HTML-escape and force ASCII.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class Tokenizer:
    def __init__(self, checkpoint: str | Path):
        checkpoint = Path(checkpoint)
        path = checkpoint / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path} not found")
        try:
            self.backend = Backend.from_file(str(path))
        except Exception as e:   # the tokenizers library raises a bare Exception on a malformed file
            raise CheckpointError(f"{path} is unreadable: {e}") from None
        config = read_json(checkpoint / "tokenizer_config.json") if (checkpoint / "tokenizer_config.json").exists() else {}
        # A special token is written either as its text or as a serialized AddedToken {"content": ...}.
        self.special_tokens = {name: value["content"] if isinstance(value, dict) else value
                               for name in SPECIAL_TOKEN_NAMES if (value := config.get(name)) is not None}
        self.chat_template = self._read_chat_template(checkpoint, config)
        self.stop_ids = self._read_stop_ids(checkpoint)

    @staticmethod
    def _read_chat_template(checkpoint: Path, config: dict) -> jinja2.Template | None:
        # transformers 5 saves the template as chat_template.jinja; older checkpoints keep it in the config,
        # sometimes as a list of named templates of which "default" is the chat one.
        jinja_file = checkpoint / "chat_template.jinja"
        source = jinja_file.read_text() if jinja_file.exists() else config.get("chat_template")
        if isinstance(source, list):
            source = {t["name"]: t["template"] for t in source}.get("default")
        if not source:
            return None
        try:
            return compile_chat_template(source)
        except jinja2.TemplateError as e:
            raise CheckpointError(f"{checkpoint}: the chat template does not compile: {e}") from None

    def _read_stop_ids(self, checkpoint: Path) -> frozenset[int]:
        """EOS ids of config.json and generation_config.json (an int or a list), the tokenizer's EOS token,
        and the token the chat template closes an assistant turn with (<|im_end|>, <|eot_id|>, ...)."""
        ids = set()
        for name in ("config.json", "generation_config.json"):
            if (checkpoint / name).exists():
                eos = read_json(checkpoint / name).get("eos_token_id")
                ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if (eos := self.special_tokens.get("eos_token")) is not None and self.backend.token_to_id(eos) is not None:
            ids.add(self.backend.token_to_id(eos))
        if self.chat_template is not None:
            sentinel = "SENTINEL-REPLY-TEXT"
            try:
                chat = self.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}],
                                        add_generation_prompt=False)
            except jinja2.TemplateError:   # a template that cannot close a reply has no end-of-turn token to find
                chat = ""
            special = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
            after = self.encode(chat.partition(sentinel)[2], add_special_tokens=False)
            ids.update(next(([i] for i in after if i in special), []))
        return frozenset(ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; add_special_tokens adds what tokenizer.json's post-processor adds (e.g. BOS).
        Like transformers 5, this ignores tokenizer_config.json's add_bos_token: tokenizer.json decides."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to messages [{"role": ..., "content": ...}, optionally "reasoning_content"],
        as transformers renders it."""
        if self.chat_template is None:
            raise CheckpointError("this checkpoint has no chat template")
        return self.chat_template.render(messages=template_messages(messages), tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes BOS itself where the model wants one; adding special tokens on top would
        # double it, so (as transformers does) none are added.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def encode_prompt(self, text: str, chat: bool = True) -> list[int]:
        """A user prompt: one user turn of the chat template plus the assistant header, or the raw text."""
        if chat and self.chat_template is not None:
            return self.encode_chat([{"role": "user", "content": text}])
        return self.encode(text)

    def encode_document(self, text: str) -> list[int]:
        """A document as one complete user turn of the chat template (raw text if there is none)."""
        if self.chat_template is None:
            return self.encode(text)
        return self.encode_chat([{"role": "user", "content": text}], add_generation_prompt=False)


class StreamDecoder:
    """Text from token ids as they arrive. A character whose bytes are split across tokens decodes to
    U+FFFD until its last byte arrives, so such text is held back; the previous tokens are decoded along
    with the new ones so that decoders which strip a leading space at the start of a text keep it."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0   # ids[prefix:read] were already emitted and are decoded again as context
        self.read = 0

    def push(self, token_id: int) -> str:
        """The new text that token_id completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back at the end of the stream."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python tokenizer.py CHECKPOINT TEXT", file=sys.stderr)
        sys.exit(2)
    try:
        tok = Tokenizer(sys.argv[1])
    except CheckpointError as e:
        print(f"tokenizer.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(tok.render_chat([{"role": "user", "content": sys.argv[2]}]) if tok.chat_template else sys.argv[2])
    print(tok.encode_prompt(sys.argv[2]))
    print("stop ids:", sorted(tok.stop_ids), [tok.backend.id_to_token(i) for i in sorted(tok.stop_ids)])
