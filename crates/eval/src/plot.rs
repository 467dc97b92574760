//! The sweep's plots, as SVG: its metric (test accuracy, or a language model's validation loss)
//! against threads, and throughput with parallel efficiency against threads.
//!
//! Thread counts sit at evenly spaced positions on the x axis (1, 2, 4, 8 read better evenly
//! spaced than on a linear axis); each seed's runs are shifted a little sideways so that equal
//! values stay visible. Text is plain ASCII: the SVG holds `<text>` elements, no font files.

use std::error::Error;
use std::ops::Range;
use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::EvalError;
use crate::report::{Metric, Report, ReportRow, ThreadSummary, capitalized, thousands};

/// What drawing gives: `T`, or plotters' error, boxed.
type DrawResult<T = ()> = Result<T, Box<dyn Error>>;

/// A part of an SVG plot, in pixels; `'a` the plot's file path's lifetime.
type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

const FONT: &str = "sans-serif";
const MEAN_COLOR: RGBColor = RGBColor(20, 20, 20);
const REFERENCE_COLOR: RGBColor = RGBColor(120, 120, 120);

/// A seed's colour: distinct, dark enough on white.
fn seed_color(seed: u64) -> RGBColor {
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
    ];
    COLORS[(seed % COLORS.len() as u64) as usize]
}

/// The seeds shown one by one in a legend; more than this share one entry.
const LEGEND_SEEDS: u64 = 6;

/// One chart: per-seed points, their mean across seeds, optional min-max bars.
struct Panel {
    caption: Option<String>,
    y_desc: String,
    y_range: Range<f64>,
    /// (thread position, seed, value)
    points: Vec<(usize, u64, f64)>,
    /// (thread position, mean, label above the point)
    mean: Vec<(usize, f64, Option<String>)>,
    /// (thread position, min, max)
    spread: Vec<(usize, f64, f64)>,
    /// A horizontal reference line: (value, legend).
    reference: Option<(f64, String)>,
    y_decimals: usize,
}

/// The x axis: thread counts at positions 0, 1, 2, ... with a tick at each.
struct ThreadAxis {
    positions: usize,
    inner: RangedCoordf64,
}

impl ThreadAxis {
    fn new(positions: usize) -> Self {
        Self {
            positions,
            inner: (-0.5..positions as f64 - 0.5).into(),
        }
    }
}

impl Ranged for ThreadAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            return vec![];
        }
        (0..self.positions).map(|i| i as f64).collect()
    }

    fn range(&self) -> Range<f64> {
        self.inner.range()
    }
}

/// Where a seed's points sit beside their thread count: to the left of it, in seed order, so
/// that the mean, its bar and its label at and right of the tick stay clear.
fn offset(seed: u64, seeds: u64) -> f64 {
    let step = (0.24 / seeds.max(1) as f64).min(0.06);
    -0.08 - (seeds.saturating_sub(1) - seed.min(seeds.saturating_sub(1))) as f64 * step
}

/// Half the width of a min-max bar's caps, in thread positions.
const CAP: f64 = 0.06;

/// Width of the legend column right of each chart, in pixels.
const LEGEND_WIDTH: u32 = 230;

/// One line of a legend: its mark and its words.
type LegendEntry = (Mark, String);

/// The mark of a legend line.
enum Mark {
    Dot(RGBColor),
    Line,
    Dashed,
    Bar,
}

