"""Build script: the Cython codec (``_tap`` and ``_writer``, sharing ``_tap.pxd``) is compiled here; everything else is declared in pyproject.toml.

Set ASTAIRE_NO_EXTENSIONS=1 to install without compiling (the package then runs on its
pure-Python codec, as it does with ASTAIRE_PUREPYTHON=1).
"""
import os

from setuptools import Extension, find_packages, setup

ext_modules = []
if not os.environ.get("ASTAIRE_NO_EXTENSIONS"):
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [Extension(f"astaire.{unit}", [f"astaire/{unit}.pyx"], extra_compile_args=["-O3"],
                   include_dirs=["astaire"], depends=["astaire/_md5.h", "astaire/_mdline.h", "astaire/_tap.pxd"])
         for unit in ("_tap", "_writer")],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )

setup(
    packages=find_packages(include=["astaire", "astaire.*"]) + ["astaire_throttle"],
    package_dir={"astaire": "astaire", "astaire_throttle": "throttle/astaire_throttle"},
    package_data={"astaire": ["*.pyx", "*.pxd", "*.h", "py.typed"], "astaire.snmp": ["*.txt", "stubs/*.txt"]},
    ext_modules=ext_modules,
)
