//! The single-file HTML report: the decision first, then the evidence as inline SVG charts.
//! No scripts, no external assets: it opens from disk, in a mail attachment or an object store.

use std::fmt::Write as _;

use crate::Evaluation;

const W: f64 = 420.0;
const H: f64 = 260.0;
const PAD: f64 = 40.0;

/// Text made safe inside HTML or SVG, in an element or a quoted attribute.
pub fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Axes with [0, x_max] × [0, y_max] mapped into the plot area; returns the SVG prefix and a
/// mapping from data to pixels.
fn axes(
    title: &str,
    x_label: &str,
    y_label: &str,
    x_max: f64,
    y_max: f64,
) -> (String, impl Fn(f64, f64) -> (f64, f64)) {
    axes_from(title, x_label, y_label, x_max, (0.0, y_max))
}

/// [`axes`] with the y axis starting at `y_min`: where the values a decision rests on lie,
/// instead of squeezed against a zero nobody is near.
fn axes_from(
    title: &str,
    x_label: &str,
    y_label: &str,
    x_max: f64,
    (y_min, y_max): (f64, f64),
) -> (String, impl Fn(f64, f64) -> (f64, f64)) {
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{t}">
<text x="{cx}" y="16" text-anchor="middle" class="title">{t}</text>
<line x1="{PAD}" y1="{b}" x2="{r}" y2="{b}" class="axis"/><line x1="{PAD}" y1="{top}" x2="{PAD}" y2="{b}" class="axis"/>
<text x="{cx}" y="{xl}" text-anchor="middle">{x}</text>
<text x="12" y="{cy}" text-anchor="middle" transform="rotate(-90 12 {cy})">{y}</text>
<text x="{PAD}" y="{tick}" text-anchor="middle">0</text><text x="{r}" y="{tick}" text-anchor="end">{xm}</text>
<text x="{ym_x}" y="{ym_y}" text-anchor="end">{ym}</text>{y0}
"##,
        t = escape_html(title),
        cx = W / 2.0,
        b = H - PAD,
        r = W - 10.0,
        top = 24.0,
        xl = H - 6.0,
        cy = H / 2.0,
        x = escape_html(x_label),
        y = escape_html(y_label),
        tick = H - PAD + 14.0,
        xm = fmt_num(x_max),
        ym_x = PAD - 4.0,
        ym_y = 28.0,
        ym = fmt_num(y_max),
        y0 = if y_min > 0.0 {
            format!(
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                PAD - 4.0,
                H - PAD,
                fmt_num(y_min)
            )
        } else {
            String::new()
        },
    );
    let span = y_max - y_min;
    let map = move |x: f64, y: f64| {
        let px = PAD + (W - 10.0 - PAD) * if x_max > 0.0 { x / x_max } else { 0.0 };
        let py = (H - PAD)
            - (H - PAD - 24.0)
                * if span > 0.0 {
                    ((y - y_min) / span).max(0.0)
                } else {
                    0.0
                };
        (px, py)
    };
    (s, map)
}

