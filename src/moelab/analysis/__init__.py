"""moelab.analysis."""
