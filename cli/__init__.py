"""The `mice` command-line interface (see cli/main.py)."""
