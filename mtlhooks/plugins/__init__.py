"""Built-in plugins: one module per method. Each depends on the core only."""
