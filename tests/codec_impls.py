"""Both codec builds, for tests that must run against each (msgpack/aiohttp style).

``IMPLS`` lists the pure-Python twin and the compiled module; the compiled one is skipped,
with the reason, only when it has not been built. The ``tap`` fixture (provided to every
test module by conftest) runs a test once per build.
"""
import types

import pytest

from astaire import _tap_py

try:
    from astaire import _tap, _writer

    # The compiled build is two units (frame parser and encoders; the Writer): one
    # namespace with the names of both, as astaire.codec exports them.
    _tap_c = types.ModuleType("astaire._tap+_writer")
    _tap_c.__dict__.update(vars(_tap))
    _tap_c.__dict__.update({name: getattr(_writer, name) for name in _writer.__all__})
    _tap_c.__all__ = [*_tap.__all__, *_writer.__all__]
    _NOT_BUILT = ""
except ImportError as exc:  # pragma: no cover - depends on the build
    _tap_c = None
    _NOT_BUILT = f"astaire._tap is not built (python setup.py build_ext --inplace): {exc}"

IMPLS = [
    pytest.param(_tap_py, id="python"),
    pytest.param(_tap_c, id="cython", marks=pytest.mark.skipif(_tap_c is None, reason=_NOT_BUILT or "built")),
]


@pytest.fixture(params=IMPLS)
def tap(request):
    """The codec module, once per build."""
    return request.param
