"""Drill 6 (issue 8): bad input ends in a clear error, with nothing lost and the daemon alive.

- cluster_settings holding binary garbage, a huge line, or 10,000 servers: at start, exit 3
  with a short message naming the file; on reload, logged, the old view kept, the daemon
  alive and its data intact;
- garbage in the node config;
- a source whose ``lru_crawler metadump`` line is over the limit (a fake text server): that
  source fails readably, the other replica serves;
- a corrupted statistics file: ``status`` and ``wait-sync`` give a clear error, no traceback.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading

import pytest

from astaire.cluster.view import ClusterView
from astaire.demo.run import CLI
from tests.daemon_helpers import REPO, astaire, wait_for
from tests.drills import Model, load, settle, status

RNG = random.Random(8)
BAD_SETTINGS = {
    "binary-garbage": lambda: bytes(RNG.randrange(256) for _ in range(4096)),
    "huge-line": lambda: b"servers=127.0.0.1:11211," + b"x" * (8 << 20) + b"\n",
    "10000-servers": lambda: ("servers=" + ",".join(f"127.0.{i // 250}.{i % 250 + 1}:11211"
                                                    for i in range(10000)) + "\n").encode(),
}


def scale_up(nodes, daemons, count=3000, start=True, **kw):
    a, b, n = nodes(3, "stock")
    before = ClusterView([a.name, b.name])
    after = ClusterView(before.servers, [a.name, b.name, n.name])
    model = Model()
    load(model, before, count, table="bad")
    d = daemons(n.name, before.servers, after.new_servers, start=start,
                **{"workers": 2, "tag_interval": 1, "source": "crawler", **kw})
    return a, b, n, before, after, model, d


def run_briefly(args: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess:
    """``astaire ARGS`` that must exit by itself: still running after ``timeout`` s, it and its
    workers are killed and the returncode is None."""
    proc = subprocess.Popen([*CLI, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = None
    return subprocess.CompletedProcess(args, code, out.decode(errors="replace"), err.decode(errors="replace"))


def assert_clear(r, *must_mention: str, code: int | None = None) -> None:
    if code is not None:
        assert r.returncode is not None, f"still running after its timeout, expected exit {code}"
    text = r.stderr + r.stdout
    assert "Traceback" not in text, text[-3000:]
    assert len(text) < 4000, f"the message is not short: {len(text)} characters: {text[:300]!r}...{text[-300:]!r}"
    for word in must_mention:
        assert word in text, text
    if code is not None:
        assert r.returncode == code, (r.returncode, text[-1000:])


@pytest.mark.parametrize("what", list(BAD_SETTINGS))
def test_bad_cluster_settings_at_start_exit_3_with_a_clear_message(what, nodes, daemons):
    (n,) = nodes(1, "stock")
    d = daemons(n.name, [n.name], start=False)
    d.settings.write_bytes(BAD_SETTINGS[what]())
    r = run_briefly(d.args())
    assert_clear(r, str(d.settings), code=3)
    assert not d.pidfile.exists()


@pytest.mark.slow
def test_bad_cluster_settings_on_reload_keep_the_old_view_and_the_daemon(nodes, daemons, drill):
    a, b, n, before, after, model, d = scale_up(nodes, daemons)
    problems: list[str] = []
    settle(d, n.name, problems)
    good = d.settings.read_bytes()
    digest = d.snapshot()["settings_digest"]
    refused = 0
    for what, make in BAD_SETTINGS.items():
        size = len(d.log())
        d.settings.write_bytes(make())
        r = astaire("reload", "--pidfile", str(d.pidfile), timeout=30)
        assert r.returncode == 0, r.stderr
        try:
            wait_for(lambda: d.log().count("keeping the current view") > refused or d.proc.poll() is not None, 10,
                     what=f"the {what} settings logged")
        except AssertionError:
            problems.append(f"{what}: taken in on reload (never logged as invalid, view not kept)")
            continue
        refused += 1
        assert d.proc.poll() is None, f"the daemon died on {what}: {d.output()[-2000:]}"
        grew = len(d.log()) - size
        if grew > 64 * 1024:
            problems.append(f"{what}: the log grew by {grew} characters (the whole input echoed?)")
        s = d.snapshot()
        assert s["settings_digest"] == digest and s["state"] == "idle", (what, s["state"])
        st = status(d)  # no traceback, whatever the settings file holds
        assert st["state"] == "idle", st
        w = astaire("wait-sync", "--pidfile", str(d.pidfile), "--timeout-without-progress", "1", timeout=30)
        text = w.stderr + w.stdout
        if "Traceback" in text or len(text) > 4000:
            problems.append(f"{what}: wait-sync's answer is not a short clear message ({len(text)} characters)")
        if w.returncode == 0:
            problems.append(f"{what}: wait-sync said in sync with that in the settings file")
    d.settings.write_bytes(good)
    assert astaire("reload", "--pidfile", str(d.pidfile), timeout=30).returncode == 0
    settle(d, n.name, problems)
    assert d.snapshot()["pid"] == d.pid
    result = drill.check(model, after)
    assert result.ok, result.summary()
    assert not problems, problems


GARBAGE_CONFIG = (b"\x00\xff\xfe garbage \x01\x02\n" + b"local_ip=$(rm -rf /)\n" + b"log_level=banana\n"
                  + b"astaire_cpu_limit_percentage=-7\n" + b"'unterminated=\"quote\n" + b"y" * (2 << 20) + b"\n"
                  + bytes(RNG.randrange(256) for _ in range(4096)))


def test_garbage_node_config_with_a_local_name_runs_and_resyncs(nodes, daemons, drill):
    a, b, n, before, after, model, d = scale_up(nodes, daemons, start=False)
    (d.dir / "no-node-config").write_bytes(GARBAGE_CONFIG)
    d.start()
    problems: list[str] = []
    settle(d, n.name, problems)
    assert "Traceback" not in d.output()
    result = drill.check(model, after)
    assert result.ok, result.summary()
    assert not problems, problems


def test_garbage_node_config_without_a_local_name_is_a_clear_error(tmp_path):
    """local_ip is garbage: either a refusal at start (exit 2 naming local_ip) or a daemon that
    runs and says the local node is in neither server list (event 7009). Either way the output
    is short: the garbage is not echoed back in full."""
    cfg = tmp_path / "config"
    cfg.write_bytes(GARBAGE_CONFIG)
    (tmp_path / "cs").write_text("servers=127.0.0.1:11211\n")
    r = run_briefly(["run", "--config", str(cfg), "--cluster-settings-file", str(tmp_path / "cs"),
                     "--pidfile", str(tmp_path / "a.pid"), "--log-file", str(tmp_path / "log")], timeout=10)
    if r.returncode is None:
        log = (tmp_path / "log" / "astaire_current.log").read_text(errors="replace")
        problems = []
        if "event 7009" not in log:
            problems.append("the daemon runs with a garbage local_ip and does not say the local node is in "
                            "neither server list (no event 7009 within 10 s)")
        if len(r.stderr) > 4000:
            problems.append(f"{len(r.stderr)} characters on stderr: the garbage is echoed back")
        assert not problems, problems
    else:
        assert_clear(r, "local_ip", code=2)


class FakeCrawler:
    """A fake stock memcached whose ``lru_crawler metadump`` sends ``listing`` (by default a key
    line longer than the limit) and, with ``close``, then closes that connection: binary and
    text VERSION answered (1.6.18), text ``stats`` says no crawl runs, then the listing. With
    ``refuse_hash`` it answers ``metadump hash`` as a memcached without the hash walk does.
    ``commands``: the metadump command lines it heard."""

    def __init__(self, listing: bytes = b"key=" + b"k" * (1 << 20), close: bool = False,
                 refuse_hash: bool = False):
        self.listing = listing
        self.close = close
        self.refuse_hash = refuse_hash
        self.commands: list[bytes] = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.name = f"127.0.0.1:{self.port}"
        self.stopping = threading.Event()
        self.metadumps = 0
        self.threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        try:
            while not self.stopping.is_set():
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    return
                buf += data
                while buf:
                    if buf[0] == 0x80:  # binary
                        if len(buf) < 24:
                            break
                        opcode = buf[1]
                        bodylen, opaque = struct.unpack(">II", buf[8:16])
                        if len(buf) < 24 + bodylen:
                            break
                        buf = buf[24 + bodylen:]
                        value = b"1.6.18" if opcode == 0x0B else b""
                        status = 0 if opcode in (0x0B, 0x0A) else 0x81
                        conn.sendall(struct.pack(">BBHBBHIIQ", 0x81, opcode, 0, 0, 0, status, len(value), opaque, 0)
                                     + value)
                        continue
                    if b"\n" not in buf:
                        break
                    line, buf = buf.split(b"\n", 1)
                    if line.startswith(b"version"):
                        conn.sendall(b"VERSION 1.6.18\r\n")
                    elif line.rstrip(b"\r") == b"mn":  # the meta no-op, as stock memcached answers it
                        conn.sendall(b"MN\r\n")
                    elif line.startswith(b"stats"):
                        conn.sendall(b"STAT pid 1\r\nSTAT lru_crawler_running 0\r\nEND\r\n")
                    elif line.startswith(b"lru_crawler metadump"):
                        self.commands.append(line.rstrip(b"\r"))
                        if self.refuse_hash and line.rstrip(b"\r") == b"lru_crawler metadump hash":
                            conn.sendall(b"BADCLASS invalid class id\r\n")
                            continue
                        self.metadumps += 1
                        conn.sendall(self.listing)
                        if self.close:
                            return
                    else:
                        conn.sendall(b"ERROR\r\n")
        except OSError:
            return
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        for t in self.threads:
            t.join(2)


def test_a_metadump_line_over_the_limit_fails_that_source_only(nodes, daemons, drill):
    fake = FakeCrawler()
    try:
        (b, n) = nodes(2, "stock")
        before = ClusterView([fake.name, b.name])
        after = ClusterView(before.servers, [fake.name, b.name, n.name])
        model = Model()
        # Only b really holds the records (the fake serves its long line instead).
        load(model, ClusterView([b.name]), 3000, table="long")
        # (--worker-timeout bounds the drill if a worker hangs on the line instead of refusing it)
        d = daemons(n.name, before.servers, after.new_servers, workers=2, tag_interval=1, source="crawler",
                    extra=("--worker-timeout", "5"))
        problems: list[str] = []
        st = settle(d, n.name, problems)
        assert fake.metadumps >= 1, "the fake source was never streamed"
        assert d.proc.poll() is None
        log = d.log()
        if "too long" not in log:
            problems.append("the log never says the metadump line was too long")
        if "silent" in log:
            problems.append("a worker hung (went silent) on the long line instead of refusing it: "
                            + next(line for line in log.splitlines() if "silent" in line)[-200:])
        if st is not None and st["last_resync"]["result"] != "ok":
            problems.append(f"b could serve every vbucket, yet {st['last_resync']}")
        drill.extra["resync_s"] = round(d.snapshot()["last_resync"]["seconds"], 1)
        result = drill.check(model, after, nodes={b.name, n.name})
        assert result.ok, result.summary()
        assert not problems, problems
    finally:
        fake.stop()


def _corruptions(data: bytes) -> dict[str, bytes]:
    rng = random.Random(3)
    flipped = bytearray(data)
    for i in range(24, len(flipped), 7):  # the body, header intact: counts and offsets nonsense
        flipped[i] = rng.randrange(256)
    big_counts = bytearray(data)
    big_counts[24:24 + 64] = b"\xff" * 64
    return {
        "empty": b"",
        "truncated": data[:20],
        "half": data[: len(data) // 2],
        "random": bytes(rng.randrange(256) for _ in range(len(data))),
        "bad-magic": b"NOTSTATS" + data[8:],
        "body-flipped": bytes(flipped),
        "counts-all-ones": bytes(big_counts),
    }


def test_a_corrupted_stats_file_gives_a_clear_error_never_a_traceback(nodes, daemons, drill, tmp_path):
    a, b, n, before, after, model, d = scale_up(nodes, daemons)
    problems: list[str] = []
    settle(d, n.name, problems)
    data = d.stats_file.read_bytes()
    bad = tmp_path / "corrupt.stats"
    failures = []
    for what, content in _corruptions(data).items():
        bad.write_bytes(content)
        for args in (["status", "--json"], ["status"],
                     ["wait-sync", "--timeout-without-progress", "1", "--poll-interval", "0.1"]):
            r = astaire(*args, "--pidfile", str(d.pidfile), "--stats-file", str(bad), timeout=60)
            text = r.stderr + r.stdout
            if "Traceback" in text or len(text) > 4000:
                failures.append(f"{what}: {' '.join(args)} -> {text[-800:]}")
            elif args[0] == "wait-sync" and r.returncode == 0:
                failures.append(f"{what}: wait-sync exited 0 on a corrupted statistics file")
            elif args[0] == "wait-sync" and not r.stderr.strip():
                failures.append(f"{what}: wait-sync failed without saying why")
    assert d.proc.poll() is None
    assert status(d)["state"] == "idle"  # the real file still reads
    shutil.copy(d.stats_file, tmp_path / "copy.stats")
    result = drill.check(model, after)
    assert result.ok, result.summary()
    assert not failures, failures
    assert not problems, problems
    os.kill(d.pid, signal.SIGTERM)
    assert d.proc.wait(30) == 0
