"""dittohead: a data dropbox for research studies (see README.md)."""

__version__ = "0.1.0"
