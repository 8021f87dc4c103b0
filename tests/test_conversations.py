"""moelab.data.conversations: JSONL chats rendered with a chat template and masked to the assistant's text —
ids and mask against transformers' apply_chat_template(return_assistant_tokens_mask=True) for a template with
{% generation %} blocks, against the hand-written assistant text for the prefix rule; batches; named errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moelab.data.chat import ChatTemplate
from moelab.data.conversations import IGNORE, ChatData, encode_conversation, read_conversations
from moelab.data.tokenizer import train_tokenizer

GEN = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
       "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}"
       "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PLAIN = GEN.replace("{% generation %}", "").replace("{% endgeneration %}", "")
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4, since two and two make four."},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]


@pytest.fixture(scope="module")
def tok():
    t = train_tokenizer(["What is two and two? You are terse. make four since " * 20], 290)
    t.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return t


def test_generation_spans_match_transformers_assistant_mask(tok):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    out = ref.apply_chat_template(CHAT, chat_template=GEN, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, target = encode_conversation(tok, ChatTemplate(GEN), CHAT)
    assert ids.tolist() == list(out["input_ids"])
    assert target.astype(int).tolist() == list(out["assistant_masks"])
    assert 0 < target.sum() < len(ids)


def test_prefix_rule_trains_the_assistant_text_and_its_turn_end(tok):
    """Without generation blocks each assistant span runs from the generation prompt to the next message: its content,
    <|im_end|> and the template's newline; nothing of the system or user text."""
    ids, target = encode_conversation(tok, ChatTemplate(PLAIN), CHAT)
    trained = tok.decode(ids[target].tolist(), skip_special_tokens=False)
    assert trained == "4, since two and two make four.<|im_end|>\n6.<|im_end|>\n"
    # the generation-block rule marks the same tokens less the newline after each turn
    ids2, target2 = encode_conversation(tok, ChatTemplate(GEN), CHAT)
    assert ids2.tolist() == ids.tolist()
    assert tok.decode(ids[target2].tolist(), skip_special_tokens=False) == \
        "4, since two and two make four.<|im_end|>6.<|im_end|>"


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    rewriting = PLAIN.replace("{% for m in messages %}", "{% for m in messages %}{% if loop.last %}[last]{% endif %}")
    with pytest.raises(ValueError, match=r"messages\[2\]: the chat template renders .* differently"):
        encode_conversation(tok, ChatTemplate(rewriting), CHAT)


def test_batches_shift_and_mask(tok, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": CHAT[: 3 + (i % 3)]}) for i in range(6)) + "\n\n")
    data = ChatData(path, tok, ChatTemplate(GEN), seq_len=64, val_fraction=0.2)
    assert len(data.train) == 5 and len(data.val) == 1 and data.metadata["n_conversations"] == 6
    x, y = data.get_batch("train", 3, 64, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 64)
    ids, target = encode_conversation(tok, ChatTemplate(GEN), CHAT[:3])
    n = len(ids) - 1
    want_y = np.where(target[1:], ids[1:], IGNORE)
    row = next(b for b in range(3) if x[b, :n].tolist() == ids[:-1].tolist())  # conversations 0 and 3 are CHAT[:3]
    assert y[row, :n].tolist() == want_y.tolist() and (y[row, n:] == IGNORE).all()
    (vx, vy), = list(data.iter_eval_batches(4, 64))
    assert vx.shape == (1, 64)


@pytest.mark.parametrize("lines, match", [
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', '{"text": "x"}'],
     r"chats.jsonl line 2: field 'messages' is missing"),
    (["not json"], r"line 1: not valid JSON"),
    (['{"messages": [{"role": "user", "content": "a"}]}'], r"line 1: field 'messages' has no assistant turn"),
])
def test_bad_lines_are_named(tmp_path, lines, match):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        read_conversations(path)


def test_no_template_and_truncated_assistant_are_named(tok, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(3)) + "\n")
    with pytest.raises(ValueError, match=r"has no chat template \(field 'chat_template'"):
        ChatData(path, tok, None, seq_len=64)
    with pytest.raises(ValueError, match=r"conversation 1: no assistant token within its first 9 tokens"):
        ChatData(path, tok, ChatTemplate(GEN), seq_len=8)
