"""`python3 -m dittohead` runs the command line."""

from .early import entry_point

entry_point()
