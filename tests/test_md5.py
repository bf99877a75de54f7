"""The compiled codec's sixteen-lane MD5 (``astaire/_md5.h``, the listing's vbucket hash): every
variant this CPU can run (generic; AVX2; AVX-512VL) against the one-key function, in C
(``tests/data/md5_check.c``). test_codec.py holds the one-key function and the dispatched lanes,
through the Writer, to hashlib."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CC = shutil.which("cc") or shutil.which("gcc")


@pytest.mark.skipif(CC is None, reason="no C compiler (the compiled codec needs one too)")
def test_every_lane_variant_matches_the_one_key_md5(tmp_path):
    exe = tmp_path / "md5_check"
    subprocess.run([CC, "-O2", "-Wall", "-Werror", "-I", str(ROOT / "astaire"),
                    str(ROOT / "tests" / "data" / "md5_check.c"), "-o", str(exe)], check=True)
    r = subprocess.run([str(exe), "200000"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.endswith(": 0 differences\n"), r.stdout
    assert r.stdout.startswith("variants: generic"), r.stdout
