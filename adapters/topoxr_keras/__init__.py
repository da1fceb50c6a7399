"""topoxr_keras adapter (placeholder until the adapters land)."""
