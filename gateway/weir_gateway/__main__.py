"""`python -m weir_gateway`: the same as `weir gateway`."""

from weir_gateway.cli import main

raise SystemExit(main())
