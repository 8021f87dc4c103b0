"""Training: the loop (train.py), AdamW and the schedule (optim.py), per-step metrics (metrics.py), a resumed run's
data rules (resume.py), and evaluation on held-out text (evaluation.py)."""
