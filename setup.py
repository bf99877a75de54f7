"""Build script: the Cython codec (``_tap`` and ``_writer``, sharing ``_tap.pxd``) is compiled here; everything else is declared in pyproject.toml.

Set ASTAIRE_NO_EXTENSIONS=1 to install without compiling (the package then runs on its
pure-Python codec, as it does with ASTAIRE_PUREPYTHON=1).

With gcc the codec is built guided by a profile, as CPython's ``--enable-optimizations``
builds are: compiled once instrumented, run through ``bench/pgo_train.py`` (in-process, no
server, a few seconds), compiled again with the counts it recorded. ASTAIRE_PGO=0 builds with
``-O3`` alone; so does a build that cannot train (another compiler, no ``bench/`` beside
this file), and one whose training fails, which says why.
"""
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
PGO_TRAIN = os.path.join(HERE, "bench", "pgo_train.py")


def _say(message: str) -> None:
    print(f"astaire: {message}", file=sys.stderr, flush=True)


class BuildExt(build_ext):
    """build_ext with gcc's profile-guided optimisation (see the module's docstring)."""

    def build_extensions(self):
        why = self._cannot_train()
        if why:
            _say(f"codec built without a profile: {why}")
            return super().build_extensions()
        base = {id(ext): (list(ext.extra_compile_args), list(ext.extra_link_args)) for ext in self.extensions}
        profile_dir = tempfile.mkdtemp(prefix="astaire-pgo-")
        try:
            self._flags(base, ["-fprofile-generate", f"-fprofile-dir={profile_dir}"], ["-fprofile-generate"])
            self.force = True  # every unit instrumented, even one whose module is up to date
            super().build_extensions()
            self._train(profile_dir)
            self._flags(base, ["-fprofile-use", f"-fprofile-dir={profile_dir}", "-fprofile-partial-training",
                               "-Wno-missing-profile", '-DASTAIRE_BUILD="profile-guided"'], [])
            self.force = True
            super().build_extensions()
            _say("codec built with a profile from bench/pgo_train.py")
        except Exception as e:  # the compiler's, the training's, the copy's: the plain build still stands
            _say(f"the profile-guided build failed ({e}); building the codec without a profile")
            self._flags(base, [], [])
            self.force = True
            super().build_extensions()
        finally:
            shutil.rmtree(profile_dir, ignore_errors=True)

    def _cannot_train(self) -> str:
        if os.environ.get("ASTAIRE_PGO", "1") == "0":
            return "ASTAIRE_PGO=0"
        if not os.path.isfile(PGO_TRAIN):
            return "bench/pgo_train.py is not beside setup.py"
        cc = getattr(self.compiler, "compiler_so", None) or ["cc"]
        try:
            version = subprocess.run([cc[0], "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as e:
            return f"cannot ask the compiler its version ({e})"
        if "Free Software Foundation" not in version:
            return f"the compiler is not gcc ({cc[0]})"
        return ""

    def _flags(self, base, compile_args, link_args) -> None:
        for ext in self.extensions:
            compile0, link0 = base[id(ext)]
            ext.extra_compile_args = compile0 + compile_args
            ext.extra_link_args = link0 + link_args

    def _train(self, profile_dir: str) -> None:
        """Run the training with the instrumented modules, from a copy of the package."""
        root = os.path.join(profile_dir, "train")
        shutil.copytree(os.path.join(HERE, "astaire"), os.path.join(root, "astaire"),
                        ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
        for ext in self.extensions:
            shutil.copy(self.get_ext_fullpath(ext.name), os.path.join(root, *ext.name.split(".")[:-1]))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
                   PYTHONDONTWRITEBYTECODE="1")
        run = subprocess.run([sys.executable, PGO_TRAIN], cwd=root, env=env, capture_output=True, text=True,
                             timeout=600)
        if run.returncode != 0:
            raise RuntimeError(f"bench/pgo_train.py exited with {run.returncode}: {run.stderr.strip()[-2000:]}")
        # gcc names a profile after its object's path: mangled into one name for a relative
        # path, under the same directories for an absolute one.
        written = [f for _, _, files in os.walk(profile_dir) for f in files if f.endswith(".gcda")]
        if len(written) < len(self.extensions):
            raise RuntimeError(f"the training wrote {len(written)} profiles for {len(self.extensions)} modules")
        _say(run.stdout.strip())

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
    cmdclass={"build_ext": BuildExt},
)
