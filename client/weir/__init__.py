"""Weir's protocol packages: weir.v1 holds the contract (inference.proto) and the stubs generated from it."""
