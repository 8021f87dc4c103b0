"""A moelab-trained run exported with `moelab convert --to-hf` loads in transformers with the same float32
logits, the same greedy continuation and the same tokenizer — for each architecture the exporter picks.

Each run is a real `moelab.training.train.train` of a tiny model for 80 steps on a small prose corpus written to
tmp_path (it memorises the corpus quickly, so greedy continuations are varied text, not one repeated token):
a Mixtral-like config (softmax top-2, route_scale folded into the exported down projections), a Qwen2-MoE-like
one (dense first layer, sigmoid-gated shared expert, q/k/v biases, untied head) and a DeepSeek-V3-like one (MLA
with YaRN rope scaling, sigmoid router whose aux-loss-free bias was updated by training, groups, shared expert),
and one for each architecture of tests/test_hf_families.py (GraniteMoE: its four multipliers; DeepSeek-V2: MLA
with full-rank queries, softmax router with device-limited groups and a routed scaling factor; GLM-4.5: half-rotary
heads, q/k/v biases, q/k norm, sigmoid router with a trained selection bias and groups, shared expert; gpt-oss:
attention sinks, an 8-token window on every other layer, biased router and experts, clamped SwiGLU).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moelab import ModelConfig, MoEConfig, hf  # noqa: E402
from moelab.cli.main import main  # noqa: E402
from moelab.config.rope import RopeScaling  # noqa: E402
from moelab.config.train import TrainConfig  # noqa: E402
from moelab.data.tokenizer import END_OF_TEXT, decode, encode, load_tokenizer, prompt_ids  # noqa: E402
from moelab.inference.generate import generate  # noqa: E402
from moelab.runs.load import load_run  # noqa: E402
from moelab.training.train import train  # noqa: E402

TEXT = """A mixture of experts replaces one feed-forward block with many smaller experts and a router.
The router scores every token against every expert and sends it to the best few of them.
Only the chosen experts run, so the model holds many parameters but spends little compute per token.
When the router favours a handful of experts, the others starve; a balancing loss spreads the load.
DeepSeek adds a bias to each expert's score instead, raised for idle experts and lowered for busy ones.
Shared experts see every token and learn what all tokens need, leaving the routed experts to specialise.
"""
V, D = 320, 32
TRAIN = TrainConfig(steps=80, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=5, eval_every=80, eval_batches=2,
                    log_every=10, threads=1)
RUNS = {
    "mixtral": ModelConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                           moe=MoEConfig(d_model=D, d_expert=16, n_experts=4, top_k=2, route_scale=2.0)),
    "qwen2_moe": ModelConfig(vocab_size=V, d_model=D, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64, d_ff=40,
                             qkv_bias=True, n_dense_layers=1, tie_embeddings=False,
                             moe=MoEConfig(d_model=D, d_expert=16, n_experts=4, top_k=2, n_shared=1, d_shared=24,
                                           shared_gate=True, norm_topk_prob=False)),
    "deepseek_v3": ModelConfig(vocab_size=V, d_model=D, n_layers=3, n_heads=4, n_kv_heads=4, attention="mla",
                               q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=8,
                               max_seq_len=128, d_ff=48, n_dense_layers=1,
                               rope_scaling=RopeScaling(factor=4.0, original_max_seq_len=32, mscale=1.0,
                                                        mscale_all_dim=1.0),
                               moe=MoEConfig(d_model=D, d_expert=16, n_experts=8, top_k=2, n_shared=1,
                                             router="sigmoid", n_groups=4, topk_groups=2, expert_bias=True,
                                             bias_update_rate=1e-2, route_scale=2.5, aux_loss_coef=0.0,
                                             seq_aux_loss_coef=1e-4, z_loss_coef=0.0)),
    "granitemoe": ModelConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                              embed_scale=2.0, residual_scale=0.8, logits_scaling=0.5, attn_scale=0.3,
                              moe=MoEConfig(d_model=D, d_expert=16, n_experts=4, top_k=2)),
    "deepseek_v2": ModelConfig(vocab_size=V, d_model=D, n_layers=3, n_heads=4, n_kv_heads=4, attention="mla",
                               q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                               max_seq_len=64, d_ff=48, n_dense_layers=1,
                               moe=MoEConfig(d_model=D, d_expert=16, n_experts=8, top_k=2, n_shared=2,
                                             norm_topk_prob=False, n_groups=4, topk_groups=2, route_scale=2.0)),
    "glm4_moe": ModelConfig(vocab_size=V, d_model=D, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, rotary_dim=8,
                            qkv_bias=True, qk_norm="head", max_seq_len=64, d_ff=48, n_dense_layers=1, norm_eps=1e-5,
                            moe=MoEConfig(d_model=D, d_expert=16, n_experts=8, top_k=2, n_shared=1, router="sigmoid",
                                          n_groups=4, topk_groups=2, expert_bias=True, bias_update_rate=1e-2,
                                          route_scale=2.5, aux_loss_coef=0.0, z_loss_coef=0.0)),
    "gpt_oss": ModelConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, qkv_bias=True,
                           o_bias=True, attn_sinks=True, sliding_window=8, sliding_every=2, max_seq_len=64,
                           norm_eps=1e-5, moe=MoEConfig(d_model=D, d_expert=16, n_experts=4, top_k=2, biases=True,
                                                        activation="clamped_swiglu")),
}
PROMPTS = ["The router", "Shared experts", "When the"]


@pytest.fixture(scope="module", params=list(RUNS))
def exported(request, tmp_path_factory):
    """(arch, run dir, exported Hugging Face dir): trained with moelab.training.train.train, exported by the CLI."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"trained-{arch}")
    corpus = root / "corpus.txt"
    corpus.write_text((TEXT + "\n") * 40)
    threads = torch.get_num_threads()
    try:
        train(RUNS[arch], TRAIN, root / "run", data_path=corpus, progress=False)
    finally:
        torch.set_num_threads(threads)  # TrainConfig.threads is process-wide
    assert main(["convert", "--to-hf", str(root / "run"), str(root / "hf")]) == 0
    return arch, root / "run", root / "hf"


