"""Weir protocol packages (generated from proto/)."""
