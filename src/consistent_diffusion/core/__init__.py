"""Core: errors, atomic I/O and versions, the one image <-> tensor converter, image operations."""
