"""Text and tokens, before any model: the corpus (corpus.py), the byte-level BPE tokenizer and the prompt rule
(tokenizer.py), token streams on disk and their batches (tokens.py), chat templates (chat.py)."""
