"""dittohead: a data dropbox for research studies (see README.md)."""

__version__ = "0.1.0"
# The config file without --config or $DITTOHEAD_CONFIG (a str: importing this
# package must stay cheap for `upload --host`).
DEFAULT_CONFIG_PATH = "/etc/dittohead/config.yaml"
