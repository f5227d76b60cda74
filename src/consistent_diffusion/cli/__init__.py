"""Command line: main (the entry point), options/ (all argparse), commands/ (one module per command)."""