/// Draws the legend entries in a box at the top of `area` (pixel coordinates).
fn draw_legend(area: &Area<'_>, top: i32, entries: &[LegendEntry]) -> DrawResult {
    if entries.is_empty() {
        return Ok(());
    }
    let row = 26;
    let (width, _) = area.dim_in_pixel();
    let bottom = top + 12 + row * entries.len() as i32;
    area.draw(&Rectangle::new(
        [(4, top), (width as i32 - 12, bottom)],
        RGBColor(170, 170, 170).stroke_width(1),
    ))?;
    let text = (FONT, 16)
        .into_font()
        .color(&BLACK)
        .pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Left,
            plotters::style::text_anchor::VPos::Center,
        ));
    for (k, (mark, label)) in entries.iter().enumerate() {
        let y = top + 6 + row / 2 + row * k as i32;
        let (x0, x1) = (16, 44);
        match mark {
            Mark::Dot(color) => area.draw(&Circle::new((30, y), 6, color.filled()))?,
            Mark::Line => {
                area.draw(&PathElement::new(
                    [(x0, y), (x1, y)],
                    MEAN_COLOR.stroke_width(3),
                ))?;
                area.draw(&Circle::new((30, y), 7, MEAN_COLOR.stroke_width(3)))?;
            }
            Mark::Dashed => {
                for x in [x0, x0 + 11, x0 + 22] {
                    area.draw(&PathElement::new(
                        [(x, y), (x + 6, y)],
                        REFERENCE_COLOR.stroke_width(2),
                    ))?;
                }
            }
            Mark::Bar => {
                let bar = MEAN_COLOR.stroke_width(2);
                area.draw(&PathElement::new([(30, y - 9), (30, y + 9)], bar))?;
                area.draw(&PathElement::new([(24, y - 9), (36, y - 9)], bar))?;
                area.draw(&PathElement::new([(24, y + 9), (36, y + 9)], bar))?;
            }
        }
        area.draw(&Text::new(label.clone(), (54, y), text.clone()))?;
    }
    Ok(())
}

/// A panel's chart: thread positions across, the panel's values up.
type PanelChart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<ThreadAxis, RangedCoordf64>>;

/// One panel: its chart left, the legend of what it shows right.
fn draw_panel(area: &Area<'_>, threads: &[usize], seeds: u64, panel: &Panel) -> DrawResult {
    let (width, _) = area.dim_in_pixel();
    let (plot_area, legend_area) = area.split_horizontally(width.saturating_sub(LEGEND_WIDTH));
    let mut chart = panel_chart(&plot_area, threads, panel)?;
    let mut legend = Vec::new();
    legend.extend(draw_reference(&mut chart, threads.len(), panel)?);
    legend.extend(draw_spread(&mut chart, panel)?);
    legend.extend(draw_means(&mut chart, threads.len(), panel)?);
    legend.extend(draw_seed_points(&mut chart, seeds, panel)?);
    // The legend's box starts level with the chart, below the caption when there is one.
    let top = if panel.caption.is_some() { 50 } else { 16 };
    draw_legend(&legend_area, top, &legend)
}

/// The panel's axes, caption and grid.
fn panel_chart<'a, 'b>(
    area: &'a Area<'b>,
    threads: &[usize],
    panel: &Panel,
) -> DrawResult<PanelChart<'a, 'b>> {
    let n = threads.len();
    let mut builder = ChartBuilder::on(area);
    if let Some(caption) = &panel.caption {
        builder.caption(caption, (FONT, 21));
    }
    let mut chart = builder
        .margin(16)
        .margin_right(8)
        .x_label_area_size(56)
        .y_label_area_size(84)
        .build_cartesian_2d(ThreadAxis::new(n), panel.y_range.clone())?;
    let label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
            threads[i as usize].to_string()
        } else {
            String::new()
        }
    };
    let decimals = panel.y_decimals;
    chart
        .configure_mesh()
        .x_desc("threads")
        .y_desc(panel.y_desc.as_str())
        .x_label_formatter(&label)
        .y_label_formatter(&|y: &f64| match decimals {
            0 => thousands(*y),
            _ => format!("{y:.decimals$}"),
        })
        .y_labels(8)
        .axis_desc_style((FONT, 18))
        .label_style((FONT, 16))
        .light_line_style(TRANSPARENT)
        .bold_line_style(RGBColor(220, 220, 220))
        .draw()?;
    Ok(chart)
}

/// The panel's horizontal reference line, dashed across every position.
fn draw_reference(
    chart: &mut PanelChart<'_, '_>,
    positions: usize,
    panel: &Panel,
) -> DrawResult<Option<LegendEntry>> {
    let Some((value, text)) = &panel.reference else {
        return Ok(None);
    };
    chart.draw_series(DashedLineSeries::new(
        [(-0.5, *value), (positions as f64 - 0.5, *value)],
        8,
        6,
        REFERENCE_COLOR.stroke_width(2),
    ))?;
    Ok(Some((Mark::Dashed, text.clone())))
}

