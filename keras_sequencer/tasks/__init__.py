"""Tasks: what a user does with a model, each a Python function first; the CLI calls them."""
