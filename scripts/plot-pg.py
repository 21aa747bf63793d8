#!/usr/bin/env python3
"""Plots results/postgres.tsv (written by scripts/bench-pg.sh) as a plain SVG of grouped bars.

    python3 scripts/plot-pg.py results/postgres.tsv results/postgres.svg
"""

import sys
from collections import OrderedDict

NAMES = {
    "t_unid": "unid_next()",
    "t_identity": "IDENTITY",
    "t_uuid4": "gen_random_uuid()",
    "t_uuid7": "uuidv7()",
    "sel_unid": "SELECT unid_next()",
    "sel_nextval": "SELECT nextval()",
    "unid_next": "unid_next()",
    "nextval": "nextval()",
    "gen_random_uuid": "gen_random_uuid()",
    "uuidv7": "uuidv7()",
    "series_only": "(none)",
    "unid_take": "unid_take(1M)",
}
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def read(path):
    rows = []
    with open(path) as f:
        for line in f:
            kind, test, clients, value, unit, _load = line.rstrip("\n").split("\t")
            rows.append((kind, test, int(clients), float(value), unit))
    return rows


def panel(out, x0, y0, w, h, title, groups, unit):
    """groups: OrderedDict group label -> OrderedDict series label -> value."""
    series = list(OrderedDict.fromkeys(s for g in groups.values() for s in g))
    vmax = max((v for g in groups.values() for v in g.values()), default=1) or 1
    out.append(f'<text x="{x0 + w / 2}" y="{y0 + 16}" text-anchor="middle" font-weight="bold">{title}</text>')
    top, bottom = y0 + 30, y0 + h - 40
    out.append(f'<line x1="{x0 + 40}" y1="{bottom}" x2="{x0 + w}" y2="{bottom}" stroke="black"/>')
    gw = (w - 50) / max(len(groups), 1)
    bw = gw * 0.8 / max(len(series), 1)
    for gi, (glabel, vals) in enumerate(groups.items()):
        gx = x0 + 45 + gi * gw
        for si, s in enumerate(series):
            if s not in vals:
                continue
            v = vals[s]
            bh = (bottom - top) * v / vmax
            bx = gx + gw * 0.1 + si * bw
            out.append(
                f'<rect x="{bx:.1f}" y="{bottom - bh:.1f}" width="{bw - 2:.1f}" height="{bh:.1f}" fill="{COLORS[si % len(COLORS)]}"/>'
            )
            label = f"{v / 1000:.1f}k" if unit == "tps" else f"{v:.1f}" if v < 100 else f"{v:.0f}"
            out.append(
                f'<text x="{bx + bw / 2:.1f}" y="{bottom - bh - 3:.1f}" text-anchor="middle" font-size="9">{label}</text>'
            )
        out.append(f'<text x="{gx + gw / 2:.1f}" y="{bottom + 14}" text-anchor="middle" font-size="11">{glabel}</text>')
    for si, s in enumerate(series):
        lx = x0 + 50 + si * ((w - 50) / len(series))
        out.append(f'<rect x="{lx:.1f}" y="{bottom + 22}" width="10" height="10" fill="{COLORS[si % len(COLORS)]}"/>')
        out.append(f'<text x="{lx + 13:.1f}" y="{bottom + 31}" font-size="10">{s}</text>')
    out.append(f'<text x="{x0 + 5}" y="{top + 5}" font-size="10">{unit}</text>')


def main():
    rows = read(sys.argv[1])
    ins, sel, idx, tab, at, srv = (OrderedDict() for _ in range(6))
    for kind, test, n, v, unit in rows:
        name = NAMES.get(test, test)
        size = f"{n // 1_000_000}M rows"
        if kind == "insert":
            ins.setdefault(f"{n} client{'s' if n > 1 else ''}", OrderedDict())[name] = v
        elif kind == "select":
            sel.setdefault(f"{n} client{'s' if n > 1 else ''}", OrderedDict())[name] = v
        elif kind == "pkey_bytes":
            idx.setdefault(size, OrderedDict())[name] = v / 2**20
        elif kind == "table_bytes":
            tab.setdefault(size, OrderedDict())[name] = v / 2**20
        elif kind == "server":
            srv.setdefault("1M evaluations, one backend", OrderedDict())[name] = v / 1e6
        elif kind == "insert_at":
            at.setdefault(f"at {size}", OrderedDict())[name] = v
    w, h = 1000, 1130
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>']
    panel(out, 10, 10, 480, 360, "INSERT, empty table (pgbench tps)", ins, "tps")
    panel(out, 510, 10, 480, 360, "INSERT, 8 clients, grown table (tps)", at, "tps")
    panel(out, 10, 390, 320, 360, "SELECT id (pgbench tps)", sel, "tps")
    panel(out, 340, 390, 320, 360, "primary-key index (MiB)", idx, "MiB")
    panel(out, 670, 390, 320, 360, "table (MiB)", tab, "MiB")
    panel(out, 10, 770, 980, 360, "server side: ids (or UUIDs) per second in one backend, millions", srv, "M/s")
    out.append("</svg>")
    with open(sys.argv[2], "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
