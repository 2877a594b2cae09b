"""muon_conformance (under construction)."""
