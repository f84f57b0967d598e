//! SVG plots of the results, drawn with plotters' SVG backend only: no
//! system fonts are read (text goes into the SVG as `<text>` for the viewer
//! to render), so this builds and runs on a bare machine.
//!
//! Each function writes one file into the results dir and returns its name.

use std::path::Path;

use anyhow::Result;
use plotters::chart::DualCoordChartContext;
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::governor::{Cycle, Sample};
use super::scale::Point;

const FONT: &str = "sans-serif";
const BLUE_: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN_: RGBColor = RGBColor(44, 160, 44);
const RED_: RGBColor = RGBColor(214, 39, 40);
const PURPLE: RGBColor = RGBColor(148, 103, 189);
const GREY: RGBColor = RGBColor(235, 235, 235);

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn max_of(xs: impl IntoIterator<Item = f64>) -> f64 {
    xs.into_iter()
        .filter(|x| x.is_finite())
        .fold(f64::MIN_POSITIVE, f64::max)
}

fn min_of(xs: impl IntoIterator<Item = f64>) -> f64 {
    xs.into_iter()
        .filter(|x| x.is_finite() && *x > 0.0)
        .fold(f64::MAX, f64::min)
}

/// The span the ratio panel covers (points and target).
fn hi_span(ratios: &[f64], target: f64) -> f64 {
    max_of(ratios.iter().copied().chain([1.0])) - min_of(ratios.iter().copied().chain([target]))
}

fn index_points(ys: &[f64]) -> Vec<(f64, f64)> {
    ys.iter()
        .enumerate()
        .map(|(i, y)| ((i + 1) as f64, *y))
        .collect()
}

