"""The `muon` command line: demo, plan, bench and conformance, with small bundled models and data."""
