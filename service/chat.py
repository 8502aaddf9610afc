"""Chat input: conversations rendered with the checkpoint's chat template and tokenized, with the ids that
transformers' ``tokenizer.apply_chat_template(conversation, tokenize=True)`` gives.

What transformers (5.x) does, and so what this module does:

- the template is ``chat_template.jinja`` when the checkpoint has one (with ``additional_chat_templates/*.jinja``
  as further named templates), else tokenizer_config.json's ``chat_template``: a string, or a list of
  ``{"name", "template"}`` of which ``"default"`` is used (``"tool_use"`` when tools are given);
- it is rendered in jinja2's immutable sandbox with ``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols``
  extension and a ``{% generation %}`` tag, the globals ``raise_exception``, ``strftime_now``, a ``dict``
  constructor and a ``namespace`` that refuses underscore names, and a ``tojson`` filter that does not escape
  HTML (``json.dumps`` with ``ensure_ascii=False``);
- the variables are ``messages``, ``tools`` and ``documents`` (None unless given: defined, so ``is defined``
  holds), ``add_generation_prompt``, and every special token as a string (the seven named ones, bos_token to
  mask_token, and the checkpoint's own ``*_token`` entries);
- a message's keys whose value is None are dropped, and a message's reasoning (``reasoning_content``,
  ``thinking`` or ``reasoning``) is also given under ``thinking`` and ``reasoning_content``;
- the rendered text is tokenized without adding special tokens (the template writes its own), with no
  truncation and no padding.

Special tokens come from tokenizer_config.json, and from special_tokens_map.json where the config has no
``added_tokens_decoder`` (the legacy layout). transformers also adds those tokens (and the config's
``added_tokens_decoder``) to the tokenizer when tokenizer.json lacks them: `prepare_tokenizer` does the same.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from .errors import InvalidInput

logger = logging.getLogger("logitserve.chat")

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES, in its order.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# The names a message's reasoning is given under; templates read the first.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

Message = Mapping[str, Any]
Conversation = Sequence[Message]


class ChatTemplateError(InvalidInput):
    """A conversation the template refuses (``raise_exception``, roles out of order, a content it cannot
    concatenate, ...): the client's input, answered with 422."""


# ------------------------------------------------------------------------------------------ special tokens


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or an AddedToken
    dict (``{"content": ..., "lstrip": ..., ...}``, with ``"__type": "AddedToken"`` in the config)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _added_token(value: Any) -> AddedToken | None:
    """The AddedToken a special-token entry describes; a plain string is a special token with default flags."""
    if isinstance(value, str):
        return AddedToken(value, special=True)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        flags = {
            key: bool(value[key])
            for key in ("single_word", "lstrip", "rstrip", "normalized", "special")
            if key in value
        }
        flags.setdefault("special", True)
        return AddedToken(value["content"], **flags)
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class SpecialTokens:
    """A checkpoint's special tokens as transformers' tokenizer holds them.

    ``by_name``: what the chat template sees (bos_token -> "<s>", ..., and model-specific names such as
    image_token); ``to_add``: the AddedTokens transformers adds to the tokenizer where tokenizer.json lacks them
    (the config's added_tokens_decoder, then the named tokens, then the extra special tokens).
    """

    by_name: dict[str, str] = field(default_factory=dict)
    to_add: tuple[AddedToken, ...] = ()

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> SpecialTokens:
        folder = Path(checkpoint)
        config = _read_json(folder / TOKENIZER_CONFIG_FILE)
        # The legacy file counts only where the config does not describe the added tokens itself.
        legacy = {} if "added_tokens_decoder" in config else _read_json(folder / SPECIAL_TOKENS_MAP_FILE)

        def model_specific(entries: Mapping) -> dict[str, Any]:
            return {
                key: value
                for key, value in entries.items()
                if key.endswith("_token") and key not in NAMED_SPECIAL_TOKENS and _token_content(value) is not None
            }

        def extra_named(entries: Mapping) -> dict[str, Any]:
            extra = entries.get("extra_special_tokens")
            if not isinstance(extra, Mapping):
                return {}
            return {key: value for key, value in extra.items() if _token_content(value) is not None}

        def extra_listed(entries: Mapping) -> list:
            extra = entries.get("extra_special_tokens", entries.get("additional_special_tokens"))
            return list(extra) if isinstance(extra, list) else []

        # Named tokens: the legacy file overrides the config. Model-specific names: the config's (and both files'
        # extra_special_tokens dicts) override the legacy file's, as transformers merges them.
        named = {key: legacy[key] if key in legacy else config.get(key) for key in NAMED_SPECIAL_TOKENS}
        named.update({**model_specific(legacy), **model_specific(config), **extra_named(config), **extra_named(legacy)})
        named = {key: value for key, value in named.items() if _token_content(value) is not None}

        decoder = config.get("added_tokens_decoder")
        listed = sorted(decoder.items(), key=lambda item: int(item[0])) if isinstance(decoder, Mapping) else []
        candidates = [value for _, value in listed] + list(named.values()) + extra_listed(config) + extra_listed(legacy)
        to_add = [token for token in map(_added_token, candidates) if token is not None]
        by_name = {key: _token_content(value) for key, value in named.items()}
        return cls(by_name=by_name, to_add=tuple(to_add))