fn fmt_num(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn polyline(points: &[(f64, f64)], class: &str) -> String {
    let pts: Vec<String> = points
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect();
    format!(
        r#"<polyline class="{class}" fill="none" points="{}"/>"#,
        pts.join(" ")
    )
}

fn loss_chart(loss: &[(usize, f64)]) -> String {
    let x_max = loss.last().map_or(1, |l| l.0) as f64;
    let y_max = loss.iter().map(|l| l.1).fold(0.0, f64::max).max(1e-9);
    let (mut s, map) = axes("Training loss", "step", "loss", x_max, y_max);
    let pts: Vec<(f64, f64)> = loss.iter().map(|&(x, y)| map(x as f64, y)).collect();
    s.push_str(&polyline(&pts, "series"));
    s.push_str("</svg>");
    s
}

fn reliability_chart(eval: &Evaluation) -> String {
    let (mut s, map) = axes("Reliability", "confidence", "accuracy", 1.0, 1.0);
    let (a, b) = (map(0.0, 0.0), map(1.0, 1.0));
    let _ = write!(
        s,
        r#"<line class="ideal" x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}"/>"#,
        a.0, a.1, b.0, b.1
    );
    for bin in eval.calibration.bins.iter().filter(|b| b.count > 0) {
        let (x0, y0) = map(bin.lower, bin.accuracy);
        let (x1, base) = map(bin.upper, 0.0);
        let _ = write!(
            s,
            r#"<rect class="bar" x="{x0:.1}" y="{y0:.1}" width="{:.1}" height="{:.1}"><title>{} predictions, confidence {:.2}, accuracy {:.2}</title></rect>"#,
            (x1 - x0 - 1.0).max(1.0),
            (base - y0).max(0.0),
            bin.count,
            bin.confidence,
            bin.accuracy
        );
    }
    s.push_str("</svg>");
    s
}

fn routing_chart(eval: &Evaluation) -> String {
    let r = &eval.routing;
    // From a round tenth below the lowest accuracy on the curve (or the target): the choice
    // of threshold is made between the curve and the target line.
    let lowest = r
        .curve
        .iter()
        .map(|p| p.accuracy)
        .fold(r.target_accuracy, f64::min);
    let y_min = (((lowest - 0.05) * 10.0).floor() / 10.0).clamp(0.0, 0.9);
    let (mut s, map) = axes_from(
        "Coverage vs accuracy",
        "coverage (answered by the small model)",
        "accuracy",
        1.0,
        (y_min, 1.0),
    );
    let pts: Vec<(f64, f64)> = r
        .curve
        .iter()
        .map(|p| map(p.coverage, p.accuracy))
        .collect();
    s.push_str(&polyline(&pts, "series"));
    let (tx0, ty) = map(0.0, r.target_accuracy);
    let (tx1, _) = map(1.0, r.target_accuracy);
    let _ = write!(
        s,
        r#"<line class="target" x1="{tx0:.1}" y1="{ty:.1}" x2="{tx1:.1}" y2="{ty:.1}"/>"#
    );
    if let Some(t) = r.threshold {
        let (x, y) = map(r.coverage, r.accuracy);
        let _ = write!(
            s,
            r#"<circle class="chosen" cx="{x:.1}" cy="{y:.1}" r="5"/><text x="{:.1}" y="{:.1}" text-anchor="end">threshold {t:.3}</text>"#,
            x - 8.0,
            y + 16.0
        );
    }
    s.push_str("</svg>");
    s
}

fn confusion_chart(eval: &Evaluation) -> Option<String> {
    let m = &eval.candidate.confusion;
    let labels: Vec<&str> = eval
        .candidate
        .per_label
        .iter()
        .map(|l| l.label.as_str())
        .collect();
    if m.is_empty() {
        return None;
    }
    let n = m.len() as f64;
    let cell = (300.0 / n).min(40.0);
    // Room for the longest label at 11px (about 6.5px a character), within reason.
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0) as f64;
    let left = (longest * 6.5 + 12.0).clamp(120.0, 320.0);
    // Wide enough for the title even when there are few labels.
    let size = (left + cell * n + 10.0).max(360.0);
    let max = m.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{h}" viewBox="0 0 {size} {h}" role="img" aria-label="Confusion matrix"><text x="{cx}" y="16" text-anchor="middle" class="title">Confusion (rows: expected, columns: predicted)</text>"#,
        h = 30.0 + cell * n + 10.0,
        cx = size / 2.0
    );
    for (i, row) in m.iter().enumerate() {
        let y = 30.0 + cell * i as f64;
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 4.0,
            y + cell * 0.65,
            escape_html(labels.get(i).copied().unwrap_or(""))
        );
        for (j, &v) in row.iter().enumerate() {
            let shade = v as f64 / max;
            let _ = write!(
                s,
                r##"<rect x="{:.1}" y="{y:.1}" width="{cell:.1}" height="{cell:.1}" fill="rgba(37,99,235,{shade:.2})" stroke="#ddd"><title>expected {} → predicted {}: {v}</title></rect>"##,
                left + cell * j as f64,
                escape_html(labels.get(i).copied().unwrap_or("")),
                escape_html(labels.get(j).copied().unwrap_or(""))
            );
            if v > 0 {
                let _ = write!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="cell">{v}</text>"#,
                    left + cell * (j as f64 + 0.5),
                    y + cell * 0.62
                );
            }
        }
    }
    s.push_str("</svg>");
    Some(s)
}

