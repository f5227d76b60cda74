"""CLI subcommands. Each module exposes ``register(subparsers)``; ``cli.COMMAND_MODULES`` lists them."""
