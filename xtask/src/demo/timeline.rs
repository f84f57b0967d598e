//! The demo's timeline as an SVG: bytes and charges per viewer over time,
//! as meterd's status API showed them once a second, with the pause, the
//! early leave and the cut-off marked. Drawn with plotters' SVG backend, as
//! the benchmark plots are (`bench/plot.rs`): text goes into the SVG for
//! the viewer to render, so no fonts are needed.
//!
//! Does not own: the samples (the demo takes them).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

const FONT: &str = "sans-serif";

/// One colour per viewer (matplotlib's tab10, without its grey).
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(214, 39, 40),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// (seconds, value) pairs.
pub type Points = Vec<(f64, f64)>;

/// One viewer's line.
#[derive(Clone, Debug, Default)]
pub struct Line {
    /// The legend entry.
    pub label: String,
    /// (seconds, bytes sent to it so far).
    pub bytes: Points,
    /// (seconds, cents charged so far).
    pub cents: Points,
    /// When it paused and resumed.
    pub paused: Option<(f64, f64)>,
    /// When it left or its player ended.
    pub ended: Option<f64>,
}

/// What the timeline marks besides the lines.
#[derive(Clone, Debug, Default)]
pub struct Marks {
    /// When an account's balance ran out, and its label.
    pub cut: Option<(f64, String)>,
    /// meterd's billing interval (seconds) at each poll.
    pub interval: Points,
    /// The right end of the time axis.
    pub end: f64,
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Draws `lines` into `path`.
pub fn draw(path: &Path, title: &str, lines: &[Line], marks: &Marks) -> Result<()> {
    draw_inner(path, title, lines, marks).map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}

fn draw_inner(
    path: &Path,
    title: &str,
    lines: &[Line],
    marks: &Marks,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1000, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, (FONT, 20))?;
    let (top, rest) = root.split_vertically(360);
    let (bottom, governor) = rest.split_vertically(360);
    panel(
        &top,
        lines,
        marks,
        |l| &l.bytes,
        1e6,
        "MB",
        "bytes sent to each viewer, as meterd counted them",
        true,
    )?;
    panel(
        &bottom,
        lines,
        marks,
        |l| &l.cents,
        1.0,
        "EUR cents",
        "charge per viewer: accrued each cycle, settled at the end of each viewing session",
        false,
    )?;
    interval(&governor, marks)?;
    root.present()?;
    Ok(())
}

/// meterd's billing interval: 1 s unless its governor widened it.
fn interval(area: &Area<'_>, marks: &Marks) -> Result<(), Box<dyn std::error::Error>> {
    let ymax = marks.interval.iter().map(|p| p.1).fold(2.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "meterd's billing interval: widened by its load governor under CPU pressure",
            (FONT, 15),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..marks.end.max(1.0), 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("seconds")
        .y_labels(4)
        .draw()?;
    // A step line: each value holds until the next poll.
    let mut steps = Vec::new();
    for w in marks.interval.windows(2) {
        steps.push(w[0]);
        steps.push((w[1].0, w[0].1));
    }
    steps.extend(marks.interval.last());
    chart.draw_series(LineSeries::new(steps, BLACK.stroke_width(2)))?;
    Ok(())
}

#[expect(
    clippy::too_many_arguments,
    reason = "one panel's settings, read at the call"
)]
fn panel(
    area: &Area<'_>,
    lines: &[Line],
    marks: &Marks,
    points: impl Fn(&Line) -> &Points,
    scale: f64,
    y_desc: &str,
    caption: &str,
    legend: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let ymax = lines
        .iter()
        .flat_map(|l| points(l).iter().map(|p| p.1 / scale))
        .fold(0.0_f64, f64::max)
        .max(1.0)
        * 1.12;
    let xmax = marks.end.max(1.0);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 15))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
    // Pauses shaded first, so that the grid and lines stay visible.
    for (line, color) in lines.iter().zip(COLORS.iter().cycle()) {
        if let Some((from, to)) = line.paused {
            chart.draw_series(std::iter::once(Rectangle::new(
                [(from, 0.0), (to, ymax)],
                color.mix(0.12).filled(),
            )))?;
        }
    }
    chart
        .configure_mesh()
        .x_desc("seconds since the first viewer started")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(y_desc)
        .draw()?;
    for (line, color) in lines.iter().zip(COLORS.iter().cycle()) {
        let color = *color;
        let pts: Vec<(f64, f64)> = points(line).iter().map(|&(t, y)| (t, y / scale)).collect();
        let series = chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?;
        if legend {
            series.label(&line.label).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        // A cross where it left, on its line.
        if let Some(end) = line.ended {
            let y = pts
                .iter()
                .take_while(|p| p.0 <= end + 1.0)
                .last()
                .map_or(0.0, |p| p.1);
            chart.draw_series(std::iter::once(Cross::new(
                (end, y),
                6,
                color.stroke_width(2),
            )))?;
        }
    }
    if let Some((at, label)) = &marks.cut {
        chart.draw_series(DashedLineSeries::new(
            [(*at, 0.0), (*at, ymax)],
            6,
            4,
            RED.stroke_width(2),
        ))?;
        chart.draw_series(std::iter::once(Text::new(
            label.clone(),
            (*at + xmax * 0.006, ymax * 0.96),
            (FONT, 13).into_font().color(&RED),
        )))?;
    }
    if legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 12))
            .draw()?;
    }
    Ok(())
}