/// The min-max bars across seeds, with caps.
fn draw_spread(chart: &mut PanelChart<'_, '_>, panel: &Panel) -> DrawResult<Option<LegendEntry>> {
    if panel.spread.is_empty() {
        return Ok(None);
    }
    let bar = MEAN_COLOR.stroke_width(2);
    chart.draw_series(panel.spread.iter().map(|&(i, lo, hi)| {
        let x = i as f64;
        PathElement::new([(x, lo), (x, hi)], bar)
    }))?;
    chart.draw_series(panel.spread.iter().flat_map(|&(i, lo, hi)| {
        let x = i as f64;
        [lo, hi].map(|y| PathElement::new([(x - CAP, y), (x + CAP, y)], bar))
    }))?;
    Ok(Some((Mark::Bar, "min-max across seeds".to_string())))
}

/// The mean across seeds: a line through circles, each labelled where the panel has a label.
fn draw_means(
    chart: &mut PanelChart<'_, '_>,
    positions: usize,
    panel: &Panel,
) -> DrawResult<Option<LegendEntry>> {
    if panel.mean.is_empty() {
        return Ok(None);
    }
    let style = MEAN_COLOR.stroke_width(3);
    let means = || panel.mean.iter().map(|&(i, m, _)| (i as f64, m));
    chart.draw_series(LineSeries::new(means(), style))?;
    chart.draw_series(means().map(|point| Circle::new(point, 7, style)))?;
    // The label sits right of the mean and above it, clear of the line and the bar's caps.
    let text = (FONT, 17).into_font().color(&MEAN_COLOR);
    let unit = chart.plotting_area().dim_in_pixel().0 as f64 / positions.max(1) as f64;
    let dx = (CAP * unit) as i32 + 10;
    chart.draw_series(panel.mean.iter().filter_map(|(i, m, label)| {
        label.as_ref().map(|l| {
            EmptyElement::at((*i as f64, *m)) + Text::new(l.clone(), (dx, -26), text.clone())
        })
    }))?;
    Ok(Some((Mark::Line, "mean across seeds".to_string())))
}

/// Each seed's values, a dot each in the seed's colour, shifted sideways by seed; one legend
/// entry per seed, or one for all when there are more than [`LEGEND_SEEDS`].
fn draw_seed_points(
    chart: &mut PanelChart<'_, '_>,
    seeds: u64,
    panel: &Panel,
) -> DrawResult<Vec<LegendEntry>> {
    let mut legend = Vec::new();
    // The seeds with points, not 0..seeds: an interrupted sweep may have planned billions.
    let with_points: std::collections::BTreeSet<u64> = panel.points.iter().map(|p| p.1).collect();
    for seed in with_points {
        let color = seed_color(seed);
        let points: Vec<(f64, f64)> = panel
            .points
            .iter()
            .filter(|p| p.1 == seed)
            .map(|&(i, s, v)| (i as f64 + offset(s, seeds), v))
            .collect();
        let dot = |&p: &(f64, f64)| Circle::new(p, 6, color.mix(0.85).filled());
        chart.draw_series(points.iter().map(dot))?;
        if seeds <= LEGEND_SEEDS {
            legend.push((Mark::Dot(color), format!("seed {seed}")));
        } else if legend.is_empty() {
            legend.push((Mark::Dot(color), format!("a run (seeds 0-{})", seeds - 1)));
        }
    }
    Ok(legend)
}

/// A range around the values with some room above and below; at least `min_span` wide.
fn padded(values: impl Iterator<Item = f64>, min_span: f64) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return 0.0..1.0;
    }
    let span = (hi - lo).max(min_span);
    let middle = (hi + lo) / 2.0;
    (middle - span * 0.65)..(middle + span * 0.65)
}

fn position(report: &Report, threads: usize) -> Option<usize> {
    report.plan.threads.iter().position(|&t| t == threads)
}

