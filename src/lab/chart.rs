//! A small dependency-free SVG line chart: the sweep's req/s and p99 latency against concurrency,
//! latency against offered load and percentile spectra (on log axes), one line per target,
//! readable on GitHub without any tooling.

use std::fmt::Write;

/// One line: a name and its (x, y) points.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// One panel of a chart.
pub struct Panel {
    /// Title above the panel.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
    /// Plot x on a log scale (values must be positive).
    pub log_x: bool,
    /// Plot y on a log scale (values must be positive), ticks at powers of ten.
    pub log_y: bool,
    /// Labelled x ticks; empty puts one at each distinct x.
    pub x_ticks: Vec<(f64, String)>,
}

impl Panel {
    /// A panel with linear axes and automatic x ticks.
    pub fn new(title: &str, x_label: &str, y_label: &str, series: Vec<Series>) -> Panel {
        Panel {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            series,
            log_x: false,
            log_y: false,
            x_ticks: Vec::new(),
        }
    }
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Renders panels side by side as one SVG document.
pub fn render(panels: &[Panel]) -> String {
    let (pw, ph) = (460.0, 320.0);
    let width = pw * panels.len() as f64;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{ph}" viewBox="0 0 {width} {ph}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="{width}" height="{ph}" fill="white"/>"#);
    for (i, p) in panels.iter().enumerate() {
        panel(&mut svg, p, i as f64 * pw, pw, ph);
    }
    svg.push_str("</svg>\n");
    svg
}

fn panel(svg: &mut String, p: &Panel, x0: f64, w: f64, h: f64) {
    let (left, right, top, bottom) = (62.0, 16.0, 28.0, 64.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    // Log axes plot log10 of the values; everything below works on the plotted values.
    let tx = |x: f64| if p.log_x { x.max(1e-9).log10() } else { x };
    let ty = |y: f64| if p.log_y { y.max(1e-9).log10() } else { y };
    let xs = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| tx(p.0)));
    let ys = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| ty(p.1)));
    let (xmin, xmax) = bounds(xs);
    let (ylo, yhi) = bounds(ys);
    let (ymin, ymax) = if p.log_y {
        let (lo, hi) = (ylo.floor(), yhi.ceil());
        if lo.is_finite() && hi.is_finite() {
            (lo, hi.max(lo + 1.0))
        } else {
            (0.0, 1.0)
        }
    } else {
        (0.0, nice_ceiling(yhi.max(1e-9)))
    };
    let sx = |x: f64| {
        x0 + left
            + if xmax > xmin {
                (tx(x) - xmin) / (xmax - xmin) * pw
            } else {
                pw / 2.0
            }
    };
    let sy = |y: f64| top + ph - (ty(y) - ymin) / (ymax - ymin) * ph;

    let _ = writeln!(
        svg,
        r#"<text x="{}" y="16" text-anchor="middle" font-size="13" font-weight="bold">{}</text>"#,
        x0 + w / 2.0,
        escape(&p.title)
    );
    // Grid and y ticks: quarters, or each power of ten on a log axis.
    let yticks: Vec<f64> = if p.log_y {
        (ymin as i32..=ymax as i32).map(|k| 10f64.powi(k)).collect()
    } else {
        (0..=4).map(|k| ymax * k as f64 / 4.0).collect()
    };
    for y in yticks {
        let py = sy(y);
        let _ = writeln!(
            svg,
            r##"<line x1="{}" y1="{py}" x2="{}" y2="{py}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            x0 + left,
            x0 + left + pw,
            x0 + left - 6.0,
            py + 4.0,
            short(y)
        );
    }
    // X ticks as given, or at each distinct x.
    let xticks: Vec<(f64, String)> = if p.x_ticks.is_empty() {
        let mut xs: Vec<f64> = p
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        xs.into_iter().map(|x| (x, short(x))).collect()
    } else {
        p.x_ticks.clone()
    };
    for (x, label) in xticks {
        // Given ticks outside the data would fall off the panel.
        if !(xmin - 1e-9..=xmax + 1e-9).contains(&tx(x)) {
            continue;
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            sx(x),
            top + ph + 16.0,
            escape(&label)
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##,
        x0 + left
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        x0 + left + pw / 2.0,
        top + ph + 32.0,
        escape(&p.x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate({},{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        x0 + 14.0,
        top + ph / 2.0,
        escape(&p.y_label)
    );
    for (i, s) in p.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        for &(x, y) in &s.points {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                sx(x),
                sy(y)
            );
        }
        // Legend below the axis label.
        let lx = x0 + left + (i as f64) * (pw / p.series.len().max(1) as f64);
        let ly = h - 10.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{lx}" y="{}" width="10" height="10" fill="{color}"/><text x="{}" y="{ly}">{}</text>"#,
            ly - 9.0,
            lx + 14.0,
            escape(&s.name)
        );
    }
}

fn bounds(it: impl Iterator<Item = f64>) -> (f64, f64) {
    it.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

/// Rounds up to 1, 2, 2.5 or 5 times a power of ten, for readable axis ticks.
fn nice_ceiling(v: f64) -> f64 {
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

/// A number as axis ticks and legends print it: `950`, `2.5k`, `17k`.
pub fn short(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_well_formed_document() {
        let svg = render(&[Panel::new(
            "req/s",
            "concurrency",
            "req/s",
            vec![Series {
                name: "lb <1>".into(),
                points: vec![(1.0, 100.0), (2.0, 180.0)],
            }],
        )]);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("lb &lt;1&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 1);
    }

    #[test]
    fn log_axes_tick_at_powers_of_ten() {
        let mut panel = Panel::new(
            "latency",
            "offered req/s",
            "µs",
            vec![Series {
                name: "lb".into(),
                points: vec![(1000.0, 80.0), (8000.0, 2500.0)],
            }],
        );
        panel.log_x = true;
        panel.log_y = true;
        let svg = render(&[panel]);
        // 80 .. 2500 µs spans the decades 10 .. 10000: ticks 10, 100, 1.0k, 10k.
        for tick in [">10<", ">100<", ">1.0k<", ">10k<"] {
            assert!(svg.contains(tick), "no tick {tick}");
        }
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(1800.0), 2000.0);
        assert_eq!(nice_ceiling(2100.0), 2500.0);
    }
}
