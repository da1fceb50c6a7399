"""topoxr_torch adapter (placeholder until the adapters land)."""
