"""muon_torch (under construction)."""
