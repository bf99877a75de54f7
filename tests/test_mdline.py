"""The compiled Writer's metadump scanners (``astaire/_mdline.h``: a key's runs sixteen bytes
at a time, exp's digits eight at a time) against the byte-at-a-time loops they replaced, in
C, on random keys and digit strings (``tests/data/mdline_check.c``); once as built for this
machine (SSE2 on x86-64) and once with the vector path compiled out, as on a machine without
it. Whole lines through both builds of the Writer are in test_writer.py and the fuzz."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CC = shutil.which("cc") or shutil.which("gcc")


@pytest.mark.skipif(CC is None, reason="no C compiler (the compiled codec needs one too)")
@pytest.mark.parametrize("flags", [[], ["-U__SSE2__"]], ids=["as-built", "scalar"])
def test_scanners_match_the_byte_loops(tmp_path, flags):
    exe = tmp_path / "mdline_check"
    subprocess.run([CC, "-O2", "-Wall", "-Werror", *flags, "-I", str(ROOT / "astaire"),
                    str(ROOT / "tests" / "data" / "mdline_check.c"), "-o", str(exe)], check=True)
    r = subprocess.run([str(exe), "2000000", "400000"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.endswith(": 0 differences\n"), r.stdout
