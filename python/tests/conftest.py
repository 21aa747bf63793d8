"""A real `unid server` and `unid agent`s as processes on 127.0.0.1 for the tests.

The `unid` binary is `UNID_BIN`, else the root workspace's `target/debug/unid`
(build it with `cargo build -p unid-cli`). Ports come from 18500-18649.
"""

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNID_BIN = os.environ.get("UNID_BIN", str(ROOT / "target" / "debug" / "unid"))
PORT_FIRST, PORT_LAST = 18500, 18649
SERVER_UDP, SERVER_RAFT = 18500, 18501

# Sequences the session's server has: name -> (width bytes, first id).
SEQUENCES = {
    "py": (8, 1),
    "pyfork": (8, 1),
    "pyrestart": (8, 1),
    "pypair": (8, 1),
    "pyshort": (2, 65_000),
    "pywide": (16, 2**100),
}

_next_port = [18510]


def free_port():
    """A port of this suite's range that nothing listens on (TCP and UDP)."""
    while _next_port[0] <= PORT_LAST:
        p = _next_port[0]
        _next_port[0] += 1
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, socket.socket(
                socket.AF_INET, socket.SOCK_DGRAM
            ) as u:
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                t.bind(("127.0.0.1", p))
                u.bind(("127.0.0.1", p))
            return p
        except OSError:
            continue
    raise RuntimeError(f"no free port left in {PORT_FIRST}-{PORT_LAST}")


def run_unid(*args, timeout=30):
    return subprocess.run(
        [UNID_BIN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _die_with_parent():
    """In the child before exec: SIGKILL when the test process dies (no orphans)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Proc:
    """A `unid` subcommand as a process, logging to a file; killed at the end."""

    def __init__(self, args, log):
        self.args = list(args)
        self.log = log
        self.proc = None
        self.start()

    def start(self):
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                [UNID_BIN, *self.args],
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=f,
                env={**os.environ, "RUST_LOG": "info,openraft=warn"},
                preexec_fn=_die_with_parent,
            )

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()

    def log_text(self):
        try:
            return Path(self.log).read_text(errors="replace")[-4000:]
        except OSError:
            return ""


class Agent(Proc):
    """A `unid agent` on its own ring folder (under /dev/shm) and socket."""

    def __init__(self, work, name, sequences, extra=()):
        self.ring_dir = Path(tempfile.mkdtemp(prefix=f"unid-py-{name}-", dir="/dev/shm"))
        shutil.rmtree(self.ring_dir)  # the agent makes it, owned by and private to it
        self.port = free_port()
        self.socket = f"127.0.0.1:{self.port}"
        args = ["agent", "--server", f"127.0.0.1:{SERVER_UDP}", "--name", name]
        args += ["--ring-dir", str(self.ring_dir), "--socket", self.socket]
        args += ["--refill-period-ms", "200"]
        for s in sequences:
            args += ["--sequence", s]
        args += list(extra)
        super().__init__(args, work / f"agent-{name}.log")
        self.wait_socket()

    def wait_socket(self, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agent socket never opened:\n{self.log_text()}")
                time.sleep(0.02)

    def wait_ring(self, sequence, timeout=20):
        path = self.ring_dir / sequence
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"ring {path} never appeared:\n{self.log_text()}")
            time.sleep(0.02)

    def restart(self):
        self.start()
        self.wait_socket()

    def close(self):
        self.kill9()
        shutil.rmtree(self.ring_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def server():
    """One `unid server` (a one-node cluster) with the sequences of SEQUENCES."""
    if not os.access(UNID_BIN, os.X_OK):
        pytest.fail(f"no unid binary at {UNID_BIN}: cargo build -p unid-cli, or set UNID_BIN")
    work = Path(tempfile.mkdtemp(prefix="unid-py-"))
    udp = f"127.0.0.1:{SERVER_UDP}"
    peer = f"1=127.0.0.1:{SERVER_RAFT}={udp}"
    srv = Proc(
        [
            "server", "--id", "1", "--listen", udp, "--raft", f"127.0.0.1:{SERVER_RAFT}",
            "--data-dir", str(work / "data"), "--peer", peer, "--init",
        ],
        work / "server.log",
    )
    try:
        for name, (width, start) in SEQUENCES.items():
            deadline = time.monotonic() + 30
            while True:
                r = run_unid(
                    "sequence", "create", name, "--width", str(width), "--start", str(start),
                    "--server", udp,
                )
                if r.returncode == 0:
                    break
                if srv.proc.poll() is not None:
                    raise RuntimeError(f"unid server exited:\n{srv.log_text()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sequence create {name}: {r.stderr}\n{srv.log_text()}")
                time.sleep(0.2)
        yield work
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def agents(server):
    """Starts agents for one test: `agents("name", ["seq"], extra_args)`; all killed after."""
    started = []

    def start(name, sequences, extra=()):
        a = Agent(server, name, sequences, extra)
        started.append(a)
        return a

    yield start
    for a in started:
        a.close()
