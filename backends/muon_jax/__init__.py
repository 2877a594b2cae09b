"""muon_jax (under construction)."""
