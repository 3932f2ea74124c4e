//! The domain page's chart: accuracy of every version in order, as inline SVG.

use std::fmt::Write as _;

use flywheel_evaluator::escape_html;

/// One version on the chart.
pub struct Point {
    pub label: String,
    /// Holdout accuracy, in [0, 1].
    pub value: f64,
    /// Production points at it.
    pub live: bool,
    /// Its status (`promoted`, `held_back`, …), which colours the dot.
    pub status: &'static str,
}

const W: f64 = 640.0;
const H: f64 = 220.0;
const LEFT: f64 = 48.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 36.0;

/// The y range: from a round tenth below the lowest point to one, so the differences the
/// gate judges stay visible instead of being squeezed against a zero nobody is near.
fn y_range(points: &[Point]) -> (f64, f64) {
    let lowest = points.iter().map(|p| p.value).fold(1.0, f64::min);
    let floor = ((lowest - 0.05) * 10.0).floor() / 10.0;
    (floor.clamp(0.0, 0.9), 1.0)
}

/// An SVG line chart of `points` in order; empty when there are none.
pub fn accuracy_over_versions(points: &[Point]) -> String {
    if points.is_empty() {
        return String::new();
    }
    let (lo, hi) = y_range(points);
    // One version sits in the middle, not against the axis.
    let x = |i: usize| {
        if points.len() == 1 {
            return LEFT + (W - LEFT - RIGHT) / 2.0;
        }
        LEFT + (W - LEFT - RIGHT) * i as f64 / (points.len() - 1) as f64
    };
    let y = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - (v - lo) / (hi - lo));
    let mut s = format!(
        r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="Holdout accuracy of each version">"#
    );
    let mut tick = lo;
    while tick <= hi + 1e-9 {
        let ty = y(tick);
        let _ = write!(
            s,
            r#"<line class="grid" x1="{LEFT}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}"/><text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}%</text>"#,
            W - RIGHT,
            LEFT - 6.0,
            ty + 4.0,
            tick * 100.0
        );
        tick += 0.1;
    }
    let line: Vec<String> = points
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{:.1},{:.1}", x(i), y(p.value)))
        .collect();
    let _ = write!(
        s,
        r#"<polyline class="series" fill="none" points="{}"/>"#,
        line.join(" ")
    );
    for (i, p) in points.iter().enumerate() {
        let (px, py) = (x(i), y(p.value));
        let _ = write!(
            s,
            r#"<circle class="dot {}{}" cx="{px:.1}" cy="{py:.1}" r="{}"><title>{}: {:.1}% ({})</title></circle><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            p.status,
            if p.live { " live" } else { "" },
            if p.live { 6 } else { 4 },
            escape_html(&p.label),
            p.value * 100.0,
            p.status.replace('_', " "),
            H - BOTTOM + 16.0,
            escape_html(&p.label)
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(label: &str, value: f64) -> Point {
        Point {
            label: label.into(),
            value,
            live: false,
            status: "promoted",
        }
    }

    #[test]
    fn the_axis_starts_near_the_lowest_version_not_at_zero() {
        assert_eq!(y_range(&[point("v1", 0.81), point("v2", 0.93)]), (0.7, 1.0));
        assert_eq!(y_range(&[point("v1", 0.02)]), (0.0, 1.0));
        let svg = accuracy_over_versions(&[point("v1", 0.81), point("v2", 0.93)]);
        assert!(
            svg.contains(">70%<") && svg.contains(">100%<") && !svg.contains(">0%<"),
            "{svg}"
        );
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(accuracy_over_versions(&[]).is_empty());
    }
}
