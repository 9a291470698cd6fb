"""Triton kernels (shipped as `fastmcl.kernels`). Kernels import nothing else of ours."""
