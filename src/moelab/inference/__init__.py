"""moelab.inference."""
