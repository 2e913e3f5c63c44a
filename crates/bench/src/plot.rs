//! The latency/throughput curve as a self-contained SVG: one line per server, one point per load
//! level, output tokens/s across and latency up.

use std::fmt::Write;

/// One load level of one series: (output tokens/s, latency in ms, label).
pub type CurvePoint = (f64, f64, String);

const COLORS: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= v {
            return m * mag;
        }
    }
    10.0 * mag
}

/// Draws `series` (name, points) with the y axis named `y_label`.
pub fn latency_throughput_svg(
    title: &str,
    y_label: &str,
    series: &[(String, Vec<CurvePoint>)],
) -> String {
    let chart = Chart {
        w: 720.0,
        h: 440.0,
        left: 70.0,
        right: 20.0,
        top: 40.0,
        bottom: 60.0,
        xmax: nice_max(
            series
                .iter()
                .flat_map(|s| s.1.iter().map(|p| p.0))
                .fold(0.0, f64::max),
        ),
        ymax: nice_max(
            series
                .iter()
                .flat_map(|s| s.1.iter().map(|p| p.1))
                .fold(0.0, f64::max),
        ),
    };
    let w = chart.w;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{title}</text>"#,
        chart.h,
        w / 2.0
    );
    chart.write_axes(&mut s, y_label);
    for (i, (name, pts)) in series.iter().enumerate() {
        chart.write_series(&mut s, i, name, pts);
    }
    s.push_str("</svg>");
    s
}

/// The picture's size and margins (pixels) and the largest value on each axis.
struct Chart {
    w: f64,
    h: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    xmax: f64,
    ymax: f64,
}

impl Chart {
    /// The x pixel of `x` output tokens/s.
    fn px(&self, x: f64) -> f64 {
        self.left + x / self.xmax * (self.w - self.left - self.right)
    }

    /// The y pixel of latency `y`.
    fn py(&self, y: f64) -> f64 {
        self.h - self.bottom - y / self.ymax * (self.h - self.top - self.bottom)
    }

    /// Writes the grid (six labelled lines each way) and the two axes with their names.
    fn write_axes(&self, s: &mut String, y_label: &str) {
        let (w, h, left, right, top, bottom) =
            (self.w, self.h, self.left, self.right, self.top, self.bottom);
        for i in 0..=5 {
            let (fx, fy) = (self.xmax * i as f64 / 5.0, self.ymax * i as f64 / 5.0);
            let _ = write!(
                s,
                r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{yb}" stroke="#eee"/><text x="{x}" y="{ty}" text-anchor="middle">{fx:.0}</text><line x1="{left}" y1="{y}" x2="{xr}" y2="{y}" stroke="#eee"/><text x="{tx}" y="{yt}" text-anchor="end">{fy:.0}</text>"##,
                x = self.px(fx),
                yb = h - bottom,
                ty = h - bottom + 16.0,
                y = self.py(fy),
                xr = w - right,
                tx = left - 6.0,
                yt = self.py(fy) + 4.0,
            );
        }
        let _ = write!(
            s,
            r#"<line x1="{left}" y1="{yb}" x2="{xr}" y2="{yb}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{yb}" stroke="black"/><text x="{cx}" y="{lx}" text-anchor="middle">output tokens/s</text><text x="16" y="{cy}" text-anchor="middle" transform="rotate(-90 16 {cy})">{y_label}</text>"#,
            yb = h - bottom,
            xr = w - right,
            cx = (left + w - right) / 2.0,
            lx = h - 18.0,
            cy = (top + h - bottom) / 2.0,
        );
    }

    /// Writes series `i`: its line, its labelled points and its legend entry.
    fn write_series(&self, s: &mut String, i: usize, name: &str, pts: &[CurvePoint]) {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|p| format!("{:.1},{:.1}", self.px(p.0), self.py(p.1)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for p in pts {
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}"/><text x="{:.1}" y="{:.1}" fill="{color}">{}</text>"#,
                self.px(p.0),
                self.py(p.1),
                self.px(p.0) + 6.0,
                self.py(p.1) - 6.0,
                p.2
            );
        }
        let ly = self.top + 10.0 + 18.0 * i as f64;
        let _ = write!(
            s,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{}">{name}</text>"#,
            self.left + 12.0,
            ly - 10.0,
            self.left + 30.0,
            ly
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_every_series_and_point() {
        let svg = latency_throughput_svg(
            "t",
            "p50 ITL (ms)",
            &[
                (
                    "ours".into(),
                    vec![(10.0, 5.0, "c=1".into()), (50.0, 20.0, "c=8".into())],
                ),
                ("theirs".into(), vec![(8.0, 9.0, "c=1".into())]),
            ],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains("ours") && svg.contains("theirs") && svg.contains("c=8"));
    }
}
