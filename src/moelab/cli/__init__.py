"""The `moelab` command: argument parsing and one-line errors (cli/main.py), config fields as flags
(cli/flags.py), the demos (cli/demo.py, cli/balancing.py) and what `moelab generate` prints (cli/generate.py).
Nothing imports this district."""

from moelab.cli.main import main

__all__ = ["main"]
