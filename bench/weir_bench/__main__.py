"""`python -m weir_bench` runs `weir bench`."""

import sys

from weir_bench.cli import main

sys.exit(main())