def prepare_tokenizer(tokenizer: Tokenizer, special_tokens: SpecialTokens) -> Tokenizer:
    """Make a tokenizer.json tokenizer encode as transformers' tokenizer of the same checkpoint does (in place):
    no truncation and no padding (transformers turns off what tokenizer.json configures unless asked), and the
    checkpoint's special and added tokens present as added tokens, so that text containing them is split on
    them. Call once at load, before the tokenizer is shared."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    present = {str(token.content) for token in tokenizer.get_added_tokens_decoder().values()}
    missing: list[AddedToken] = []
    for token in special_tokens.to_add:
        if token.content not in present:
            present.add(token.content)
            missing.append(token)
    if missing:
        logger.info(
            "adding %d special tokens that tokenizer.json lacks: %s", len(missing), [t.content for t in missing]
        )
        tokenizer.add_tokens(missing)  # as transformers does: one call, each token keeping its special flag
    return tokenizer


# ------------------------------------------------------------------------------------------------ jinja


def _generation_tag():
    """``{% generation %}...{% endgeneration %}``, an extension class."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for transformers' assistant-token
        mask; rendering keeps the body as it is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationTag


def _template_namespace():
    """The ``namespace`` a template may call, a class."""
    import jinja2

    class TemplateNamespace(jinja2.utils.Namespace):
        """jinja's namespace, refusing underscore-prefixed attribute names (a way to CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
                )

    return TemplateNamespace


class _TemplateDict:
    """``dict(...)`` in a template, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=1)
def _environment():
    """The jinja2 environment transformers renders chat templates in (chat_template_utils._compile_jinja_template)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; chat templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_generation_tag(), jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _template_namespace()
    return env


@lru_cache(maxsize=16)
def _compile(source: str):
    return _environment().from_string(source)


# ------------------------------------------------------------------------------------------ messages


def _normalized(conversation: Any, index: int) -> list[dict]:
    """The messages as transformers hands them to the template: dicts without their None values, reasoning
    under all its names. A fresh copy: the template never sees the caller's objects."""
    if not isinstance(conversation, Sequence) or isinstance(conversation, (str, bytes)):
        raise ChatTemplateError(f"conversation {index}: expected a list of messages", param="messages")
    if len(conversation) == 0:
        raise ChatTemplateError(f"conversation {index} is empty: it needs at least one message", param="messages")
    messages = []
    for position, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"conversation {index}, message {position}: a message is an object such as "
                f'{{"role": "user", "content": "..."}}, got {type(message).__name__}',
                param="messages",
            )
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        messages.append(message)
    return messages


# ------------------------------------------------------------------------------------------ the template


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's chat template(s) and the special tokens its templates see.

    ``templates``: name -> jinja source; ``"default"`` is always present (``"tool_use"`` and others may be).
    """

    templates: dict[str, str]
    special_tokens: SpecialTokens

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path, special_tokens: SpecialTokens | None = None
    ) -> ChatTemplate | None:
        """The checkpoint's template, or None when it has none. Raises ValueError when its templates are named
        but none is "default", or when one does not compile (a broken checkpoint, refused at load)."""
        folder = Path(checkpoint)
        templates: dict[str, str] = {}
        if (folder / CHAT_TEMPLATE_FILE).is_file():
            templates["default"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if (folder / CHAT_TEMPLATE_DIR).is_dir():
            for path in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja")):
                templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
        if not templates:  # template files, where present, replace the config's entry altogether
            configured = _read_json(folder / TOKENIZER_CONFIG_FILE).get("chat_template")
            if isinstance(configured, str):
                templates["default"] = configured
            elif isinstance(configured, list):
                templates = {entry["name"]: entry["template"] for entry in configured}
        if not templates:
            return None
        if "default" not in templates:
            raise ValueError(
                f"{folder}: the chat templates are named {sorted(templates)} and none is 'default', so transformers "
                f"would not pick one either"
            )
        import jinja2

        for name, source in templates.items():
            try:
                _compile(source)
            except jinja2.TemplateSyntaxError as error:
                raise ValueError(
                    f"{folder}: chat template {name!r} does not compile: line {error.lineno}: {error.message}"
                ) from error
        return cls(templates=templates, special_tokens=special_tokens or SpecialTokens.from_checkpoint(folder))

    def source(self, tools: list | None = None) -> str:
        """The template transformers picks: "tool_use" when tools are given and it exists, else "default"."""
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        return self.templates["default"]

    def render(
        self,
        conversation: Conversation,
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        index: int = 0,
    ) -> str:
        """The text of one conversation; ``index`` names it in errors. Raises ChatTemplateError."""
        import jinja2

        messages = _normalized(conversation, index)
        template = _compile(self.source(tools))
        try:
            return template.render(
                messages=messages,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens.by_name,
            )
        except jinja2.TemplateError as error:  # raise_exception, undefined values, the sandbox's refusals
            raise ChatTemplateError(
                f"conversation {index}: the chat template refused it: {error}", param="messages"
            ) from error
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as error:
            # what an operation of the template raised on this input, e.g. a list content concatenated to a string
            raise ChatTemplateError(
                f"conversation {index}: the chat template failed on it: {type(error).__name__}: {error}",
                param="messages",
            ) from error

    def render_all(self, conversations: Sequence[Conversation], add_generation_prompt: bool = False) -> list[str]:
        return [self.render(c, add_generation_prompt, index=i) for i, c in enumerate(conversations)]

    def encode(
        self, tokenizer: Tokenizer, conversations: Sequence[Conversation], add_generation_prompt: bool = False
    ) -> list[list[int]]:
        """One id list per conversation: the rendered text tokenized without adding special tokens."""
        return encode_rendered(tokenizer, self.render_all(conversations, add_generation_prompt))


def encode_rendered(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Rendered chats to ids as transformers' apply_chat_template(tokenize=True) does: no special tokens added."""
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        raise RuntimeError("the tokenizer truncates or pads: call prepare_tokenizer on it at load")
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []
