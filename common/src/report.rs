//! Building blocks of fedflow's self-contained HTML reports: text escaping and line charts
//! rendered server-side to inline SVG with `plotters`, so a report opens anywhere offline.

use std::fmt::Write as _;

use plotters::prelude::*;

use crate::{Error, Result};

/// `NaN` and infinities become `None`: what was not measured (or is garbage) is not a
/// figure, in a report or in a JSON document (where JSON has no NaN).
pub fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points (x, y), in x order.
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed (e.g. a budget line).
    pub dashed: bool,
}

/// Colours of successive series (colour-blind-safe Okabe–Ito palette).
const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

/// A line chart as an inline `<svg>` element (width × height pixels).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    size: (u32, u32),
) -> Result<String> {
    let err = |e: &dyn std::fmt::Display| Error::Report(format!("chart {title:?}: {e}"));
    let points = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) =
        (f64::INFINITY, f64::NEG_INFINITY, 0.0f64, f64::NEG_INFINITY);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1, y1) = (0.0, 1.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let y1 = y1 + 0.05 * (y1 - y0);
    let legend_at = legend_corner(series, (x0, x1), (y0, y1));
    // Whole-number x values (rounds) get whole-number ticks, at most ten.
    let integer_x = series
        .iter()
        .flat_map(|s| s.points.iter())
        .all(|p| p.0.fract() == 0.0);
    let x_ticks = if integer_x {
        (((x1 - x0).round() as usize) + 1).clamp(2, 10)
    } else {
        10
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_labels(x_ticks)
            .x_label_formatter(&|x| {
                if integer_x {
                    format!("{x:.0}")
                } else {
                    format!("{x}")
                }
            })
            .x_desc(x_label)
            .y_desc(y_label)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, s) in series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect();
            let style = ShapeStyle::from(&colour).stroke_width(2);
            let drawn = if s.dashed {
                chart.draw_series(DashedLineSeries::new(pts, 6, 4, style))
            } else {
                chart.draw_series(LineSeries::new(pts, style))
            };
            drawn
                .map_err(|e| err(&e))?
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
        }
        if series.len() > 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(legend_at)
                .draw()
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// The corner of the plot where the legend hides the fewest points: the quarter of the
/// plotting area (by axis range) that holds the fewest of them, upper left on ties.
fn legend_corner(series: &[Series], x: (f64, f64), y: (f64, f64)) -> SeriesLabelPosition {
    let mut counts = [0usize; 4]; // upper left, upper right, lower left, lower right
    let (xm, ym) = ((x.0 + x.1) / 2.0, (y.0 + y.1) / 2.0);
    for &(px, py) in series.iter().flat_map(|s| s.points.iter()) {
        if px.is_finite() && py.is_finite() {
            counts[usize::from(py < ym) * 2 + usize::from(px >= xm)] += 1;
        }
    }
    match (0..4).min_by_key(|&i| counts[i]).unwrap_or(0) {
        0 => SeriesLabelPosition::UpperLeft,
        1 => SeriesLabelPosition::UpperRight,
        2 => SeriesLabelPosition::LowerLeft,
        _ => SeriesLabelPosition::LowerRight,
    }
}

/// A simple HTML table: header cells and rows of already-escaped cell HTML.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::from("<table><thead><tr>");
    for h in header {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// The page around a report's body: inline CSS, no external resources.
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{CSS}</style></head><body>{body}</body></html>\n",
        escape(title)
    )
}

const CSS: &str = "body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;\
max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}\
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}\
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}\
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}\
.summary{background:#f6f9fc;border:1px solid #cfe0f0;padding:.8em 1.2em;border-radius:6px}\
.big{font-size:1.4em;font-weight:600}.warn{color:#a40}code{background:#f3f3f3;padding:0 .2em}\
pre{background:#f6f6f6;border:1px solid #e0e0e0;padding:.5em .8em;white-space:pre-wrap;\
overflow-wrap:anywhere;font-size:.85em}.small{color:#666;font-size:.85em}\
svg{max-width:100%;height:auto}";

#[cfg(test)]
mod tests {
    use super::*;

    /// The legend goes to the quarter of the plot with the fewest points.
    #[test]
    fn the_legend_avoids_the_lines() {
        let rising = Series {
            label: "a".into(),
            points: (0..10).map(|i| (f64::from(i), f64::from(i))).collect(),
            dashed: false,
        };
        // A rising line fills lower left and upper right: the legend goes upper left.
        let at = legend_corner(&[rising], (0.0, 9.0), (0.0, 9.0));
        assert!(matches!(at, SeriesLabelPosition::UpperLeft), "{at:?}");
        let high = Series {
            label: "b".into(),
            points: (0..10).map(|i| (f64::from(i), 8.5)).collect(),
            dashed: false,
        };
        let at = legend_corner(&[high], (0.0, 9.0), (0.0, 9.0));
        assert!(matches!(at, SeriesLabelPosition::LowerLeft), "{at:?}");
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn chart_is_an_svg_with_its_labels() {
        let svg = line_chart(
            "epsilon <spent>",
            "round",
            "epsilon",
            &[
                Series {
                    label: "spent".into(),
                    points: vec![(1.0, 0.5), (2.0, 0.9), (3.0, 1.2)],
                    dashed: false,
                },
                Series {
                    label: "limit".into(),
                    points: vec![(1.0, 2.0), (3.0, 2.0)],
                    dashed: true,
                },
            ],
            (640, 320),
        )
        .unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains("spent") && svg.contains("limit") && svg.contains("round"));
        assert!(svg.contains("&lt;spent&gt;"), "title must be escaped");
        // Empty series still render (a report of a ledger with no entries).
        assert!(
            line_chart("t", "x", "y", &[], (200, 100))
                .unwrap()
                .starts_with("<svg")
        );
    }
}
