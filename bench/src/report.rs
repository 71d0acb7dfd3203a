//! Results for people (a markdown table, an SVG percentile plot) and for machines (JSON).

use std::fmt::Write as _;

use serde::Serialize;

use crate::load::{Outcome, Protocol};

/// One run, summarised. Latencies in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// A label for the table (scenario, or server in a comparison).
    pub label: String,
    /// `closed` or `open@RATE`.
    pub mode: String,
    /// The wire protocol.
    pub protocol: Protocol,
    /// Over TLS (`https`).
    pub tls: bool,
    /// Connections.
    pub connections: usize,
    /// Requests answered.
    pub requests: u64,
    /// Answered requests per second.
    pub requests_per_sec: f64,
    /// Transport errors, timeouts and 5xx answers.
    pub errors: u64,
    /// Answers outside 2xx/3xx.
    pub non_success: u64,
    /// Run time in seconds.
    pub seconds: f64,
    /// Median latency.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Slowest answer.
    pub max_ms: f64,
    /// Mean latency.
    pub mean_ms: f64,
    /// `(percentile, latency ms)` pairs for plotting, from 0 to 100.
    pub percentiles: Vec<(f64, f64)>,
    /// The first transport error, if any.
    pub first_error: Option<String>,
    /// Connections opened, including those opened before the start.
    pub connects: u64,
    /// Full TLS handshakes (with `--new-conn` and no resumption: one per request).
    pub tls_handshakes: u64,
    /// Resumed TLS handshakes (only with `--resume`).
    pub tls_resumed: u64,
}

/// The percentiles plotted and stored: dense towards the tail, like HdrHistogram's output.
const PLOT_QUANTILES: &[f64] = &[
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999, 100.0,
];

impl Summary {
    /// Summarises `outcome`.
    pub fn new(
        label: &str,
        mode: String,
        protocol: Protocol,
        tls: bool,
        connections: usize,
        o: &Outcome,
    ) -> Self {
        let ms = |us: u64| us as f64 / 1e3;
        let at = |q: f64| ms(o.latency.value_at_quantile(q));
        Self {
            label: label.to_owned(),
            mode,
            protocol,
            tls,
            connections,
            requests: o.answered,
            requests_per_sec: o.rate(),
            errors: o.errors,
            non_success: o.non_success,
            seconds: o.elapsed.as_secs_f64(),
            p50_ms: at(0.5),
            p90_ms: at(0.9),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: ms(o.latency.max()),
            mean_ms: o.latency.mean() / 1e3,
            percentiles: PLOT_QUANTILES.iter().map(|&p| (p, at(p / 100.0))).collect(),
            first_error: o.first_error.clone(),
            connects: o.connects,
            tls_handshakes: o.tls_full,
            tls_resumed: o.tls_resumed,
        }
    }
}

/// A markdown table with one row per summary.
pub fn markdown(rows: &[Summary]) -> String {
    let mut out = String::from(
        "| run | mode | proto | conns | requests | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors | non-2xx/3xx | connects | TLS full/resumed |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let proto = match (r.protocol, r.tls) {
            (Protocol::Http1, false) => "h1",
            (Protocol::Http1, true) => "h1+tls",
            (Protocol::Http2, false) => "h2c",
            (Protocol::Http2, true) => "h2",
        };
        let handshakes = if r.tls {
            format!("{}/{}", r.tls_handshakes, r.tls_resumed)
        } else {
            "-".to_owned()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} |",
            r.label,
            r.mode,
            proto,
            r.connections,
            r.requests,
            r.requests_per_sec,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.p999_ms,
            r.max_ms,
            r.errors,
            r.non_success,
            r.connects,
            handshakes
        );
    }
    out
}

/// A latency-by-percentile plot: x is `1 / (1 - p)` on a log scale (so 90, 99, 99.9 …
/// are evenly spaced and the tail gets room), y is latency in ms. One line per summary.
pub fn svg(rows: &[Summary]) -> String {
    const W: f64 = 800.0;
    const H: f64 = 480.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 170.0;
    const TOP: f64 = 30.0;
    const BOTTOM: f64 = 50.0;
    const DECADES: f64 = 5.0; // up to 99.999 %
    const COLOURS: &[&str] = &[
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    ];
    let x_of = |p: f64| {
        let tail = (1.0 - p / 100.0).max(10f64.powf(-DECADES));
        LEFT + (-tail.log10() / DECADES) * (W - LEFT - RIGHT)
    };
    let y_max = rows
        .iter()
        .flat_map(|r| r.percentiles.iter().map(|&(_, ms)| ms))
        .fold(0.0f64, f64::max)
        .max(0.001)
        * 1.05;
    let y_of = |ms: f64| TOP + (1.0 - ms / y_max) * (H - TOP - BOTTOM);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="18" font-size="14">Latency by percentile (ms)</text>"#
    );
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
    {
        let x = LEFT + (i as f64 / DECADES) * (W - LEFT - RIGHT);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 18.0
        );
    }
    for i in 0..=4 {
        let ms = y_max * f64::from(i) / 4.0;
        let y = y_of(ms);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{ms:.3}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0
        );
    }
    for (i, r) in rows.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = r
            .percentiles
            .iter()
            .map(|&(p, ms)| format!("{:.1},{:.1}", x_of(p), y_of(ms)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let y = TOP + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="12" height="3" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            W - RIGHT + 10.0,
            y,
            W - RIGHT + 26.0,
            y + 5.0,
            escape(&format!("{} {}", r.label, r.mode))
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
