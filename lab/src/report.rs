//! The drill's HTML report: one self-contained file (inline CSS and SVG, no script, nothing
//! fetched) with the figures, the topology and the timeline — success rate, share answered
//! by the failing cluster, and p99 latency per bucket, with the failure and the heal marked.

use std::fmt::Write as _;

use crate::drill::DrillResult;
use crate::plan::Plan;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const W: f64 = 900.0;
const H: f64 = 220.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 30.0;

/// The report for `r`, drawn on `plan`'s topology.
pub fn html(r: &DrillResult, plan: &Plan) -> String {
    let mut h = String::new();
    let title = format!("drill failover: {} of {}", r.scenario.name(), r.cluster);
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\
<style>body{{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:960px}}\
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
th:first-child,td:first-child{{text-align:left}}.miss{{color:#b00;font-weight:bold}}.met{{color:#070}}\
svg{{display:block;margin:0.5em 0 1.5em}}code{{background:#f3f3f3;padding:0 3px}}</style></head><body>\
<h1>{t}</h1><p>Lab <code>{topo}</code>: {rate} req/s from {from} {client} to {svc} (<code>{addr}</code>), \
one new connection per request, {timeout} ms per attempt, {retries} retr{ies} of a request that got no response; \
the lab's sidecars run with <code>--connect-timeout {cto}</code>.</p>\
<p><b>Injected</b> at {inj:.0} ms: {injected}<br><b>Healed</b> at {heal:.0} ms: {healed}{ready}</p>",
        t = esc(&title),
        topo = esc(&plan.topology.name),
        rate = r.rate,
        from = esc(&r.from),
        client = esc(&r.client),
        svc = esc(&r.service),
        addr = r.address,
        timeout = r.timeout_ms,
        retries = r.retries,
        ies = if r.retries == 1 { "y" } else { "ies" },
        cto = r.sidecar_connect_timeout,
        inj = r.inject_at_ms,
        injected = esc(&r.injected),
        heal = r.heal_at_ms,
        healed = esc(&r.healed),
        ready = r
            .healed_ready_ms
            .map(|d| format!(" (ready {d:.0} ms later)"))
            .unwrap_or_default(),
    );
    let ms = |v: Option<f64>, none: &str| v.map_or(none.to_string(), |v| format!("{v:.0} ms"));
    let _ = write!(
        h,
        "<table><tr><th>figure</th><th>measured</th><th>definition</th></tr>\
<tr><td>detect</td><td>{}</td><td style=\"text-align:left\">end of the first failed attempt, or of the first request slower than {} ms, after the injection (of requests started before the heal)</td></tr>\
<tr><td>reroute</td><td>{}</td><td style=\"text-align:left\">from the injection to the end of the last request started during the failure that failed, was answered by {c} or was slower than {} ms (not rerouted: such a request started in the failure's last quarter)</td></tr>\
<tr><td>recover</td><td>{}</td><td style=\"text-align:left\">from the heal to the end of the first request started after it that {c} answered</td></tr>\
<tr><td>requests</td><td>{}</td><td style=\"text-align:left\">sent; {} failed ({} in flight at the injection), {} succeeded on a retry</td></tr>\
<tr><td>client sidecar</td><td>{}</td><td style=\"text-align:left\">upstream connects refused / timed out, each retried by the sidecar on the next endpoint</td></tr></table>",
        ms(r.detect_ms, "none seen"),
        r.slow_ms,
        ms(r.reroute_ms, "not rerouted"),
        r.slow_ms,
        ms(r.recover_ms, "not recovered"),
        r.sent,
        r.failed,
        r.failed_in_flight,
        r.retried,
        match (r.sidecar_connects_refused, r.sidecar_connect_timeouts) {
            (Some(a), Some(b)) => format!("{a} / {b}"),
            _ => "-".into(),
        },
        c = esc(&r.cluster),
    );
    h.push_str("<table><tr><th>phase</th><th>sent</th><th>ok</th><th>failed</th><th>retried</th>");
    let _ = write!(
        h,
        "<th>→{}</th><th>&gt;{} ms</th><th>p50 ms</th><th>p99 ms</th></tr>",
        esc(&r.cluster),
        r.slow_ms
    );
    for p in &r.phases {
        let (p50, p99) = p.latency_ms.map_or(("-".into(), "-".into()), |l| {
            (format!("{:.1}", l.p50_ms), format!("{:.1}", l.p99_ms))
        });
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{p50}</td><td>{p99}</td></tr>",
            p.name, p.sent, p.ok, p.failed, p.retried, p.to_failing_cluster, p.slow
        );
    }
    h.push_str("</table>");
    if !r.failures.is_empty() {
        h.push_str("<p>Failures: ");
        let list: Vec<String> = r.failures.iter().map(|(k, n)| format!("{n} × {}", esc(k))).collect();
        h.push_str(&list.join(", "));
        h.push_str("</p>");
    }
    for s in &r.slo {
        let _ = write!(
            h,
            "<p class=\"{}\">SLO {}: {} (measured {})</p>",
            if s.met { "met" } else { "miss" },
            esc(&s.what),
            if s.met { "met" } else { "MISSED" },
            esc(&s.measured)
        );
    }
    h.push_str("<h2>Topology</h2>");
    h.push_str(&topology_svg(r, plan));
    let _ = write!(
        h,
        "<h2>Timeline</h2><p>Requests by start time in {} ms buckets; red: failure injected, green: healed.</p>",
        r.bucket_ms
    );
    h.push_str(&rate_svg(r));
    h.push_str(&latency_svg(r));
    h.push_str("</body></html>\n");
    h
}

fn x_of(r: &DrillResult, t_ms: f64) -> f64 {
    let span = (r.timeline.len() as f64 * r.bucket_ms as f64).max(1.0);
    LEFT + (W - LEFT - RIGHT) * (t_ms / span)
}

fn frame(r: &DrillResult, h: &mut String, label: &str) {
    let _ = write!(
        h,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{label}\">\
<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{}\" height=\"{}\" fill=\"#fafafa\" stroke=\"#999\"/>",
        W - LEFT - RIGHT,
        H - TOP - BOTTOM
    );
    let span_s = r.timeline.len() as f64 * r.bucket_ms as f64 / 1000.0;
    let step = if span_s > 30.0 { 5.0 } else { 1.0 };
    let mut s = 0.0;
    while s <= span_s {
        let x = x_of(r, s * 1000.0);
        let _ = write!(
            h,
            "<line x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#999\"/><text x=\"{x:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{s:.0} s</text>",
            H - BOTTOM,
            H - BOTTOM + 4.0,
            H - BOTTOM + 16.0
        );
        s += step;
    }
    for (t, color, what) in [(r.inject_at_ms, "#d00", "failure"), (r.heal_at_ms, "#080", "heal")] {
        let x = x_of(r, t);
        let _ = write!(
            h,
            "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"5,3\"/><text x=\"{:.1}\" y=\"{}\" font-size=\"11\" fill=\"{color}\">{what}</text>",
            H - BOTTOM,
            x + 3.0,
            TOP + 12.0
        );
    }
}

fn polyline(r: &DrillResult, points: &[(usize, f64)], y_of: impl Fn(f64) -> f64, color: &str) -> String {
    let pts: Vec<String> = points
        .iter()
        .map(|(i, v)| {
            let x = x_of(r, (*i as f64 + 0.5) * r.bucket_ms as f64);
            format!("{x:.1},{:.1}", y_of(*v))
        })
        .collect();
    format!(
        "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
        pts.join(" ")
    )
}

fn rate_svg(r: &DrillResult) -> String {
    let mut h = String::new();
    frame(r, &mut h, "success rate over time");
    let y_of = |pct: f64| TOP + (H - TOP - BOTTOM) * (1.0 - pct / 100.0);
    for pct in [0.0, 50.0, 100.0] {
        let _ = write!(
            h,
            "<text x=\"{}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{pct:.0}%</text>",
            LEFT - 4.0,
            y_of(pct) + 4.0
        );
    }
    let ok: Vec<(usize, f64)> = r
        .timeline
        .iter()
        .enumerate()
        .filter(|(_, b)| b.sent > 0)
        .map(|(i, b)| (i, 100.0 * b.ok as f64 / b.sent as f64))
        .collect();
    let at_c: Vec<(usize, f64)> = r
        .timeline
        .iter()
        .enumerate()
        .filter(|(_, b)| b.sent > 0)
        .map(|(i, b)| (i, 100.0 * b.to_failing_cluster as f64 / b.sent as f64))
        .collect();
    h.push_str(&polyline(r, &ok, y_of, "#06c"));
    h.push_str(&polyline(r, &at_c, y_of, "#e80"));
    let _ = write!(
        h,
        "<text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"#06c\">success rate</text><text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"#e80\">share answered by {}</text></svg>",
        LEFT,
        TOP - 10.0,
        LEFT + 100.0,
        TOP - 10.0,
        esc(&r.cluster)
    );
    h
}

fn latency_svg(r: &DrillResult) -> String {
    let mut h = String::new();
    frame(r, &mut h, "p99 latency over time");
    let max = r.timeline.iter().filter_map(|b| b.p99_ms).fold(10.0f64, f64::max);
    // Log scale from 1 ms, so 5 ms and 1 s fit on one chart.
    let top = max.log10().ceil().max(1.0);
    let y_of = |ms: f64| TOP + (H - TOP - BOTTOM) * (1.0 - ms.max(1.0).log10() / top);
    let mut decade = 0.0;
    while decade <= top {
        let v = 10f64.powf(decade);
        let _ = write!(
            h,
            "<text x=\"{}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{} ms</text><line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#e4e4e4\"/>",
            LEFT - 4.0,
            y_of(v) + 4.0,
            v,
            y_of(v),
            W - RIGHT,
            y_of(v)
        );
        decade += 1.0;
    }
    let p99: Vec<(usize, f64)> = r
        .timeline
        .iter()
        .enumerate()
        .filter_map(|(i, b)| b.p99_ms.map(|v| (i, v)))
        .collect();
    h.push_str(&polyline(r, &p99, y_of, "#a0a"));
    let _ = write!(
        h,
        "<text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"#a0a\">p99 latency of successful requests (log scale)</text></svg>",
        LEFT,
        TOP - 10.0
    );
    h
}

/// Clusters as boxes grouped by network, their gateways on the transit network, the
/// client's cluster and the failing one marked.
fn topology_svg(r: &DrillResult, plan: &Plan) -> String {
    let n = plan.clusters.len().max(1) as f64;
    let bw = ((W - 40.0) / n - 20.0).min(260.0);
    let height = 230.0;
    let mut h = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{height}\" viewBox=\"0 0 {W} {height}\" role=\"img\" aria-label=\"topology\">"
    );
    let transit_y = 200.0;
    if plan.transit.is_some() {
        let _ = write!(
            h,
            "<line x1=\"20\" y1=\"{transit_y}\" x2=\"{}\" y2=\"{transit_y}\" stroke=\"#555\" stroke-width=\"3\"/><text x=\"24\" y=\"{}\" font-size=\"11\">transit 100.64.0.0/24</text>",
            W - 20.0,
            transit_y + 16.0
        );
    }
    for (i, c) in plan.clusters.iter().enumerate() {
        let x = 20.0 + i as f64 * (bw + 20.0);
        let failing = c.name.as_str() == r.cluster;
        let stroke = if failing { "#d00" } else { "#357" };
        let _ = write!(
            h,
            "<rect x=\"{x}\" y=\"10\" width=\"{bw}\" height=\"140\" rx=\"6\" fill=\"{}\" stroke=\"{stroke}\" stroke-width=\"{}\"/>\
<text x=\"{}\" y=\"30\" font-size=\"14\" font-weight=\"bold\">{}</text><text x=\"{}\" y=\"46\" font-size=\"11\">{} · {} · {}</text>",
            if failing { "#fff4f4" } else { "#f4f8fc" },
            if failing { 2.5 } else { 1.0 },
            x + 8.0,
            esc(c.name.as_str()),
            x + 8.0,
            esc(c.network.as_str()),
            c.pod_cidr,
            esc(&c.region),
        );
        let mut y = 64.0;
        let ctl = if c.controller.is_some() {
            "controller".to_string()
        } else {
            format!("remote of {}", c.served_by)
        };
        let _ = write!(
            h,
            "<text x=\"{}\" y=\"{y}\" font-size=\"11\">{}</text>",
            x + 8.0,
            esc(&ctl)
        );
        for p in &c.pods {
            y += 15.0;
            let mark = if p.role == mesh_vocab::topology::WorkloadRole::Client && c.name.as_str() == r.from {
                " ← load"
            } else {
                ""
            };
            let _ = write!(
                h,
                "<text x=\"{}\" y=\"{y}\" font-size=\"11\">{} {}{}</text>",
                x + 8.0,
                esc(&p.name),
                p.host.ip,
                mark
            );
        }
        if let Some(gw) = &c.gateway {
            let gx = x + bw / 2.0 - 60.0;
            let _ = write!(
                h,
                "<rect x=\"{gx}\" y=\"160\" width=\"120\" height=\"26\" rx=\"4\" fill=\"#fff\" stroke=\"{stroke}\"/><text x=\"{}\" y=\"177\" font-size=\"11\" text-anchor=\"middle\">gateway {}</text>\
<line x1=\"{}\" y1=\"150\" x2=\"{}\" y2=\"160\" stroke=\"#555\"/><line x1=\"{}\" y1=\"186\" x2=\"{}\" y2=\"{transit_y}\" stroke=\"#555\"/>",
                gx + 60.0,
                gw.transit_ip,
                gx + 60.0,
                gx + 60.0,
                gx + 60.0,
                gx + 60.0
            );
            if failing {
                let _ = write!(
                    h,
                    "<text x=\"{}\" y=\"177\" font-size=\"16\" fill=\"#d00\">✕</text>",
                    gx + 124.0
                );
            }
        }
    }
    h.push_str("</svg>");
    h
}
