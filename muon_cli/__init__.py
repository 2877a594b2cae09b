"""muon_cli (under construction)."""
