//! `loss_curve.png`: the run's name as title, train and validation loss
//! against step and, when the metrics have it, the routing balance, drawn
//! with `plotters` (bitmap backend, pure Rust). The title and labels need a
//! TrueType font: the first of [`FONT_PATHS`] that exists is used; without
//! one the curves are drawn without text (train blue, validation red,
//! balance green).

use moe_core::{MoeError, Result};
use moe_train::TrainEvent;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// Where a font for the labels is looked for (`MOE_PLOT_FONT` first).
pub const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// The series of a run, each a list of `(step, value)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossCurves {
    /// Training loss at each evaluation.
    pub train: Vec<(i64, f64)>,
    /// Validation loss at each evaluation.
    pub val: Vec<(i64, f64)>,
    /// Routing balance (the mean CV of expert loads over layers), if logged.
    pub balance: Vec<(i64, f64)>,
}

impl LossCurves {
    /// Reads the [`TrainEvent::Eval`] records of a `metrics.jsonl`: train
    /// and validation loss, and `load_cv`, the mean coefficient of
    /// variation of the experts' loads. Other records are skipped; a line
    /// that is not JSON, or an `eval` record that does not parse, is an
    /// error naming the line.
    pub fn from_jsonl(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| MoeError::io(path, e))?;
        let mut curves = LossCurves::default();
        for (i, line) in text.lines().enumerate() {
            let bad = |e: serde_json::Error| {
                MoeError::Data(format!("{} line {}: {e}", path.display(), i + 1))
            };
            let record: serde_json::Value = serde_json::from_str(line).map_err(bad)?;
            if record["event"] != "eval" {
                continue;
            }
            if let TrainEvent::Eval {
                step,
                train_loss,
                val_loss,
                load_cv,
                ..
            } = serde_json::from_value(record).map_err(bad)?
            {
                curves.train.push((step, train_loss));
                curves.val.push((step, val_loss));
                curves.balance.push((step, load_cv));
            }
        }
        Ok(curves)
    }
}

