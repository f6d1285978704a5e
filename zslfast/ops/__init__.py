"""The public ops: torch.library registration, autograd, fake kernels and input checks, one module per op."""