/// Where whoever serves a stored report puts what happened since: the version's status now and
/// its decision trail. The file itself is the snapshot taken at evaluation.
pub const LIVE_MARKER: &str = "<!-- flywheel:live -->";

/// The charts a steward reads a decision by, as inline SVG: the training loss (when there is
/// one), reliability, coverage against accuracy, and the confusion matrix when `confusion`.
pub fn charts(eval: &Evaluation, loss: &[(usize, f64)], confusion: bool) -> Vec<String> {
    let mut out = Vec::new();
    if !loss.is_empty() {
        out.push(loss_chart(loss));
    }
    out.push(reliability_chart(eval));
    out.push(routing_chart(eval));
    if confusion && let Some(c) = confusion_chart(eval) {
        out.push(c);
    }
    out
}

/// Renders the report. `loss` is the training loss curve as `(step, loss)`.
pub fn render_html(
    domain: &str,
    version: &str,
    eval: &Evaluation,
    loss: &[(usize, f64)],
    lineage: &serde_json::Value,
) -> String {
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let verdict = eval.decision.verdict();
    let rule = serde_json::to_value(eval.decision.rule).expect("json");
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{d} {v}: evaluation report</title>
<style>
body{{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:980px;color:#111}}
h1{{font-size:22px;margin:0 0 6px}} h2{{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #eee}}
.badge{{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600}}
.ok{{background:#dcfce7;color:#166534}} .no{{background:#fee2e2;color:#991b1b}} .wait{{background:#fef9c3;color:#854d0e}}
table{{border-collapse:collapse}} td,th{{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}} td:first-child,th:first-child{{text-align:left}}
.charts{{display:flex;flex-wrap:wrap;gap:16px}} svg{{background:#fafafa;border:1px solid #eee}}
svg text{{font-size:11px;fill:#333}} svg .title{{font-size:12px;font-weight:600}} .axis{{stroke:#999}}
.series{{stroke:#2563eb;stroke-width:2}} .ideal{{stroke:#aaa;stroke-dasharray:4 3}} .bar{{fill:#60a5fa}}
.target{{stroke:#dc2626;stroke-dasharray:5 3}} .chosen{{fill:#dc2626}} .cell{{font-size:10px}}
pre{{background:#f6f6f6;padding:10px;overflow:auto}} li{{margin:2px 0}}
</style></head><body>
<h1>{d} {v}</h1>
{LIVE_MARKER}
<p><b>Gate decision at evaluation:</b> <span class="badge {cls}">{verdict}</span> {reason} (rule <code>{rule}</code>)</p>{remedy}
<p>Evaluated on {n} held-out corrections against <b>{champ}</b>.</p>
<table><tr><th>metric</th><th>champion</th><th>candidate</th></tr>
<tr><td>accuracy</td><td>{ca}</td><td>{na}</td></tr>"#,
        d = escape_html(domain),
        v = escape_html(version),
        verdict = verdict.0,
        cls = verdict.1,
        // The reason opens with the verdict the badge already shows.
        reason = escape_html(
            eval.decision
                .reason
                .strip_prefix(verdict.0)
                .map_or(eval.decision.reason.as_str(), |r| r
                    .trim_start_matches(':')
                    .trim_start())
        ),
        rule = rule.as_str().unwrap_or("?"),
        remedy = eval
            .decision
            .remedy
            .as_deref()
            .map(|r| format!(
                "\n<p><b>What would have passed this rule:</b> {}</p>",
                escape_html(r)
            ))
            .unwrap_or_default(),
        n = eval.holdout_size,
        champ = escape_html(&eval.champion_name),
        ca = pct(eval.champion.accuracy),
        na = pct(eval.candidate.accuracy),
    );
    if let (Some(a), Some(b)) = (eval.champion.macro_f1, eval.candidate.macro_f1) {
        let _ = write!(
            h,
            "<tr><td>macro-F1</td><td>{}</td><td>{}</td></tr>",
            pct(a),
            pct(b)
        );
    }
    if let (Some(a), Some(b)) = (eval.champion.token_f1, eval.candidate.token_f1) {
        let _ = write!(
            h,
            "<tr><td>token-F1</td><td>{}</td><td>{}</td></tr>",
            pct(a),
            pct(b)
        );
    }
    let _ = write!(
        h,
        "<tr><td>calibration error (ECE)</td><td></td><td>{:.3}</td></tr></table>
<p>Paired exact McNemar test: {} fixed, {} broken, {}.</p>",
        eval.calibration.ece,
        eval.fixed_count,
        eval.broken_count,
        crate::format_p(eval.mcnemar_p)
    );
    if let Some(o) = &eval.out_of_scope {
        let _ = write!(
            h,
            "<p>Out-of-scope recall (<code>{}</code>, {} held out): champion {}, candidate {}.</p>",
            escape_html(&o.label),
            o.support,
            pct(o.champion_recall),
            pct(o.candidate_recall)
        );
        if let Some(t) = &o.threshold {
            let _ = write!(
                h,
                "<p>Out-of-scope threshold: answers below {:.3} confidence are served as \
                 <code>{}</code>; on the holdout that keeps {} of in-scope answers right and \
                 catches {} of out-of-scope queries.</p>",
                t.threshold,
                escape_html(&o.label),
                pct(t.in_scope_accuracy),
                pct(t.out_of_scope_recall)
            );
        }
    }
    let r = &eval.routing;
    let _ = match r.threshold {
        Some(t) => write!(
            h,
            "<p><b>Escalation threshold:</b> answer when confidence ≥ {t:.3}; escalate below. On this holdout the small model answers {} of queries at {} accuracy (target {}).</p>",
            pct(r.coverage),
            pct(r.accuracy),
            pct(r.target_accuracy)
        ),
        None => write!(
            h,
            "<p><b>Escalation threshold:</b> none reaches {} on this holdout; escalate every query.</p>",
            pct(r.target_accuracy)
        ),
    };
    h.push_str(r#"<h2>Charts</h2><div class="charts">"#);
    for chart in charts(eval, loss, true) {
        h.push_str(&chart);
    }
    h.push_str("</div>");
    if !eval.candidate.per_label.is_empty() {
        h.push_str("<h2>Per label (candidate)</h2><table><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>");
        for m in &eval.candidate.per_label {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape_html(&m.label),
                pct(m.precision),
                pct(m.recall),
                pct(m.f1),
                m.support
            );
        }
        h.push_str("</table>");
    }
    for (title, flips, count) in [
        ("Fixed (wrong → right)", &eval.fixed, eval.fixed_count),
        ("Broken (right → wrong)", &eval.broken, eval.broken_count),
    ] {
        let _ = write!(h, "<h2>{title}</h2>");
        if flips.is_empty() {
            h.push_str("<p>None.</p>");
            continue;
        }
        if count as usize > crate::FLIPS_SHOWN {
            let _ = write!(h, "<p>Showing {} of {count}.</p>", crate::FLIPS_SHOWN);
        }
        h.push_str("<ul>");
        for f in flips.iter().take(crate::FLIPS_SHOWN) {
            let _ = write!(
                h,
                "<li>“{}”: expected <code>{}</code>, champion <code>{}</code>, candidate <code>{}</code></li>",
                escape_html(&f.text),
                escape_html(&f.expected),
                escape_html(&f.champion),
                escape_html(&f.candidate)
            );
        }
        h.push_str("</ul>");
    }
    let _ = writeln!(
        h,
        "<h2>Lineage</h2><pre>{}</pre></body></html>",
        escape_html(&serde_json::to_string_pretty(lineage).expect("json"))
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_axis_from_a_floor_maps_the_floor_to_the_bottom_and_labels_it() {
        let (svg, map) = axes_from("t", "x", "y", 1.0, (0.7, 1.0));
        assert_eq!(map(0.0, 0.7).1, H - PAD);
        assert_eq!(map(0.0, 1.0).1, 24.0);
        assert!(svg.contains(">0.70</text>"), "{svg}");
        // Below the floor stays on the axis rather than leaving the plot.
        assert_eq!(map(0.0, 0.2).1, H - PAD);
        let (svg, map) = axes("t", "x", "y", 1.0, 1.0);
        assert_eq!(map(0.0, 0.0).1, H - PAD);
        assert!(!svg.contains(">0.00</text>"));
    }
}