/// Draws `curves` into a 1000x600 PNG at `path`, titled `title` (the
/// run's name): train and validation loss (nats) against step and, below
/// when the metrics have it, the routing balance (the experts' load CV,
/// lower is more balanced).
pub fn plot_loss_curve(path: &Path, title: &str, curves: &LossCurves) -> Result<()> {
    let err =
        |e: &dyn std::fmt::Display| MoeError::Data(format!("plotting {}: {e}", path.display()));
    if curves.train.is_empty() && curves.val.is_empty() {
        return Err(err(&"no evaluation records to plot"));
    }
    let text = font_available();
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let body = if text && !title.is_empty() {
        root.titled(title, ("sans-serif", 24))
            .map_err(|e| err(&e))?
    } else {
        root.clone()
    };
    let (top, bottom) = if curves.balance.is_empty() {
        (body, None)
    } else {
        let height = body.dim_in_pixel().1;
        let (a, b) = body.split_vertically(height * 3 / 5);
        (a, Some(b))
    };
    let losses = Panel {
        x_desc: "step",
        dots: false,
        caption: None,
        y_desc: "loss (nats)",
        series: &[
            ("train loss", &curves.train, BLUE),
            ("val loss", &curves.val, RED),
        ],
    };
    draw_panel(&top, &losses, text).map_err(|e| err(&e))?;
    if let Some(bottom) = bottom {
        let balance = Panel {
            x_desc: "step",
            dots: false,
            caption: Some("routing balance: CV of the experts' loads (lower = more balanced)"),
            y_desc: "load CV",
            series: &[("load CV", &curves.balance, GREEN)],
        };
        draw_panel(&bottom, &balance, text).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

/// Draws the validation loss of several runs against step into a 1000x600
/// PNG at `path` (e.g. a dense model and its MoE conversion).
pub fn plot_val_losses(path: &Path, runs: &[(&str, &LossCurves)]) -> Result<()> {
    let err =
        |e: &dyn std::fmt::Display| MoeError::Data(format!("plotting {}: {e}", path.display()));
    if runs.iter().all(|(_, c)| c.val.is_empty()) {
        return Err(err(&"no evaluation records to plot"));
    }
    const COLORS: [RGBColor; 4] = [BLUE, RED, GREEN, MAGENTA];
    let series: Vec<Series> = runs
        .iter()
        .zip(COLORS.iter().cycle())
        .map(|((name, curves), &color)| (*name, curves.val.as_slice(), color))
        .collect();
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panel = Panel {
        x_desc: "step",
        dots: false,
        caption: None,
        y_desc: "val loss (nats)",
        series: &series,
    };
    draw_panel(&root, &panel, font_available()).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// Draws named series of `(x, y)` points as lines with a dot at each point
/// into a 1000x600 PNG at `path`, under `title`, with the axes labelled
/// `x_label` and `y_label` (e.g. the best loss so far against trials of
/// several searches).
pub fn plot_series(
    path: &Path,
    title: &str,
    (x_label, y_label): (&str, &str),
    series: &[(&str, &[(i64, f64)])],
) -> Result<()> {
    let err =
        |e: &dyn std::fmt::Display| MoeError::Data(format!("plotting {}: {e}", path.display()));
    if series.iter().all(|(_, points)| points.is_empty()) {
        return Err(err(&"no points to plot"));
    }
    const COLORS: [RGBColor; 4] = [BLUE, RED, GREEN, MAGENTA];
    let series: Vec<Series> = series
        .iter()
        .zip(COLORS.iter().cycle())
        .map(|((name, points), &color)| (*name, *points, color))
        .collect();
    let panel = Panel {
        caption: Some(title),
        x_desc: x_label,
        y_desc: y_label,
        series: &series,
        dots: true,
    };
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    draw_panel(&root, &panel, font_available()).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

type Series<'a> = (&'a str, &'a [(i64, f64)], RGBColor);

/// One chart: its caption, the axes' labels, the lines, and whether each
/// point gets a dot.
struct Panel<'a> {
    caption: Option<&'a str>,
    x_desc: &'a str,
    y_desc: &'a str,
    series: &'a [Series<'a>],
    dots: bool,
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel,
    text: bool,
) -> std::result::Result<(), Box<dyn std::error::Error + 'static>>
where
    DB::ErrorType: 'static,
{
    let points = panel.series.iter().flat_map(|s| s.1.iter());
    let (mut x_max, mut y_min, mut y_max) = (1i64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let mut builder = ChartBuilder::on(area);
    builder.margin(15);
    if text {
        builder.x_label_area_size(40).y_label_area_size(70);
        if let Some(caption) = panel.caption {
            builder.caption(caption, ("sans-serif", 18));
        }
    }
    let mut chart = builder.build_cartesian_2d(0..x_max, (y_min - pad)..(y_max + pad))?;
    let mut mesh = chart.configure_mesh();
    if text {
        // A label every 25 px or more.
        let y_labels = (area.dim_in_pixel().1 / 25).clamp(3, 10) as usize;
        mesh.x_desc(panel.x_desc)
            .y_desc(panel.y_desc)
            .y_labels(y_labels)
            .axis_desc_style(("sans-serif", 16));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    for &(name, data, color) in panel.series {
        if panel.dots {
            chart.draw_series(
                data.iter()
                    .map(|&point| Circle::new(point, 4, color.filled())),
            )?;
        }
        let drawn =
            chart.draw_series(LineSeries::new(data.iter().copied(), color.stroke_width(2)))?;
        if text {
            drawn
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

/// Registers the first font found as "sans-serif", once.
fn font_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let env = std::env::var("MOE_PLOT_FONT").ok();
        let candidates = env.iter().map(String::as_str).chain(FONT_PATHS);
        for path in candidates {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}
