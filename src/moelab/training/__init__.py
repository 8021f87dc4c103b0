"""moelab.training."""
