"""certrotate_server: reference EST server, device gateway and operator CLI."""

__version__ = "0.1.0"
