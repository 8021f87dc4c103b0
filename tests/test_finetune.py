"""`moelab train --init-from` (moelab.training.init) on tiny Qwen3-MoE and OLMoE checkpoints transformers builds:
conversations with the loss on assistant tokens (the step-0 loss against transformers' own model and assistant
mask), frozen groups untouched, routing from step 0, the checkpoint's prompt rule kept, `moelab convert --to-hf`
of the result loading in transformers with the same logits; contradicting flags and bad data are named errors."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moelab import hf  # noqa: E402
from moelab.cli.main import main  # noqa: E402
from moelab.data.tokenizer import train_tokenizer  # noqa: E402
from moelab.runs.load import load_model, load_run  # noqa: E402

V = 320
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, initializer_range=0.1, eos_token_id=None, bos_token_id=None,
              pad_token_id=None)
GEN = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
       "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}"
       "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "the", "dog", "ran", "to", "it", "while", "we", "said", "hello",
         "there", "friend"]
TEXT = "\n".join(" ".join(WORDS[(i * j) % len(WORDS)] for j in range(12)) for i in range(200))


def _chats(n: int = 10) -> list[dict]:
    return [{"messages": [{"role": "user", "content": " ".join(WORDS[i % 5: i % 5 + 4])},
                          {"role": "assistant", "content": " ".join(WORDS[i % 7: i % 7 + 6])}]} for i in range(n)]


def _checkpoint(path, arch: str, template: bool = True):
    torch.manual_seed(0)
    if arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=16, num_experts=4,
                                          num_experts_per_tok=2, head_dim=16, norm_topk_prob=True)
    else:
        cfg = transformers.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(path)
    tok = train_tokenizer([TEXT], 300)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(path / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", **({"chat_template": GEN} if template else {})}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return model, tok


def _train(*args) -> int:
    return main(["train", *map(str, args), "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-batches",
                 "1", "--log-every", "1", "--threads", "1", "--lr", "1e-2", "--warmup-steps", "0", "--quiet"])


def test_conversations_freeze_routing_and_export(tmp_path):
    ref, tok = _checkpoint(tmp_path / "qwen", "qwen3_moe")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in _chats()))
    run = tmp_path / "run"
    assert _train("--init-from", tmp_path / "qwen", "--data", chats, "--out", run, "--freeze", "routers,attention",
                  "--moe-aux-loss-coef", "0.05", "--val-fraction", "0.2") == 0
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3] and "expert_load" in lines[0] and "router_entropy" in lines[0]
    # step 0: transformers' model, loss over the assistant tokens transformers' own mask marks (validation = last 2)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    total, n = 0.0, 0
    with torch.no_grad():
        for c in _chats()[-2:]:
            enc = fast.apply_chat_template(c["messages"], chat_template=GEN, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
            ids, mask = torch.tensor([enc["input_ids"]]), torch.tensor(enc["assistant_masks"], dtype=torch.bool)
            logp = ref(ids).logits[0, :-1].log_softmax(-1)
            picked = logp.gather(1, ids[0, 1:, None])[:, 0]
            total -= picked[mask[1:]].sum().item()
            n += int(mask[1:].sum())
    assert lines[0]["val_loss"] == pytest.approx(total / n, rel=1e-5)
    # frozen groups are the checkpoint's, bit for bit; the rest trained
    before, (after, config) = hf.load(tmp_path / "qwen", for_training=True), load_run(run, for_training=True)
    assert config["init"]["freeze"] == ["routers", "attention"] and config["model"]["moe"]["aux_loss_coef"] == 0.05
    b, a = before.state_dict(), after.state_dict()
    for name in b:
        if ".router." in name or ".attn." in name:
            assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["blocks.0.ffn.experts.w_in"], b["blocks.0.ffn.experts.w_in"])
    assert not torch.equal(a["embed.weight"], b["embed.weight"])
    # the checkpoint's prompt rule (its tokenizer's own encoding, no moelab <|endoftext|> in front)
    assert load_model(run).prompt_ids("the cat") == tok.encode("the cat").ids
    # export: transformers loads it and computes moelab's logits
    assert main(["convert", "--to-hf", str(run), str(tmp_path / "hf")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, after(ids).logits, atol=1e-5, rtol=1e-5)


def test_plain_text_olmoe_resumes_with_its_freeze(tmp_path):
    """Plain text (documents separated by the tokenizer's <|endoftext|>) on OLMoE; a resumed fine-tune keeps its
    frozen experts frozen."""
    _checkpoint(tmp_path / "olmoe", "olmoe", template=False)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    run = tmp_path / "run"
    assert _train("--init-from", tmp_path / "olmoe", "--data", text, "--out", run, "--freeze", "experts") == 0
    first, _ = load_run(run, for_training=True)
    assert main(["train", "--out", str(run), "--resume", "--steps", "5", "--quiet"]) == 0
    second, config = load_run(run, for_training=True)
    assert config["init"]["freeze"] == ["experts"]
    assert torch.equal(first.blocks[1].ffn.experts.w_out, second.blocks[1].ffn.experts.w_out)
    assert not torch.equal(first.blocks[1].ffn.router.weight, second.blocks[1].ffn.router.weight)
    assert [json.loads(s)["step"] for s in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("args, match", [
    (["--d-model", "64"], r"--init-from: d_model=64 contradicts the checkpoint \(d_model=32\)"),
    (["--moe-n-experts", "8"], r"moe.n_experts=8 contradicts the checkpoint \(moe.n_experts=4\)"),
    (["--freeze", "routers,gates"], r"--freeze 'gates' is not a parameter group: allowed routers, experts"),
    (["--freeze", "shared"], r"--freeze 'shared': this model has no such parameters"),
    (["--resume"], r"--resume does not apply"),
    (["--data", "BAD"], r"chats.jsonl line 2: field 'messages' is missing"),
    (["--data", "NOTEMPLATE"], r"has no chat template \(field 'chat_template'"),
    (["UNSUPPORTED"], r"model_type='phimoe' is not supported by moelab.hf: allowed 'mixtral'"),
])
def test_bad_input_is_one_named_line(tmp_path, capsys, args, match):
    _checkpoint(tmp_path / "qwen", "qwen3_moe")
    bad = tmp_path / "chats.jsonl"
    bad.write_text(json.dumps(_chats(1)[0]) + "\n" + json.dumps({"text": "no messages"}) + "\n")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(c) + "\n" for c in _chats()))
    source = tmp_path / "qwen"
    if "NOTEMPLATE" in args:
        (source / "tokenizer_config.json").write_text("{}")
    if "UNSUPPORTED" in args:
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**config, "model_type": "phimoe"}))
        args = []
    args = [{"BAD": str(bad), "NOTEMPLATE": str(good)}.get(a, a) for a in args]
    data = [] if "--data" in args else ["--data", str(good)]
    capsys.readouterr()
    assert _train("--init-from", source, "--out", tmp_path / "run", *data, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelab train: error: ") and len(err.strip().splitlines()) == 1, err
    assert __import__("re").search(match, err), err
