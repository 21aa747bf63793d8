"""The `unid` Python package against a real `unid server` and agents (see conftest.py)."""

import multiprocessing
import os
import select
import signal
import tempfile
import threading
import time

import pytest

import unid

from conftest import free_port


def assert_increasing(ids, what):
    for a, b in zip(ids, ids[1:]):
        assert a < b, f"{what}: {a} then {b}"


def assert_unique(lists):
    seen = set()
    total = 0
    for ids in lists:
        seen.update(ids)
        total += len(ids)
    assert len(seen) == total, f"{total - len(seen)} ids repeated"


def take_ids(h, n):
    """n ids from handle h through next(), take() and take_range(), in the order returned."""
    out = []
    while len(out) < n:
        out.append(h.next())
        out.extend(h.take(7))
        first, count = h.take_range(5)
        out.extend(range(first, first + count))
    return out


def retry(f, timeout=20):
    """f() until it stops raising NotReady / AgentNotRunning (an agent restarting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return f()
        except (unid.NotReady, unid.AgentNotRunning):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- basics -----------------------------------------------------------------


def test_next_take_take_range_from_the_ring(agents):
    a = agents("basic", ["py"])
    a.wait_ring("py")
    with unid.open("py", ring_dir=a.ring_dir, socket=a.socket) as h:
        assert h.via_ring and h.width == 8 and h.sequence == "py"
        i = h.next()
        assert isinstance(i, int) and i >= 1
        batch = h.take(1000)
        assert len(batch) == 1000 and batch[0] > i
        assert_increasing(batch, "take(1000)")
        first, count = h.take_range(10_000)
        assert 1 <= count <= 10_000 and first > batch[-1]
        assert h.stats() == {"switches": 0, "ids_skipped": 0}
        assert not h.paired and not h.on_backup
        assert "ring" in repr(h)
    assert h.closed
    with pytest.raises(ValueError, match="closed"):
        h.next()


def test_socket_fallback_without_a_ring(agents):
    a = agents("sock", ["py"])
    empty = tempfile.mkdtemp(prefix="unid-py-empty-")
    h = unid.open("py", ring_dir=empty, socket=a.socket)
    assert not h.via_ring
    ids = take_ids(h, 200)
    assert_increasing(ids, "socket")
    assert h.width == 8


def test_16_byte_ids_are_python_ints(agents):
    a = agents("wide", ["pywide"])
    a.wait_ring("pywide")
    h = unid.open("pywide", ring_dir=a.ring_dir, socket=a.socket)
    i = h.next()
    assert isinstance(i, int) and i >= 2**100 and h.width == 16
    ids = h.take(300)
    assert all(x > 2**100 for x in ids)
    assert_increasing([i, *ids], "16-byte ids")
    first, _ = h.take_range(3)
    assert first > ids[-1]


# --- errors -----------------------------------------------------------------


def test_error_types_and_messages(agents):
    for cls in (
        unid.AgentNotRunning, unid.UnknownSequence, unid.Exhausted, unid.NotReady,
        unid.PermissionDenied, unid.Insecure, unid.Corrupt, unid.InvalidName, unid.BadCount,
        unid.TooWide,
        unid.RingError, unid.ProtocolError, unid.SocketError,
    ):
        assert issubclass(cls, unid.Error) and issubclass(cls, Exception)
    empty = tempfile.mkdtemp(prefix="unid-py-empty-")
    nobody = f"127.0.0.1:{free_port()}"
    with pytest.raises(unid.AgentNotRunning, match="unid agent --server ADDR --sequence py"):
        unid.open("py", ring_dir=empty, socket=nobody)
    with pytest.raises(unid.AgentNotRunning):
        unid.open("py", ring_dir=empty, socket=nobody, socket_fallback=False)
    with pytest.raises(unid.InvalidName, match="invalid sequence name"):
        unid.open("no spaces", ring_dir=empty, socket=nobody)
    with pytest.raises(ValueError, match="HOST:PORT"):
        unid.open("py", socket="not an address")

    a = agents("errors", ["py"])
    a.wait_ring("py")
    h = unid.open("py", ring_dir=a.ring_dir, socket=a.socket)
    with pytest.raises(unid.BadCount, match="cannot take 0 ids"):
        h.take(0)
    with pytest.raises(unid.BadCount):
        h.take(unid.TAKE_IDS_MAX + 1)
    with pytest.raises(unid.BadCount):
        h.take_range(0)
    # The agent runs but does not serve this sequence: its socket says so.
    other = unid.open("notserved", ring_dir=a.ring_dir, socket=a.socket)
    with pytest.raises(unid.UnknownSequence, match="unid sequence create notserved"):
        other.next()


def test_exhausting_a_2_byte_sequence_raises_exhausted(agents):
    a = agents("short", ["pyshort"])
    a.wait_ring("pyshort")
    h = unid.open("pyshort", ring_dir=a.ring_dir, socket=a.socket, wait=0.5)
    ids = []
    deadline = time.monotonic() + 60
    with pytest.raises(unid.Exhausted, match="exhausted") as e:
        while time.monotonic() < deadline:
            try:
                ids.extend(h.take(50))
            except unid.NotReady:
                time.sleep(0.05)
    assert "pyshort" in str(e.value)
    assert isinstance(e.value, unid.Error)
    assert ids and ids[0] >= 65_000 and ids[-1] <= 65_534  # 0xFFFF is reserved
    assert_increasing(ids, "2-byte sequence")
    # Final: asking again says the same.
    with pytest.raises(unid.Exhausted):
        h.next()

    # Each call now waits `wait` (0.5 s) on the empty ring before the agent says why; the GIL
    # is released meanwhile, so this thread keeps running Python.
    def spin(seconds):
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            n += 1
        return n

    alone = spin(0.2) / 0.2  # ticks per second with nothing else running
    errors = []
    waiter = threading.Thread(target=lambda: errors.append(pytest.raises(unid.Exhausted, h.next)))
    t0 = time.monotonic()
    waiter.start()
    ticks = 0
    while waiter.is_alive():
        ticks += 1
        time.monotonic()
    elapsed = time.monotonic() - t0
    waiter.join()
    assert len(errors) == 1 and elapsed >= 0.4, (errors, elapsed)
    assert ticks >= 0.2 * alone * elapsed, f"{ticks} ticks in {elapsed:.2f} s, {alone:.0f}/s alone"


# --- processes and threads --------------------------------------------------


def _worker(ring_dir, sock, n, q):
    """One process: one handle shared by 2 threads, each taking n ids."""
    h = unid.open("py", ring_dir=ring_dir, socket=sock)
    got = [None, None]

    def run(k):
        got[k] = take_ids(h, n)

    ts = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    q.put((os.getpid(), got, h.via_ring))


def test_4_processes_x_2_threads_unique_and_increasing(agents):
    a = agents("procs", ["py"])
    a.wait_ring("py")
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(str(a.ring_dir), a.socket, 20_000, q)) for _ in range(4)]
    for p in ps:
        p.start()
    results = [q.get(timeout=120) for _ in ps]
    for p in ps:
        p.join(30)
        assert p.exitcode == 0
    lists = []
    for _, got, via_ring in results:
        assert via_ring
        for k, ids in enumerate(got):
            assert len(ids) >= 20_000
            assert_increasing(ids, f"thread {k}")
            lists.append(ids)
    assert_unique(lists)


# --- fork -------------------------------------------------------------------

# The handle the fork workers inherit (set in the parent before the pool forks).
_inherited = None


def _fork_take(n):
    ids = take_ids(_inherited, n)
    return os.getpid(), ids, _inherited.via_ring


@pytest.mark.parametrize("mode", ["ring", "socket"])
def test_fork_workers_never_repeat_the_parents_ids(agents, mode):
    global _inherited
    a = agents(f"fork-{mode}", ["pyfork"])
    a.wait_ring("pyfork")
    ring_dir = a.ring_dir if mode == "ring" else tempfile.mkdtemp(prefix="unid-py-empty-")
    _inherited = unid.open("pyfork", ring_dir=ring_dir, socket=a.socket)
    assert _inherited.via_ring == (mode == "ring")
    # The parent has used its handle (in socket mode: its connection is open) before forking.
    parent_before = take_ids(_inherited, 100)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        pending = pool.map_async(_fork_take, [2_000] * 8)
        # The parent keeps taking while the workers run.
        parent_during = take_ids(_inherited, 2_000)
        results = pending.get(timeout=120)
    parent_after = take_ids(_inherited, 100)
    parent = parent_before + parent_during + parent_after
    assert_increasing(parent, "parent")
    lists = [parent]
    for pid, ids, via_ring in results:
        assert pid != os.getpid()
        assert via_ring == (mode == "ring")
        assert_increasing(ids, f"worker {pid}")
        lists.append(ids)
    assert_unique(lists)
    _inherited = None


def test_fork_while_another_thread_takes_ids(agents):
    """os.fork() in the middle of other threads' calls: the child's handle works at once."""
    a = agents("forkthreads", ["pyfork"])
    a.wait_ring("pyfork")
    h = unid.open("pyfork", ring_dir=a.ring_dir, socket=a.socket)
    stop = threading.Event()
    taken = [[], []]

    def spin(k):
        while not stop.is_set():
            taken[k].extend(take_ids(h, 50))

    ts = [threading.Thread(target=spin, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    children = []
    try:
        for _ in range(5):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: only this thread exists here
                try:
                    os.close(r)
                    ids = take_ids(h, 500)
                    os.write(w, " ".join(map(str, ids)).encode())
                    os._exit(0)
                except BaseException:
                    os._exit(1)
            os.close(w)
            children.append((pid, r))
            time.sleep(0.02)
    finally:
        stop.set()
        for t in ts:
            t.join()
    lists = [taken[0], taken[1]]
    deadline = time.monotonic() + 60
    hung = []
    for pid, r in children:
        data = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], 0.1)
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                data += chunk
        else:
            hung.append(pid)
        os.close(r)
        if pid in hung:
            os.kill(pid, signal.SIGKILL)
        res = os.waitpid(pid, 0)
        assert not hung, f"fork children {hung} hung (a handle locked by a thread gone in the child?)"
        assert os.waitstatus_to_exitcode(res[1]) == 0
        ids = [int(x) for x in data.split()]
        assert len(ids) >= 500
        assert_increasing(ids, f"child {pid}")
        lists.append(ids)
    for k in range(2):
        assert_increasing(taken[k], f"parent thread {k}")
    assert_unique(lists)


# --- agent failures ---------------------------------------------------------


def test_agent_killed_and_restarted(agents):
    a = agents("restart", ["pyrestart"])
    a.wait_ring("pyrestart")
    h = unid.open("pyrestart", ring_dir=a.ring_dir, socket=a.socket)
    ids = take_ids(h, 2_000)
    a.kill9()
    # What the dead agent's ring still holds, then AgentNotRunning (nothing on the socket).
    with pytest.raises(unid.AgentNotRunning):
        for _ in range(10_000_000):
            ids.append(h.next())
    a.restart()
    ids.extend(retry(lambda: take_ids(h, 2_000)))
    assert h.via_ring
    assert_increasing(ids, "across the restart")
    assert_unique([ids])
    # Another handle opened now gets only new ids too.
    h2 = unid.open("pyrestart", ring_dir=a.ring_dir, socket=a.socket)
    assert_unique([ids, take_ids(h2, 1_000)])


def test_backup_agent_switch(agents):
    link = f"127.0.0.1:{free_port()}"
    primary = agents("primary", ["pypair"], ["--peer-listen", link])
    backup = agents("backup", ["pypair"], ["--backup-of", link])
    primary.wait_ring("pypair")
    backup.wait_ring("pypair")
    # The pair file names the backup's ring folder; wait until the primary wrote it.
    deadline = time.monotonic() + 20
    while not (primary.ring_dir / ".unid-pair").exists():
        assert time.monotonic() < deadline, primary.log_text()
        time.sleep(0.02)
    h = unid.open("pypair", ring_dir=primary.ring_dir, socket=primary.socket)
    assert h.paired and not h.on_backup
    ids = take_ids(h, 5_000)
    primary.kill9()
    ids.extend(retry(lambda: take_ids(h, 20_000)))
    assert h.on_backup
    assert h.stats()["switches"] >= 1
    assert_increasing(ids, "across the switch")
    assert_unique([ids])
