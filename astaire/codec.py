"""The binary-protocol/TAP codec, compiled when available.

The Cython build is two units, ``astaire._tap`` (frame parser, TAP scanner, encoders)
and ``astaire._writer`` (the Writer), joined by ``_tap.pxd``; ``astaire._tap_py`` is
their pure-Python twin with the same names. Setting ``ASTAIRE_PUREPYTHON=1`` forces the pure one (as
``MSGPACK_PUREPYTHON`` does for msgpack). ``IMPLEMENTATION`` says which is loaded, and
``BUILD`` how the compiled one was built ("profile-guided" or "plain"; "" for the pure one).
"""
import os

if os.environ.get("ASTAIRE_PUREPYTHON", "") not in ("", "0"):
    from astaire._tap_py import *  # noqa: F401,F403

    IMPLEMENTATION = "python"
    BUILD = ""
else:
    try:
        from astaire._tap import *  # noqa: F401,F403
        from astaire._writer import *  # noqa: F401,F403
        from astaire._writer import BUILD

        IMPLEMENTATION = "cython"
    except ImportError:
        from astaire._tap_py import *  # noqa: F401,F403

        IMPLEMENTATION = "python"
        BUILD = ""
