"""The binary-protocol/TAP codec, compiled when available.

``astaire._tap`` is the Cython build; ``astaire._tap_py`` is its pure-Python twin with
the same names. Setting ``ASTAIRE_PUREPYTHON=1`` forces the pure one (as
``MSGPACK_PUREPYTHON`` does for msgpack). ``IMPLEMENTATION`` says which is loaded.
"""
import os

if os.environ.get("ASTAIRE_PUREPYTHON", "") not in ("", "0"):
    from astaire._tap_py import *  # noqa: F401,F403

    IMPLEMENTATION = "python"
else:
    try:
        from astaire._tap import *  # noqa: F401,F403

        IMPLEMENTATION = "cython"
    except ImportError:
        from astaire._tap_py import *  # noqa: F401,F403

        IMPLEMENTATION = "python"
