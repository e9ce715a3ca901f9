"""The `none` memory mode: plain generation, no memory read."""
