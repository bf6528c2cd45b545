"""Generated stubs and descriptors for the weir.v1 API. Regenerate with `make proto`; never edit by hand."""
