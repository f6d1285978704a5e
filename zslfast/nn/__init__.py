"""nn.Module wrappers over the ops, drop-in for ZSL code (filled in by the op and model issues)."""
