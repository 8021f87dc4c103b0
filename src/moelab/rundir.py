"""`moelab.rundir.load_run`, the public loader of a run directory (it lives in `moelab.runs.load`)."""

from moelab.runs.load import load_run

__all__ = ["load_run"]