fn config_name(report: &Report) -> String {
    Path::new(&report.plan.config).file_name().map_or_else(
        || report.plan.config.clone(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// The verdict in a few ASCII words, for a plot's subtitle.
fn verdict_words(report: &Report) -> String {
    use crate::report::Outcome;
    let (v, metric) = (&report.verdict, report.metric);
    match v.outcome {
        Outcome::Identical => "identical weights at every thread count, for each seed".to_string(),
        Outcome::Different => format!(
            "weights differ across thread counts ({} run{}); {} spread across threads {}{}",
            v.runs_differing,
            if v.runs_differing == 1 { "" } else { "s" },
            metric.short_name(),
            metric.show_difference(v.accuracy_spread_across_threads.unwrap_or(0.0)),
            v.accuracy_spread_across_seeds.map_or(
                ", across seeds unknown".to_string(),
                |s| format!(", across seeds {}", metric.show_difference(s))
            )
        ),
        Outcome::Inconclusive => "nothing to compare across thread counts".to_string(),
    }
}

/// Draws a title and a grey subtitle at the top of `area`; returns the area below them.
fn titled<'a>(area: &Area<'a>, title: &str, subtitle: &str) -> DrawResult<Area<'a>> {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let (width, _) = area.dim_in_pixel();
    let centre = Pos::new(HPos::Center, VPos::Center);
    let x = width as i32 / 2;
    area.draw(&Text::new(
        title.to_string(),
        (x, 24),
        (FONT, 26).into_font().color(&BLACK).pos(centre),
    ))?;
    area.draw(&Text::new(
        subtitle.to_string(),
        (x, 56),
        (FONT, 17)
            .into_font()
            .color(&RGBColor(80, 80, 80))
            .pos(centre),
    ))?;
    Ok(area.split_vertically(72).1)
}

/// `accuracy.svg` or `val_loss.svg` ([`Metric::plot_file`]): the sweep's metric against
/// threads, a point per seed, the mean and the min-max spread across seeds.
pub fn metric_svg(report: &Report, path: &Path) -> Result<(), EvalError> {
    draw_metric(report, path).map_err(|e| EvalError::write(path, e))
}

fn draw_metric(report: &Report, path: &Path) -> DrawResult {
    let root = SVGBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let body = titled(
        &root,
        &format!(
            "{} by thread count - {}",
            capitalized(report.metric.name()),
            config_name(report)
        ),
        &verdict_words(report),
    )?;
    draw_panel(
        &body,
        &report.plan.threads,
        report.plan.seeds,
        &metric_panel(report),
    )?;
    root.present()?;
    Ok(())
}

/// How the metric sits on a plot's y axis.
struct MetricAxis {
    /// Plotted value per value: accuracy in percent.
    scale: f64,
    /// The narrowest span of the axis, in plotted values: equal values still get a scale.
    min_span: f64,
    /// The labels' decimals for the axis's span.
    decimals: fn(f64) -> usize,
}

impl MetricAxis {
    fn of(metric: Metric) -> Self {
        match metric {
            Metric::Accuracy => Self {
                scale: 100.0,
                min_span: 1.0,
                decimals: |span| if span > 4.0 { 1 } else { 2 },
            },
            // Runs whose losses differ by rounding alone still get an axis of 0.01 or more, whose
            // ticks need 3 decimals.
            Metric::ValLoss => Self {
                scale: 1.0,
                min_span: 0.01,
                decimals: |span| if span > 0.4 { 2 } else { 3 },
            },
        }
    }
}

/// Each run's metric, the mean across seeds (labelled) and its min-max bar.
fn metric_panel(report: &Report) -> Panel {
    let metric = report.metric;
    let axis = MetricAxis::of(metric);
    let points = run_points(report, |r| Some(metric.value(&r.run) * axis.scale));
    let y_range = padded(points.iter().map(|p| p.2), axis.min_span);
    let y_decimals = (axis.decimals)(y_range.end - y_range.start);
    let mean =
        by_position(report).map(|(i, t)| (i, t.mean * axis.scale, Some(metric.show(t.mean))));
    let spread = by_position(report)
        .filter(|(_, t)| t.runs >= 2)
        .map(|(i, t)| (i, t.min * axis.scale, t.max * axis.scale));
    Panel {
        caption: None,
        y_desc: format!("{} ({})", metric.name(), metric.unit()),
        y_range,
        mean: mean.collect(),
        spread: spread.collect(),
        points,
        reference: None,
        y_decimals,
    }
}

/// `(thread position, seed, value)` of every run of the sweep's thread counts with a value.
fn run_points(
    report: &Report,
    value: impl Fn(&ReportRow) -> Option<f64>,
) -> Vec<(usize, u64, f64)> {
    let point = |r: &ReportRow| Some((position(report, r.run.threads)?, r.run.seed, value(r)?));
    report.runs.iter().filter_map(point).collect()
}

/// Each thread count's summary, with its position on the x axis.
fn by_position(report: &Report) -> impl Iterator<Item = (usize, &ThreadSummary)> {
    report
        .by_threads
        .iter()
        .filter_map(|t| Some((position(report, t.threads)?, t)))
}

/// `throughput.svg`: samples/s against threads (top) and parallel efficiency (bottom).
pub fn throughput_svg(report: &Report, path: &Path) -> Result<(), EvalError> {
    draw_throughput(report, path).map_err(|e| EvalError::write(path, e))
}

fn draw_throughput(report: &Report, path: &Path) -> DrawResult {
    let root = SVGBackend::new(path, (1000, 1100)).into_drawing_area();
    root.fill(&WHITE)?;
    let b = report.baseline_threads;
    let body = titled(
        &root,
        &format!(
            "Training throughput by thread count - {}",
            config_name(report)
        ),
        &format!(
            "speed-up and parallel efficiency against {b} thread{} of the same seed",
            if b == 1 { "" } else { "s" }
        ),
    )?;
    let (top, bottom) = body.split_vertically(510);
    let (threads, seeds) = (&report.plan.threads, report.plan.seeds);
    draw_panel(&top, threads, seeds, &speed_panel(report))?;
    draw_panel(&bottom, threads, seeds, &efficiency_panel(report))?;
    root.present()?;
    Ok(())
}

/// Each run's samples/s and their mean across seeds, labelled with the mean speed-up.
fn speed_panel(report: &Report) -> Panel {
    let points = run_points(report, |r| Some(r.run.samples_per_second));
    let top_speed = points.iter().map(|p| p.2).fold(0.0, f64::max);
    let mean = by_position(report).map(|(i, t)| {
        let label = t.mean_speedup.map(|s| format!("{s:.2}x"));
        (i, t.mean_samples_per_second, label)
    });
    Panel {
        caption: Some("Samples per second (labels: mean speed-up)".into()),
        y_desc: "training samples / s".into(),
        y_range: 0.0..(top_speed * 1.2).max(1.0),
        mean: mean.collect(),
        spread: vec![],
        points,
        reference: None,
        y_decimals: 0,
    }
}

/// Each run's parallel efficiency and their mean across seeds, against the ideal 100%.
fn efficiency_panel(report: &Report) -> Panel {
    let points = run_points(report, |r| Some(r.efficiency? * 100.0));
    let top_efficiency = points.iter().map(|p| p.2).fold(100.0, f64::max);
    let mean = by_position(report).filter_map(|(i, t)| {
        let e = t.mean_efficiency? * 100.0;
        Some((i, e, Some(format!("{e:.0}%"))))
    });
    Panel {
        caption: Some(format!(
            "Parallel efficiency = speed-up / (threads / {}) (labels: mean)",
            report.baseline_threads
        )),
        y_desc: "parallel efficiency (%)".into(),
        y_range: 0.0..top_efficiency * 1.15,
        mean: mean.collect(),
        spread: vec![],
        points,
        reference: Some((100.0, "ideal (100%)".into())),
        y_decimals: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{RunRecord, SweepPlan, build_report};

    #[test]
    fn plots_are_svg_with_titles_and_axis_labels() {
        let run = |threads: usize, seed: u64, accuracy: f64, speed: f64| RunRecord {
            threads,
            seed,
            test_accuracy: accuracy,
            test_loss: 0.3,
            train_loss: 0.2,
            samples_per_second: speed,
            val_loss: None,
            tokens_per_second: None,
            cpu_utilization: 0.95,
            wall_seconds: 2.0,
            train_seconds: 1.5,
            weights_sha256: format!("hash{seed}"),
            max_weight_diff: Some(0.0),
            run_dir: String::new(),
        };
        let plan = SweepPlan {
            config: "examples/digits.toml".into(),
            threads: vec![1, 2, 4],
            seeds: 2,
            overrides: vec![],
            threads_available: 4,
        };
        let runs = vec![
            run(1, 0, 0.91, 1000.0),
            run(2, 0, 0.91, 1800.0),
            run(4, 0, 0.91, 3000.0),
            run(1, 1, 0.93, 1000.0),
            run(2, 1, 0.93, 1900.0),
            run(4, 1, 0.93, 3100.0),
        ];
        let report = build_report(plan, runs, vec![]);
        let dir = tempfile::tempdir().unwrap();
        let accuracy = dir.path().join("accuracy.svg");
        let throughput = dir.path().join("throughput.svg");
        metric_svg(&report, &accuracy).unwrap();
        throughput_svg(&report, &throughput).unwrap();

        let svg = std::fs::read_to_string(&accuracy).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        for text in [
            "Test accuracy by thread count - digits.toml",
            "test accuracy (%)",
            "threads",
            "seed 1",
            "min-max across seeds",
            "92.00%",
            "identical weights at every thread count",
        ] {
            assert!(svg.contains(text), "accuracy.svg lacks {text}");
        }
        let svg = std::fs::read_to_string(&throughput).unwrap();
        for text in [
            "Training throughput by thread count - digits.toml",
            "Samples per second (labels: mean speed-up)",
            "training samples / s",
            "parallel efficiency (%)",
            "ideal (100%)",
            "3.05x",
            "76%",
        ] {
            assert!(svg.contains(text), "throughput.svg lacks {text}");
        }
    }

    /// A language model's sweep plots its validation loss, unscaled, in 3 decimals where the runs
    /// differ in the 2nd.
    #[test]
    fn a_language_models_plot_shows_validation_loss() {
        let run = |threads: usize, seed: u64, loss: f64, hash: &str| RunRecord {
            threads,
            seed,
            test_accuracy: 0.42,
            test_loss: loss,
            train_loss: 2.1,
            samples_per_second: 100.0,
            val_loss: Some(loss),
            tokens_per_second: Some(1600.0),
            cpu_utilization: 0.95,
            wall_seconds: 2.0,
            train_seconds: 1.5,
            weights_sha256: hash.into(),
            max_weight_diff: Some(1e-6),
            run_dir: String::new(),
        };
        let plan = SweepPlan {
            config: "examples/shakespeare-gpt.toml".into(),
            threads: vec![1, 2],
            seeds: 2,
            overrides: vec![],
            threads_available: 2,
        };
        let runs = vec![
            run(1, 0, 1.9300, "a"),
            run(2, 0, 1.9340, "b"),
            run(1, 1, 1.9800, "c"),
            run(2, 1, 1.9800, "c"),
        ];
        let report = build_report(plan, runs, vec![]);
        assert_eq!(report.metric, Metric::ValLoss);
        assert_eq!(report.metric.plot_file(), "val_loss.svg");

        let panel = metric_panel(&report);
        assert_eq!(panel.y_desc, "validation loss (nats per character)");
        let points: Vec<f64> = panel.points.iter().map(|p| p.2).collect();
        assert_eq!(points, [1.93, 1.934, 1.98, 1.98]);
        assert_eq!(panel.mean[0].2.as_deref(), Some("1.9550"));
        assert_eq!(panel.mean[1].2.as_deref(), Some("1.9570"));
        assert_eq!(panel.spread, [(0, 1.93, 1.98), (1, 1.934, 1.98)]);
        // 0.05 of spread, padded to 0.065: labels in 3 decimals.
        assert_eq!(panel.y_decimals, 3);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("val_loss.svg");
        metric_svg(&report, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for text in [
            "Validation loss by thread count - shakespeare-gpt.toml",
            "validation loss (nats per character)",
            "weights differ across thread counts (1 run); validation loss spread across threads \
             0.0040, across seeds 0.0500",
            "1.9570",
            "min-max across seeds",
        ] {
            assert!(svg.contains(text), "val_loss.svg lacks {text}");
        }
        assert!(!svg.contains("accuracy"), "{svg}");
    }

    #[test]
    fn an_unwritable_path_is_a_one_line_error() {
        let report = build_report(
            SweepPlan {
                config: "c.toml".into(),
                threads: vec![1],
                seeds: 1,
                overrides: vec![],
                threads_available: 1,
            },
            vec![],
            vec![],
        );
        let err = metric_svg(&report, Path::new("/nonexistent/dir/a.svg")).unwrap_err();
        assert!(
            err.to_string().starts_with("/nonexistent/dir/a.svg"),
            "{err}"
        );
        assert!(!err.is_bad_input());
    }
}
