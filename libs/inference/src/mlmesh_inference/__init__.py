"""Clients for model servers (Triton / KServe v2)."""
