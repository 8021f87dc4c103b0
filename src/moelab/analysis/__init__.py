"""What the routers did: routing statistics (routing_stats.py, numpy), the routing report (routing_report.py), and
plots from a run's metrics.jsonl (plots.py)."""
