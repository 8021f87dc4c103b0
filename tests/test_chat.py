"""moelab.data.chat: chat templates rendered as transformers' apply_chat_template renders them."""

from pathlib import Path

import pytest

pytest.importorskip("transformers")
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from moelab.data.chat import ChatTemplate, check_messages  # noqa: E402

# a ChatML-style template using what templates use: tojson, raise_exception, a generation block, loop controls
TEMPLATE = (
    "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('a conversation cannot start with a tool') }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% elif m['role'] == 'system' %}<|im_start|>system\n{{ m['content'] | tojson }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% if loop.index > 8 %}{% break %}{% endif %}{% endfor %}\n"
    "    {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ eos_token }}"  # an indented block tag
)
CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "héllo \"quoted\" <b>"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")),
                                  bos_token="<s>", eos_token="</s>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    return d, tok


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_equals_transformers(checkpoint, chat, add_generation_prompt):
    d, tok = checkpoint
    expected = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ChatTemplate.from_dir(d).render(chat, add_generation_prompt=add_generation_prompt) == expected


def test_generation_spans_cover_the_assistant_text(checkpoint):
    text, spans = ChatTemplate.from_dir(checkpoint[0]).render_spans(CHATS[1])
    assert [text[a:b] for a, b in spans] == ["4<|im_end|>"]


def test_bad_input_is_a_named_error(checkpoint, tmp_path):
    t = ChatTemplate.from_dir(checkpoint[0])
    with pytest.raises(ValueError, match="cannot start with a tool"):
        t.render([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\].role='robot'"):
        check_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty list"):
        check_messages([])
    assert ChatTemplate.from_dir(tmp_path) is None  # no template at all
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        ChatTemplate.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{% for %}"}')
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate.from_dir(tmp_path)


# -- public MoE chat templates, as their checkpoints ship them (tests/data/chat_templates/*.json, "_source") --------
PUBLIC = sorted((Path(__file__).parent / "data" / "chat_templates").glob("*.json"))
ALTERNATING = [
    [{"role": "user", "content": "Bonjour"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "héllo \"x\""}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "}, {"role": "user", "content": "c\n"},
     {"role": "assistant", "content": "d"}],  # ends with the assistant: a training example
]
WITH_SYSTEM = [  # for the templates that take a system message (Mixtral-Instruct's refuses one)
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Tu es utile.\n"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "et 3+3 ?"},
     {"role": "assistant", "content": "6"}],
]
THINKING = [  # Qwen3's reasoning: <think> in the content of the last turn / of an earlier turn, reasoning_content
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "<think>add</think>4"}, {"role": "user", "content": "3+3?"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes", "reasoning_content": "\nbecause\n"}],
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]
TOOL_CHAT = [{"role": "system", "content": "S"}, {"role": "user", "content": "1+2?"},
             {"role": "assistant", "content": "",
              "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
             {"role": "tool", "content": "3"}]


def _public(path, tmp_path):
    """(the template's JSON, a transformers tokenizer carrying it, moelab's ChatTemplate read from its saved files)."""
    import json

    data = json.loads(path.read_text())
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")),
                                  bos_token=data["bos_token"], eos_token=data["eos_token"])
    tok.chat_template = data["chat_template"]
    tok.save_pretrained(tmp_path)
    return data, tok, ChatTemplate.from_dir(tmp_path)


def _chats(template: str) -> list:
    chats = list(ALTERNATING)
    if "Only user and assistant roles" not in template:
        chats += WITH_SYSTEM
    if "</think>" in template:
        chats += THINKING
    return chats


@pytest.mark.parametrize("path", PUBLIC, ids=lambda p: p.stem)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_public_templates_render_as_transformers(path, add_generation_prompt, tmp_path):
    """`ChatTemplate.render` against transformers' apply_chat_template on public MoE checkpoints' templates:
    Mixtral-8x7B-Instruct, Qwen3-30B-A3B, OLMoE-1B-7B-0924-Instruct."""
    data, tok, mine = _public(path, tmp_path)
    for chat in _chats(data["chat_template"]):
        assert mine.render(chat, add_generation_prompt=add_generation_prompt) == tok.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=add_generation_prompt), chat
    if "roles must alternate" not in data["chat_template"]:
        return
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]  # the template's own refusal
    with pytest.raises(Exception) as theirs:
        tok.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match="roles must alternate") as ours:
        mine.render(bad)
    assert "roles must alternate" in str(theirs.value) and "roles must alternate" in str(ours.value)


def test_public_templates_are_the_shipped_formats(tmp_path):
    """A hand-written rendering of each stored template (what the model cards document), so that the stored text
    itself is checked, not only moelab's agreement with transformers on it."""
    by = {p.stem: p for p in PUBLIC}
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    _, _, qwen = _public(by["qwen3-30b-a3b"], tmp_path / "q")
    assert qwen.render(chat[:2], add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")
    assert qwen.render(chat) == (  # the last assistant turn after the last query gets an (empty) think block
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n")
    _, _, olmoe = _public(by["olmoe-1b-7b-0924-instruct"], tmp_path / "o")
    assert olmoe.render(chat[:2], add_generation_prompt=True) == (
        "<|endoftext|><|system|>\nS\n<|user|>\nU\n<|assistant|>\n")
    assert olmoe.render(chat) == "<|endoftext|><|system|>\nS\n<|user|>\nU\n<|assistant|>\nA<|endoftext|>\n"


@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_qwen3_thinking_switch_and_tools_render_as_transformers(enable_thinking, tmp_path):
    """Qwen3's `enable_thinking` (passed through as a template variable; the default, not passing it, leaves thinking
    on) and its tool branches (a tools list in the system turn, an assistant tool call, a tool response)."""
    _, tok, mine = _public(Path(__file__).parent / "data" / "chat_templates" / "qwen3-30b-a3b.json", tmp_path)
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    chat = [{"role": "user", "content": "2+2?"}]
    ours = mine.render(chat, add_generation_prompt=True, **extra)
    assert ours == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **extra)
    assert ours.endswith("<think>\n\n</think>\n\n") == (enable_thinking is False)
    assert mine.render(TOOL_CHAT, add_generation_prompt=True, tools=TOOLS, **extra) == tok.apply_chat_template(
        TOOL_CHAT, tools=TOOLS, tokenize=False, add_generation_prompt=True, **extra)
