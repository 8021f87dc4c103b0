"""The byte-level BPE tokenizer (Sennrich et al. 2016, over bytes as in GPT-2): train, load, encode, decode,
the prompt rule and the tokenizer's identity.

    train_tokenizer(documents, vocab_size, path=None, quiet=True) -> tokenizers.Tokenizer
    load_tokenizer(path) -> Tokenizer;  encode(tokenizer, text) -> list[int];  decode(tokenizer, ids) -> str
    prompt_ids(tokenizer, prompt, rule) -> list[int]   "endoftext": [END_OF_TEXT] + encode(prompt), how training
                                                  documents start; "tokenizer": its post-processor's special tokens
    tokenizer_sha256(tokenizer) -> str            the identity of a tokenizer (its JSON form)
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"


# -------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(documents: Iterable[str], vocab_size: int, path: str | Path | None = None,
                    quiet: bool = True) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `documents`, optionally saving it as `path` (tokenizer.json).

    The vocabulary is ``END_OF_TEXT`` (id 0), the 256 byte symbols, and merges of pairs seen at least twice,
    up to `vocab_size` (fewer if the corpus runs out of pairs). There is no normalizer, so any text round-trips
    exactly. Training is deterministic for the same documents.
    """
    if not 257 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size={vocab_size} must be in [257, 2**32] (256 byte symbols + {END_OF_TEXT})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=not quiet and sys.stderr.isatty())  # else it prints blank lines
    tokenizer.train_from_iterator(documents, trainer=trainer)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tokenizer.save(str(tmp))
        os.replace(tmp, path)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer saved by `train_tokenizer` (any ``tokenizer.json`` of the `tokenizers` library).
    FileNotFoundError when absent; ValueError naming the file when it is not a tokenizer (not JSON, or JSON
    the `tokenizers` library cannot read)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception for JSON or schema errors
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable tokenizer.json ({reason}); restore the file") from None


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`. No special tokens are added, and ``encode(tok, "") == []``."""
    return tokenizer.encode(text, add_special_tokens=False).ids


PROMPT_RULES = ("endoftext", "tokenizer")


def prompt_ids(tokenizer: Tokenizer, prompt: str, rule: str = "endoftext") -> list[int]:
    """The ids a text prompt is continued from, by the checkpoint's prompt rule:

    "endoftext" (moelab's trained runs): [END_OF_TEXT] + encode(prompt), the start of a document as the
        training stream has it (every document follows an end-of-text token). Without that token in the
        vocabulary, just encode(prompt).
    "tokenizer" (a Hugging Face checkpoint, and a run converted from one): the tokenizer's own special tokens,
        as its post-processor adds them (`tokenizer.encode(prompt, add_special_tokens=True)`, what
        transformers' `tokenizer(prompt)` gives, e.g. [BOS] + tokens, or the tokens alone).
    """
    if rule == "tokenizer":
        return tokenizer.encode(prompt, add_special_tokens=True).ids
    if rule != "endoftext":
        raise ValueError(f"prompt rule {rule!r} is not known: allowed {', '.join(map(repr, PROMPT_RULES))}")
    eot = tokenizer.token_to_id(END_OF_TEXT)
    return ([eot] if eot is not None else []) + encode(tokenizer, prompt)


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """Text of `ids`, keeping ``END_OF_TEXT``. It inverts `encode` exactly."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """SHA-256 of a tokenizer's JSON form: its identity (a run records it; resuming checks it)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
