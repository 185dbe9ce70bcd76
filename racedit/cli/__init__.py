"""Command-line entry points (thin: parse, build, call the library)."""
