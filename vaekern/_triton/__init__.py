"""The Triton backend: registers the ``vaekern_triton`` kernels when imported."""
