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
    "{% if loop.index > 8 %}{% break %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ eos_token }}"
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
]


@pytest.mark.parametrize("path", PUBLIC, ids=lambda p: p.stem)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_public_templates_render_as_transformers(path, add_generation_prompt, tmp_path):
    """`ChatTemplate.render` against transformers' apply_chat_template on a public MoE checkpoint's template (only
    Mixtral-8x7B-Instruct's so far: the exact Qwen3-MoE and OLMoE-Instruct texts are still to be added)."""
    import json

    data = json.loads(path.read_text())
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")),
                                  bos_token=data["bos_token"], eos_token=data["eos_token"])
    tok.chat_template = data["chat_template"]
    tok.save_pretrained(tmp_path)
    mine = ChatTemplate.from_dir(tmp_path)
    for chat in ALTERNATING:
        assert mine.render(chat, add_generation_prompt=add_generation_prompt) == tok.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    if "roles must alternate" not in data["chat_template"]:
        return
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]  # the template's own refusal
    with pytest.raises(Exception) as theirs:
        tok.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match="roles must alternate") as ours:
        mine.render(bad)
    assert "roles must alternate" in str(theirs.value) and "roles must alternate" in str(ours.value)
