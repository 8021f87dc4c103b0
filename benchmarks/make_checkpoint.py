"""A random-weight Hugging Face Qwen3-MoE checkpoint of a real shape, built by transformers' own class (no download),
with a byte-level BPE tokenizer trained on the Python standard library: the model `benchmarks/decode.py` times.

    python benchmarks/make_checkpoint.py OUT [--layers 16] [--seed 0]

Shape: hidden 2048, 16 layers, 64 experts top-8, expert width 768, 16 query / 4 KV heads of 128, vocabulary 32000,
untied head (5.1 B parameters, 0.84 B active per token; 10.3 GB in bfloat16). Needs transformers and tokenizers.
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
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(tokenizer_text(), vocab_size=32000, min_frequency=2, special_tokens=["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(a.out)
    cfg = Qwen3MoeConfig(hidden_size=2048, num_hidden_layers=a.layers, num_local_experts=64, num_experts_per_tok=8,
                         moe_intermediate_size=768, intermediate_size=6144, num_attention_heads=16,
                         num_key_value_heads=4, head_dim=128, vocab_size=32000, tie_word_embeddings=False,
                         norm_topk_prob=True, max_position_embeddings=4096, bos_token_id=0, eos_token_id=0,
                         mlp_only_layers=[], decoder_sparse_step=1)
    torch.manual_seed(a.seed)
    torch.set_default_dtype(torch.bfloat16)
    model = Qwen3MoeForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(a.out, max_shard_size="2GB")
    print(f"{a.out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main()
