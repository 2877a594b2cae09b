"""The `muon` command line (demo, plan, bench, conformance) with small bundled models and data."""
