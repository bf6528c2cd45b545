"""Tensor parallelism over the GPUs of one host: process group state, collectives, the worker process."""
