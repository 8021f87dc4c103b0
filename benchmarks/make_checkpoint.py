"""A random-weight Hugging Face MoE checkpoint of a real shape, built by transformers' own class (no download),
with a byte-level BPE tokenizer trained on the Python standard library: the models `benchmarks/decode.py` and
`benchmarks/offload.py` time.

    python benchmarks/make_checkpoint.py OUT [--arch qwen3_moe|olmoe] [--layers 16] [--seed 0]

Shapes: "qwen3_moe" (default): hidden 2048, 16 layers, 64 experts top-8, expert width 768, 16 query / 4 KV heads
of 128, vocabulary 32000, untied head (5.1 B parameters, 0.84 B active per token; 10.3 GB in bfloat16).
"olmoe": OLMoE-1B-7B at full size — hidden 2048, 16 layers, 64 experts top-8, expert width 1024, 16 heads of
128 with full q/k norm, vocabulary 50304 (6.9 B parameters, 1.3 B active; 13.8 GB in bfloat16). Needs
transformers and tokenizers; builds in bfloat16 (the model's size in RAM, once).
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch


def tokenizer_text(max_chars: int = 6_000_000) -> list[str]:
    texts, total = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.append(f.read_text(encoding="utf-8", errors="ignore"))
        total += len(texts[-1])
        if total > max_chars:
            break
    return texts


def main() -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--arch", default="qwen3_moe", choices=["qwen3_moe", "olmoe"])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(tokenizer_text(), vocab_size=32000, min_frequency=2, special_tokens=["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(a.out)
    if a.arch == "olmoe":
        cfg = OlmoeConfig(hidden_size=2048, num_hidden_layers=a.layers, num_experts=64, num_experts_per_tok=8,
                          intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16, vocab_size=50304,
                          tie_word_embeddings=False, norm_topk_prob=False, max_position_embeddings=4096,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
        build = OlmoeForCausalLM
    else:
        cfg = Qwen3MoeConfig(hidden_size=2048, num_hidden_layers=a.layers, num_local_experts=64,
                             num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
                             num_attention_heads=16, num_key_value_heads=4, head_dim=128, vocab_size=32000,
                             tie_word_embeddings=False, norm_topk_prob=True, max_position_embeddings=4096,
                             bos_token_id=0, eos_token_id=0, mlp_only_layers=[], decoder_sparse_step=1)
        build = Qwen3MoeForCausalLM
    torch.manual_seed(a.seed)
    torch.set_default_dtype(torch.bfloat16)
    model = build(cfg)
    torch.set_default_dtype(torch.float32)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(a.out, max_shard_size="2GB")
    print(f"{a.out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main()