/// Throughput per pair, and the per-pair ratio with its median and target.
pub fn datapath(
    out: &Path,
    name: &str,
    title: &str,
    metered: &[f64],
    plain: &[f64],
    ratios: &[f64],
    target: f64,
) -> Result<String> {
    let path = out.join(name);
    let root = SVGBackend::new(&path, (960, 680)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(380);
    let n = metered.len().max(1) as f64;
    let x = 0.5..n + 0.5;

    let ymax = max_of(metered.iter().chain(plain).copied()) * 1.15;
    let mut chart = ChartBuilder::on(&top)
        .caption(title, (FONT, 18))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(x.clone(), 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("pair")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("Gbit/s")
        .draw()?;
    for (ys, color, label) in [
        (metered, RED_, "meterd attached"),
        (plain, BLUE_, "not attached (baseline)"),
    ] {
        let pts = index_points(ys);
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let med = super::host::median(ratios);
    let lo = min_of(ratios.iter().copied().chain([target])) - 0.02;
    // Headroom above the points for the legend.
    let hi = max_of(ratios.iter().copied().chain([1.0])) + 0.02 + (hi_span(ratios, target) * 0.35);
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            format!("metered / not attached per pair (median {med:.3})"),
            (FONT, 18),
        )
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(x, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("pair")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("ratio")
        .draw()?;
    let pts = index_points(ratios);
    chart
        .draw_series(pts.iter().map(|&p| Circle::new(p, 4, PURPLE.filled())))?
        .label("pair ratio")
        .legend(|(x, y)| Circle::new((x + 10, y), 4, PURPLE.filled()));
    chart
        .draw_series(LineSeries::new(
            [(0.5, med), (n + 0.5, med)],
            PURPLE.stroke_width(2),
        ))?
        .label("median")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], PURPLE.stroke_width(2)));
    chart
        .draw_series(DashedLineSeries::new(
            [(0.5, target), (n + 0.5, target)],
            6,
            4,
            BLACK.stroke_width(1),
        ))?
        .label(format!("target {target}"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(name.to_owned())
}

/// Full-read time against entries, log-log: batch and per-key.
pub fn mapread(out: &Path, points: &[(f64, f64, f64)], target_ms: f64) -> Result<String> {
    let name = "mapread.svg";
    let path = out.join(name);
    let root = SVGBackend::new(&path, (860, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let xs = points.iter().map(|p| p.0);
    let (xmin, xmax) = (min_of(xs.clone()) / 1.5, max_of(xs) * 1.5);
    let ys = points.iter().flat_map(|p| [p.1, p.2]);
    let (ymin, ymax) = (
        min_of(ys.clone()) / 2.0,
        max_of(ys.chain([target_ms])) * 2.0,
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Full read of a hash map like the old LIVE (u64 -> 24 B, max_entries 262144)",
            (FONT, 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale(), (ymin..ymax).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("live entries")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("ms per full read")
        .draw()?;
    series(
        &mut chart,
        points.iter().map(|p| (p.0, p.1)).collect(),
        GREEN_,
        "batch lookup (BatchReader)",
    )?;
    series(
        &mut chart,
        points.iter().map(|p| (p.0, p.2)).collect(),
        ORANGE,
        "per-key iteration (aya iter)",
    )?;
    chart
        .draw_series(DashedLineSeries::new(
            [(xmin, target_ms), (xmax, target_ms)],
            6,
            4,
            BLACK.stroke_width(1),
        ))?
        .label(format!("target {target_ms} ms (at 100k)"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(name.to_owned())
}

/// A line with markers and a legend entry.
fn series<'a, DB: DrawingBackend + 'a, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    pts: Vec<(f64, f64)>,
    color: RGBColor,
    label: &str,
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
    DB::ErrorType: 'static,
{
    let pts: Vec<(f64, f64)> = pts.into_iter().filter(|p| p.1.is_finite()).collect();
    chart
        .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    chart
        .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Cost and memory against open connections.
pub fn connections(out: &Path, points: &[Point]) -> Result<String> {
    let name = "connections.svg";
    let path = out.join(name);
    let root = SVGBackend::new(&path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(620);
    let xs = points.iter().map(|p| p.connections as f64);
    let (xmin, xmax) = (min_of(xs.clone()) / 1.5, max_of(xs) * 1.5);

    let ys = points.iter().flat_map(|p| {
        [
            p.cycle_ms,
            p.ss_ms,
            p.live_batch_ms.unwrap_or(f64::NAN),
            p.live_iter_ms.unwrap_or(f64::NAN),
        ]
    });
    let (ymin, ymax) = (min_of(ys.clone()) / 2.0, max_of(ys) * 2.0);
    let mut chart = ChartBuilder::on(&left)
        .caption("Cost of one read of all connections", (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale(), (ymin..ymax).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("open connections")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("ms")
        .draw()?;
    let pick = |f: &dyn Fn(&Point) -> Option<f64>| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter_map(|p| Some((p.connections as f64, f(p)?)))
            .collect()
    };
    series(
        &mut chart,
        pick(&|p| Some(p.cycle_ms)),
        RED_,
        "meterd read + billing cycle",
    )?;
    series(
        &mut chart,
        pick(&|p| Some(p.ss_ms)),
        BLUE_,
        "ss -tin (sock_diag)",
    )?;
    series(
        &mut chart,
        pick(&|p| p.live_batch_ms),
        GREEN_,
        "LIVE array mapped read",
    )?;
    series(
        &mut chart,
        pick(&|p| p.live_iter_ms),
        ORANGE,
        "LIVE array batch lookup",
    )?;
    legend(&mut chart)?;

    let mems = points.iter().flat_map(|p| [mib(p.vm_hwm), mib(p.vm_rss)]);
    let ymax = max_of(mems.chain([64.0])) * 1.2;
    let mut chart = ChartBuilder::on(&right)
        .caption("meterd memory", (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("open connections")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("MiB")
        .draw()?;
    series(
        &mut chart,
        pick(&|p| Some(mib(p.vm_hwm))),
        RED_,
        "peak RSS (VmHWM)",
    )?;
    series(
        &mut chart,
        pick(&|p| Some(mib(p.vm_rss))),
        PURPLE,
        "RSS (VmRSS)",
    )?;
    chart
        .draw_series(DashedLineSeries::new(
            [(xmin, 64.0), (xmax, 64.0)],
            6,
            4,
            BLACK.stroke_width(1),
        ))?
        .label("target 64 MiB at 100k")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    legend(&mut chart)?;
    root.present()?;
    Ok(name.to_owned())
}

fn legend<'a, DB: DrawingBackend + 'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}

/// A step line: each value holds until the next sample.
fn steps(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(pts.len() * 2);
    for w in pts.windows(2) {
        out.push(w[0]);
        out.push((w[1].0, w[0].1));
    }
    if let Some(&last) = pts.last() {
        out.push(last);
    }
    out
}

/// The time axis of a timeline's panels and the loaded stretch of it.
#[derive(Clone, Copy)]
struct Span {
    tmax: f64,
    load_start: f64,
    load_end: f64,
    /// Room on the right for an axis of the load panel's own (on every
    /// panel, so that their time axes line up).
    right_axis: bool,
}

/// A timeline panel: time against a left axis, and a right one that only
/// the load panel may use.
type Panel<'a, 'b> = DualCoordChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<RangedCoordf64, RangedCoordf64>,
    Cartesian2d<RangedCoordf64, RangedCoordf64>,
>;

/// One panel of the timeline, the loaded stretch shaded; `right` (top,
/// description) draws its right-hand axis.
fn panel<'a, 'b>(
    area: &'a Area<'b>,
    span: Span,
    ymax: f64,
    y_desc: &str,
    caption: &str,
    right: Option<(f64, &str)>,
) -> Result<Panel<'a, 'b>> {
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, (FONT, 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60);
    if span.right_axis {
        builder.right_y_label_area_size(60);
    }
    let mut chart = builder.build_cartesian_2d(0.0..span.tmax, 0.0..ymax)?;
    // The shading first, so the grid stays visible over it.
    chart.draw_series(std::iter::once(Rectangle::new(
        [(span.load_start, 0.0), (span.load_end, ymax)],
        GREY.filled(),
    )))?;
    // The right-hand label area goes to the secondary axis, so the mesh
    // labels the left one only.
    let top = right.map_or(ymax, |r| r.0);
    let mut chart = chart.set_secondary_coord(0.0..span.tmax, 0.0..top);
    chart
        .configure_mesh()
        .x_desc("seconds")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(y_desc)
        .draw()?;
    if let Some((_, desc)) = right {
        chart
            .configure_secondary_axes()
            .y_desc(desc)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
    }
    Ok(chart)
}

/// What loaded the machine, drawn as steps in the load panel next to the
/// CPU pressure.
struct LoadLine<'a> {
    label: &'a str,
    /// (seconds, value) at each change.
    points: Vec<(f64, f64)>,
    /// A right-hand axis of its own, (top, description); `None`: on the
    /// pressure's share axis.
    axis: Option<(f64, &'a str)>,
}

/// A timeline of load, interval and cycle time, as in the patent's figure 4.
struct Timeline<'a> {
    /// The file, in the results dir.
    name: &'a str,
    title: &'a str,
    load_caption: &'a str,
    /// Top of the load panel's share axis.
    share_max: f64,
    load: LoadLine<'a>,
    /// The loaded stretch (shaded), seconds from and to.
    loaded: (f64, f64),
}

/// The governor's timeline during a stress-ng ramp (figure 4).
pub fn governor(
    out: &Path,
    samples: &[Sample],
    cycles: &[Cycle],
    cpus: usize,
    load_end: f64,
) -> Result<String> {
    let load_start = samples.iter().find(|s| s.workers > 0).map_or(0.0, |s| s.t);
    let workers = samples
        .iter()
        .map(|s| (s.t, s.workers as f64 / cpus as f64))
        .collect();
    timeline(
        out,
        &Timeline {
            name: "governor.svg",
            title: "meterd load governor during a stress-ng ramp (figure 4)",
            load_caption: "load: stress-ng workers per core, and CPU pressure (PSI some share)",
            share_max: 2.3,
            load: LoadLine {
                label: "stress-ng workers / cores",
                points: workers,
                axis: None,
            },
            loaded: (load_start, load_end),
        },
        samples,
        cycles,
    )
}

/// The governor's timeline when billing itself overloads the agent:
/// `sessions` (seconds, sessions streaming from then on) drawn in
/// thousands; the traffic stops at the end of `loaded`.
pub fn billing_overload(
    out: &Path,
    samples: &[Sample],
    cycles: &[Cycle],
    sessions: &[(f64, usize)],
    loaded: (f64, f64),
) -> Result<String> {
    let tmax = samples.last().map_or(1.0, |s| s.t);
    let mut points: Vec<(f64, f64)> = sessions.iter().map(|&(t, n)| (t, n as f64 / 1e3)).collect();
    points.extend([(loaded.1, 0.0), (tmax, 0.0)]);
    let top = max_of(points.iter().map(|p| p.1)) * 1.15;
    timeline(
        out,
        &Timeline {
            name: "billing-overload.svg",
            title: "meterd load governor when billing itself overloads the agent (figure 4)",
            load_caption: "load: sessions streaming 2 KB/s (thousands, right axis), and CPU \
                           pressure (PSI some share)",
            share_max: 1.15,
            load: LoadLine {
                label: "sessions streaming (thousands)",
                points,
                axis: Some((top, "thousand sessions")),
            },
            loaded,
        },
        samples,
        cycles,
    )
}

/// The three panels: load, interval and cycle time.
fn timeline(
    out: &Path,
    fig: &Timeline<'_>,
    samples: &[Sample],
    cycles: &[Cycle],
) -> Result<String> {
    let path = out.join(fig.name);
    let root = SVGBackend::new(&path, (1000, 860)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(fig.title, (FONT, 22))?;
    let panels = root.split_evenly((3, 1));
    let span = Span {
        tmax: samples.last().map_or(1.0, |s| s.t),
        load_start: fig.loaded.0,
        load_end: fig.loaded.1,
        right_axis: fig.load.axis.is_some(),
    };

    // Load: the bench's own line and the CPU pressure meterd sees.
    let mut chart = panel(
        &panels[0],
        span,
        fig.share_max,
        "share",
        fig.load_caption,
        fig.load.axis,
    )?;
    let line = LineSeries::new(steps(&fig.load.points), BLACK.stroke_width(2));
    let drawn = if fig.load.axis.is_some() {
        chart.draw_secondary_series(line)
    } else {
        chart.draw_series(line)
    }?;
    drawn
        .label(fig.load.label)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    pressure(&mut chart, samples)?;
    legend(&mut *chart)?;

    let interval: Vec<(f64, f64)> = samples.iter().map(|s| (s.t, s.interval_s)).collect();
    let imax = max_of(interval.iter().map(|p| p.1)) * 1.25;
    let mut chart = panel(
        &panels[1],
        span,
        imax,
        "seconds",
        "billing interval (meterd_read_interval_seconds)",
        None,
    )?;
    chart
        .draw_series(LineSeries::new(steps(&interval), BLUE_.stroke_width(2)))?
        .label("interval")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE_.stroke_width(2)));
    legend(&mut *chart)?;

    let cyc: Vec<(f64, f64)> = cycles.iter().map(|c| (c.t, c.duration_ms)).collect();
    let cmax = max_of(cyc.iter().map(|p| p.1)) * 1.3;
    let mut chart = panel(
        &panels[2],
        span,
        cmax,
        "ms",
        "cycle time (read + billing; meterd_cycle_duration_seconds)",
        None,
    )?;
    chart
        .draw_series(LineSeries::new(cyc.clone(), GREEN_.stroke_width(1)))?
        .label("cycle duration")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN_.stroke_width(2)));
    chart.draw_series(cyc.into_iter().map(|p| Circle::new(p, 3, GREEN_.filled())))?;
    legend(&mut *chart)?;
    root.present()?;
    Ok(fig.name.to_owned())
}

/// The host's PSI share per poll and meterd's published pressure, on the
/// load panel's share axis.
fn pressure(
    chart: &mut ChartContext<'_, SVGBackend<'_>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    samples: &[Sample],
) -> Result<()> {
    let pressure: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| Some((s.t, s.cpu_pressure?)))
        .collect();
    // The host's PSI share over each poll period, as it happens.
    let psi: Vec<(f64, f64)> = samples
        .windows(2)
        .filter_map(|w| {
            let stalled = w[1].psi_some_us?.checked_sub(w[0].psi_some_us?)? as f64;
            let dt = w[1].t - w[0].t;
            (dt > 0.0).then(|| (w[1].t, (stalled / 1e6 / dt).min(1.0)))
        })
        .collect();
    chart
        .draw_series(LineSeries::new(psi, ORANGE.mix(0.7).stroke_width(1)))?
        .label("host PSI some share per 250 ms poll")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], ORANGE.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(steps(&pressure), RED_.stroke_width(2)))?
        .label("meterd_cpu_pressure_ratio (as published at cycle end)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED_.stroke_width(2)));
    Ok(())
}
