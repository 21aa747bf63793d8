//! Hand-written SVG plots beside the report: latency over time (the largest block-grant
//! latency and the largest `next()` wait per time bucket, log scale) and throughput over time
//! (grants/s and ids taken by the consumers/s), with each fault's start (red) and heal (grey)
//! marked.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

use crate::report::Summary;
use crate::series::Series;

const W: f64 = 1000.0;
const PANEL_H: f64 = 220.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;

struct Line<'a> {
    label: &'a str,
    color: &'a str,
    /// (t in s, value).
    points: Vec<(f64, f64)>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One panel: `lines` against time `0..=t_max_s`, a log or linear y axis.
#[allow(clippy::too_many_arguments)]
fn panel(
    o: &mut String,
    y0: f64,
    title: &str,
    y_label: &str,
    lines: &[Line<'_>],
    log: bool,
    t_max_s: f64,
    marks: &[(f64, f64, String)],
) {
    let (x0, x1) = (LEFT, W - RIGHT);
    let (top, bottom) = (y0 + TOP, y0 + PANEL_H - BOTTOM);
    let vals = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
    let vmax = vals.clone().fold(0.0f64, f64::max).max(1e-9);
    let vmin_pos = vals.filter(|v| *v > 0.0).fold(f64::MAX, f64::min);
    let (lo, hi) = if log {
        let lo = (vmin_pos.min(vmax)).log10().floor().min(-2.0);
        (lo, vmax.log10().ceil().max(lo + 1.0))
    } else {
        (0.0, vmax * 1.1)
    };
    let ty = |v: f64| {
        let v = if log {
            v.max(10f64.powf(lo)).log10()
        } else {
            v
        };
        bottom - (v - lo) / (hi - lo) * (bottom - top)
    };
    let tx = |t: f64| x0 + t / t_max_s.max(1e-9) * (x1 - x0);
    let _ = writeln!(
        o,
        r#"<text x="{x0}" y="{}" font-size="14" font-weight="bold">{}</text>"#,
        y0 + 18.0,
        escape(title)
    );
    let _ = writeln!(
        o,
        r##"<rect x="{x0}" y="{top}" width="{}" height="{}" fill="none" stroke="#888"/>"##,
        x1 - x0,
        bottom - top
    );
    // Y ticks.
    let ticks: Vec<f64> = if log {
        (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        (0..=4).map(|i| hi * i as f64 / 4.0).collect()
    };
    for v in ticks {
        let y = ty(v);
        let label = if v >= 1000.0 {
            format!("{:.0}k", v / 1000.0)
        } else if v >= 1.0 {
            format!("{v:.0}")
        } else {
            format!("{v}")
        };
        let _ = writeln!(
            o,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" font-size="10" text-anchor="end">{label}</text>"##,
            x0 - 4.0,
            y + 3.0
        );
    }
    // X ticks: about 10.
    let step = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]
        .into_iter()
        .find(|s| t_max_s / s <= 12.0)
        .unwrap_or(600.0);
    let mut t = 0.0;
    while t <= t_max_s + 1e-9 {
        let x = tx(t);
        let _ = writeln!(
            o,
            r#"<text x="{x:.1}" y="{}" font-size="10" text-anchor="middle">{t:.0}</text>"#,
            bottom + 14.0
        );
        t += step;
    }
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">time (s)</text>"#,
        (x0 + x1) / 2.0,
        bottom + 30.0
    );
    let _ = writeln!(
        o,
        r#"<text x="14" y="{}" font-size="11" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"#,
        (top + bottom) / 2.0,
        (top + bottom) / 2.0,
        escape(y_label)
    );
    for (start, healed, label) in marks {
        let x = tx(*start);
        let _ = writeln!(
            o,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="#d22" stroke-width="1"/><text x="{:.1}" y="{}" font-size="9" fill="#d22" transform="rotate(-90 {:.1} {})">{}</text>"##,
            x + 3.0,
            top + 4.0,
            x + 3.0,
            top + 4.0,
            escape(label)
        );
        if *healed > *start {
            let xh = tx(*healed);
            let _ = writeln!(
                o,
                r##"<line x1="{xh:.1}" y1="{top}" x2="{xh:.1}" y2="{bottom}" stroke="#999" stroke-dasharray="3,3"/>"##
            );
        }
    }
    for (k, l) in lines.iter().enumerate() {
        let mut d = String::new();
        for (i, (t, v)) in l.points.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.1},{:.1} ",
                if i == 0 { "M" } else { "L" },
                tx(*t),
                ty(*v)
            );
        }
        let _ = writeln!(
            o,
            r#"<path d="{d}" fill="none" stroke="{}" stroke-width="1"/>"#,
            l.color
        );
        let lx = x1 - 260.0 + 130.0 * k as f64;
        let _ = writeln!(
            o,
            r#"<rect x="{lx}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}" font-size="11">{}</text>"#,
            y0 + 9.0,
            l.color,
            lx + 14.0,
            y0 + 18.0,
            escape(l.label)
        );
    }
}

