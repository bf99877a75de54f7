"""Astaire: active resynchronisation for memcached clusters."""

__version__ = "0.1.0"
