"""Subcommands of ``pyro-am``; each module exposes ``register(subparsers)``."""
