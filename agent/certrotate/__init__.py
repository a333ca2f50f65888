"""certrotate: crash-safe rotation of a device's TLS client identity."""

__version__ = "0.1.0"
