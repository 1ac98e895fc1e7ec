"""Triton kernels with PyTorch and JAX bindings (imported as `mtp_kernels`)."""
