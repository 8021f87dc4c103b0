"""moelab.layer."""
