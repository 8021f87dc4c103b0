"""moelab.model."""
