"""`python -m muon_conformance`: see `muon_conformance.cli`."""

import sys

from muon_conformance.cli import main

sys.exit(main())
