"""Ids per second from Python, in interleaved slices of one run (scripts/bench-clients.sh).

    python bench_clients.py SEQUENCE RING_DIR SOCKET [--slices N] [--ms MS]

Measures the unid package's next() (from the agent's ring), take(1000) and take_range(1000),
the agent's socket protocol spoken from Python (`NEXT seq 1` on one kept connection), and
uuid.uuid4() / uuid.uuid1() as references. Each slice runs one operation for MS milliseconds;
the slices of all operations alternate, and the median slice of each is reported, with
next() ÷ each reference. Prints one `name ids_per_s` line per slice to stderr and a summary
to stdout.
"""

import argparse
import socket
import statistics
import sys
import time
import uuid

import unid


def rate(fn, ids_per_call, ms):
    """Calls fn in batches of 100 for ms milliseconds; ids per second."""
    end = time.perf_counter() + ms / 1000
    calls = 0
    t0 = time.perf_counter()
    while True:
        for _ in range(100):
            fn()
        calls += 100
        t = time.perf_counter()
        if t >= end:
            return calls * ids_per_call / (t - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("sequence")
    p.add_argument("ring_dir")
    p.add_argument("socket")
    p.add_argument("--slices", type=int, default=15)
    p.add_argument("--ms", type=int, default=200)
    a = p.parse_args()

    h = unid.open(a.sequence, ring_dir=a.ring_dir, socket=a.socket)
    assert h.via_ring, "the handle did not map the ring"
    host, port = a.socket.rsplit(":", 1)
    conn = socket.create_connection((host, int(port)))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = conn.makefile("rb")
    request = f"NEXT {a.sequence} 1\n".encode()

    def socket_next():
        conn.sendall(request)
        head = reader.readline()
        assert head.startswith(b"OK 1 "), head
        return int(reader.readline())

    def take_range():
        first, count = h.take_range(1000)
        return first, count

    ops = [
        ("unid next()", h.next, 1),
        ("uuid.uuid4()", uuid.uuid4, 1),
        ("uuid.uuid1()", uuid.uuid1, 1),
        ("socket NEXT 1 from Python", socket_next, 1),
        ("unid take(1000)", lambda: h.take(1000), 1000),
    ]
    # take_range returns up to 1000 ids (a block boundary gives fewer): count them.
    got = [0]

    def take_range_counted():
        got[0] += h.take_range(1000)[1]

    rates = {name: [] for name, _, _ in ops}
    rates["unid take_range(1000)"] = []
    for name, fn, n in ops:  # warm-up
        rate(fn, n, 20)
    for _ in range(a.slices):
        for name, fn, n in ops:
            r = rate(fn, n, a.ms)
            rates[name].append(r)
            print(f"{name}\t{r:.0f}", file=sys.stderr)
        got[0] = 0
        t0 = time.perf_counter()
        rate(take_range_counted, 0, a.ms)
        r = got[0] / (time.perf_counter() - t0)
        rates["unid take_range(1000)"].append(r)
        print(f"unid take_range(1000)\t{r:.0f}", file=sys.stderr)

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"python {sys.version.split()[0]}, {a.slices} slices x {a.ms} ms per operation, interleaved")
    print("| operation | ids/s (median slice) | min – max slice |")
    print("|---|---:|---:|")
    for k, v in rates.items():
        print(f"| {k} | {med[k]:,.0f} | {min(v):,.0f} – {max(v):,.0f} |")
    n = med["unid next()"]
    for ref in ("uuid.uuid4()", "uuid.uuid1()", "socket NEXT 1 from Python"):
        print(f"ratio: unid next() / {ref} = {n / med[ref]:.2f}")
    ok = n >= 3 * med["uuid.uuid4()"]
    print(f"target: unid next() >= 3x uuid.uuid4(): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