fn points(s: &Series, f: impl Fn(usize) -> Option<f64>) -> Vec<(f64, f64)> {
    let b = s.bucket_ms as f64 / 1e3;
    (0..s.count.len())
        .filter_map(|i| f(i).map(|v| ((i as f64 + 0.5) * b, v)))
        .collect()
}

fn svg(panels: usize, body: &str) -> String {
    let h = PANEL_H * panels as f64;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" viewBox=\"0 0 {W} {h}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n"
    )
}

/// Writes `<report stem>-latency.svg` and `<report stem>-throughput.svg` beside `report`;
/// returns their file names.
pub fn write(report: &Path, s: &Summary) -> anyhow::Result<Vec<String>> {
    let stem = report
        .file_stem()
        .map(|x| x.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report".into());
    let dir = report.parent().unwrap_or(Path::new("."));
    let g = &s.grant_series;
    let n = &s.next_series;
    let t_max_s = (g.count.len().max(n.count.len()).max(1) as f64) * g.bucket_ms as f64 / 1e3;
    let marks: Vec<(f64, f64, String)> = s
        .outcomes
        .iter()
        .filter(|o| o.fault.skipped.is_none())
        .map(|o| {
            (
                o.fault.t_us as f64 / 1e6,
                o.fault.healed_us.unwrap_or(0) as f64 / 1e6,
                o.fault.kind.name(),
            )
        })
        .collect();
    let mut lat = String::new();
    let grant_lat = Line {
        label: "block grant, max",
        color: "#1f77b4",
        points: points(g, |i| (g.count[i] > 0).then(|| g.max_us[i] as f64 / 1e3)),
    };
    let next_lat = Line {
        label: "next() wait, max",
        color: "#ff7f0e",
        points: points(n, |i| (n.count[i] > 0).then(|| n.max_us[i] as f64 / 1e3)),
    };
    let grant_mean = Line {
        label: "block grant, mean",
        color: "#2ca02c",
        points: points(g, |i| {
            (g.count[i] > 0).then(|| g.sum_us[i] as f64 / g.count[i] as f64 / 1e3)
        }),
    };
    panel(
        &mut lat,
        0.0,
        &format!(
            "Latency per {} ms, ms (log scale); red: fault, grey dashed: healed",
            g.bucket_ms
        ),
        "ms",
        &[grant_lat, grant_mean],
        true,
        t_max_s,
        &marks,
    );
    let mut panels = 1;
    if !n.count.is_empty() {
        panel(
            &mut lat,
            PANEL_H,
            "next() wait per bucket (ring consumers), ms (log scale)",
            "ms",
            &[next_lat],
            true,
            t_max_s,
            &marks,
        );
        panels += 1;
    }
    let mut files = Vec::new();
    let name = format!("{stem}-latency.svg");
    std::fs::write(dir.join(&name), svg(panels, &lat))
        .with_context(|| format!("write {}", dir.join(&name).display()))?;
    files.push(name);

    let per_s = |s: &Series, i: usize| s.count[i] as f64 * 1e3 / s.bucket_ms as f64;
    let mut thr = String::new();
    panel(
        &mut thr,
        0.0,
        "Block grants per second (simulated agents)",
        "grants/s",
        &[Line {
            label: "grants/s",
            color: "#1f77b4",
            points: points(g, |i| Some(per_s(g, i))),
        }],
        false,
        t_max_s,
        &marks,
    );
    let mut panels = 1;
    if !n.count.is_empty() {
        panel(
            &mut thr,
            PANEL_H,
            "Ids taken per second (ring consumers, next())",
            "ids/s",
            &[Line {
                label: "next()/s",
                color: "#ff7f0e",
                points: points(n, |i| Some(per_s(n, i))),
            }],
            false,
            t_max_s,
            &marks,
        );
        panels += 1;
    }
    let name = format!("{stem}-throughput.svg");
    std::fs::write(dir.join(&name), svg(panels, &thr))
        .with_context(|| format!("write {}", dir.join(&name).display()))?;
    files.push(name);
    Ok(files)
}
