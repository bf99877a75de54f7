"""The codec's profile-guided build (setup.py, bench/pgo_train.py).

The training must drive the compiled Writer through a resync's paths, or the profile lays
the code out for something else; and a build with gcc, as scripts/setup makes it, must be
the profile-guided one (setup.py falls back to a plain build, saying so, when it cannot
train: these tests turn that fallback into a failure).
"""
import mmap
import os
import shutil
import subprocess
import sys

import pytest

from astaire import codec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(codec.IMPLEMENTATION != "cython", reason="the compiled codec is not built")


def _need_gcc() -> None:
    """Skip unless the compiler is gcc (setup.py's test too): otherwise there is no profile."""
    version = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout
    if "Free Software Foundation" not in version:
        pytest.skip("no gcc: setup.py builds without a profile")


def test_the_training_takes_a_resyncs_paths():
    from bench import pgo_train

    n = 6000
    text = pgo_train.metadump_text(n, b"2000000000")
    wanted = [vb for vb in range(128) if vb % 3]
    keep = set(wanted)
    expected = sum(1 for i in range(n) if codec.vbucket_hash(b"table\\\\key-%d" % i) & 127 in keep)
    table = mmap.mmap(-1, (1 << 18) * 16)
    first = pgo_train.crawler_stream(codec.Writer, text, wanted, table, 0)
    second = pgo_train.crawler_stream(codec.Writer, text, wanted, table, 1)
    # The first stream fetches values and adds every wanted key...
    assert first["added"] == first["entries"] == expected
    assert first["skipped_unwanted"] == n - expected
    # ...the second meets its notes: flags-only fetches, kept on the note, no value read
    # except for the copies held back past the first stream's notes.
    assert second["entries"] == expected
    assert second["deduplicated"] >= 0.9 * expected
    assert second["added"] + second["kept"] == expected
    assert second["bytes"] < first["bytes"] / 3


def test_the_training_runs_as_the_build_runs_it():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "pgo_train.py"), "--records", "6000"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "kept by the second stream" in run.stdout


@pytest.mark.skipif(os.environ.get("ASTAIRE_PGO") == "0", reason="ASTAIRE_PGO=0: a plain build was asked for")
def test_a_gcc_build_is_profile_guided():
    _need_gcc()
    assert codec.BUILD == "profile-guided"


def test_version_names_the_codec_build():
    run = subprocess.run([sys.executable, "-m", "astaire.cli", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"(codec: cython, {codec.BUILD} build)" in run.stdout


def test_a_rebuild_with_nothing_changed_is_still_profile_guided(tmp_path):
    """A second build in the same tree, every module up to date (as after a plain build, or
    an edit of one unit only), must still instrument and train every unit: a unit skipped as
    up to date stays uninstrumented, writes no profile, and the whole build falls back to plain."""
    _need_gcc()
    tree = tmp_path / "tree"
    skip = shutil.ignore_patterns("*.so", "*.c", "__pycache__", "build", "*.egg-info")
    for name in ("astaire", "bench", "throttle"):
        shutil.copytree(os.path.join(ROOT, name), tree / name, ignore=skip)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), tree / name)

    def build(pgo: str) -> str:
        env = dict(os.environ, ASTAIRE_PGO=pgo)
        run = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        return run.stdout + run.stderr

    build("0")  # both modules built, plain, and up to date
    out = build("1")
    assert "codec built with a profile" in out, out[-2000:]
    check = subprocess.run([sys.executable, "-c", "import astaire.codec as c; print(c.IMPLEMENTATION, c.BUILD)"],
                           cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True,
                           timeout=60)
    assert check.stdout.split() == ["cython", "profile-guided"], check.stdout + check.stderr