def test_trained_run_exports_with_same_logits_and_greedy_continuation(exported):
    arch, run, out = exported
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 2.0, losses  # it did learn: these are trained weights, not an initialisation
    ours, config = load_run(run)
    assert json.loads((out / "config.json").read_text())["model_type"] == arch
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    if arch == "deepseek_v3":
        assert hf_model.config.rope_parameters["rope_type"] == "yarn"
        bias = torch.stack([m.router.bias for m in ours.moe_layers()])
        assert bias.abs().max() > 0  # the aux-loss-free bias was trained and is exported as e_score_correction_bias
    tok = load_tokenizer(run / "tokenizer.json")
    ids = torch.tensor([encode(tok, TEXT * 3)[i * 40:i * 40 + ours.cfg.max_seq_len - 4] for i in range(3)])
    with torch.no_grad():
        expected, got = hf_model(ids).logits, ours(ids).logits
    diff = (expected - got).abs().max().item()
    print(f"{arch}: trained run vs exported transformers model, max |logit diff| = {diff:.2e} over {tuple(ids.shape)}")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    eot = tok.token_to_id(END_OF_TEXT)
    assert hf_model.config.eos_token_id == eot and hf_model.config.bos_token_id == eot
    gen_cfg = copy.deepcopy(hf_model.generation_config)  # greedy, 20 tokens whatever comes (moelab's
    gen_cfg.update(eos_token_id=None, pad_token_id=eot, max_new_tokens=20, do_sample=False)  # does not stop)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    seen: set[int] = set()
    for prompt in PROMPTS:
        ids_for_prompt = prompt_ids(tok, prompt)  # as `moelab generate` starts a document: [eot] + prompt
        assert ids_for_prompt[0] == eot and hf_tok(prompt)["input_ids"] == ids_for_prompt  # the same BOS rule
        mine = generate(ours, ids_for_prompt, 20, temperature=0.0)
        x = torch.tensor([ids_for_prompt])  # the explicit mask: generate would otherwise mask the pad id (= eot)
        theirs = hf_model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen_cfg)
        theirs = theirs[0, len(ids_for_prompt):].tolist()
        assert theirs == mine, (prompt, decode(tok, mine), decode(tok, theirs))
        assert len(mine) == 20
        seen.update(mine)
    assert len(seen) >= 8, seen  # varied text (a tiny model may loop on one prompt), so the comparison means something

    back = hf.load(out)  # and the export reads back into moelab
    with torch.no_grad():  # the same (inference) kernels as `got`
        torch.testing.assert_close(back(ids).logits, got, atol=1e-6, rtol=0)


def test_exported_tokenizer_encodes_like_the_run(exported):
    _, run, out = exported
    ours = load_tokenizer(run / "tokenizer.json")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto.eos_token == END_OF_TEXT and auto.eos_token_id == ours.token_to_id(END_OF_TEXT)
    assert auto.bos_token == END_OF_TEXT
    for text in [TEXT, "The router scores", "", "  two  spaces\tand a tab\n", f"a{END_OF_TEXT}b",
                 "ünïcödé ℵ∰ 🙂 \x00 — never in the corpus"]:
        ids = encode(ours, text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids, text
        assert auto(text, add_special_tokens=False)["input_ids"] == ids, text
        assert auto(text)["input_ids"] == theirs(text)["input_ids"] == prompt_ids(ours, text), text  # [eot] + ids
        assert theirs.decode(ids) == decode(ours, ids) == text


def test_eval_of_run_and_export_equals_transformers_on_the_same_tokens(exported, tmp_path, capsys):
    """`moelab eval` on the exported directory and on the run gives the loss transformers computes itself over
    the same token windows (its own tokenizer, [eos] + text, consecutive windows of 24 + 1 tokens)."""
    _, run, out = exported
    text = TEXT[:400] + "\nA sentence the corpus never had, to be predicted badly.\n"
    (tmp_path / "held.txt").write_text(text)
    results = {}
    for name, path in (("export", out), ("run", run)):
        assert main(["eval", str(path), "--data", str(tmp_path / "held.txt"), "--seq-len", "24", "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = [hf_model.config.eos_token_id] + hf_tok(text, add_special_tokens=False)["input_ids"]
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 24):
            window = torch.tensor([ids[s:s + 25]])
            logits = hf_model(window[:, :-1]).logits[0]
            total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            n += window.shape[1] - 1
    for r in results.values():
        assert r["tokens"] == n and r["bytes"] == len(text.encode())
        assert r["loss"] == pytest.approx(total / n, abs=1e-5)
