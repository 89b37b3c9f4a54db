//! Charts a person reads at a glance: several runs (the gateway, HAProxy,
//! a build before and after a change) on one picture.
//!
//! - request/response runs: latency by percentile (p50 .. p99.99, in ms,
//!   from zero), throughput over time, and the relay's CPU microseconds per
//!   message over time;
//! - push-fanout runs: the distribution of per-broadcast full-delivery
//!   times (what share of broadcasts reached every session within t ms).
//!
//! Runs are read from the JSON reports (`--json`), so a chart can be drawn
//! again from files kept in docs/perf/ without rerunning anything.

use plotters::prelude::*;
use serde_json::Value;
use std::path::Path;

/// One run on a chart: its label and its JSON report.
pub struct Run {
    pub label: String,
    pub report: Value,
}

impl Run {
    /// Read `path` (a report written with `--json`).
    pub fn load(label: &str, path: &Path) -> Result<Run, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let report: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a load-test report: {e}", path.display()))?;
        if report.get("latency_us").is_none() {
            return Err(format!(
                "{} is not a load-test report (no latency_us)",
                path.display()
            ));
        }
        Ok(Run {
            label: label.to_string(),
            report,
        })
    }

    fn is_fanout(&self) -> bool {
        let s = &self.report["options"]["scenario"];
        s == "push-fanout" || s == "PushFanout"
    }

    fn pairs(&self, key: &str) -> Vec<(f64, f64)> {
        self.report[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// (nines, ms) points of the latency curve.
    fn latency_ms(&self) -> Vec<(f64, f64)> {
        self.report["latency_us"]["curve"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
            .filter(|(q, _)| *q >= 50.0)
            .map(|(q, us)| (nines(q), us / 1000.0))
            .collect()
    }

    fn broadcasts_ms(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.report["broadcast_full_delivery_us"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .map(|us| us / 1000.0)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }
}

/// Percentile q (0..=100) as "nines": p90 = 1, p99 = 2, p99.9 = 3.
fn nines(q: f64) -> f64 {
    if q >= 100.0 {
        MAX_NINES
    } else {
        (-(1.0 - q / 100.0).log10()).min(MAX_NINES)
    }
}

const MAX_NINES: f64 = 4.6;

/// Label of a key point of the percentile axis.
fn percentile_label(x: &f64) -> String {
    let q = 100.0 * (1.0 - 10f64.powf(-*x));
    if *x >= MAX_NINES {
        "max".into()
    } else if (q - q.round()).abs() < 1e-6 {
        format!("p{}", q.round())
    } else {
        let s = format!("p{q:.4}");
        s.trim_end_matches('0').to_string()
    }
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// One run's line, with its legend entry.
fn line<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    pts: Vec<(f64, f64)>,
    c: RGBColor,
    label: String,
) -> Result<(), String>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate<From = (f64, f64)>,
{
    chart
        .draw_series(LineSeries::new(pts, c.stroke_width(2)))
        .map_err(err)?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    Ok(())
}

/// The legend box, at `pos`.
fn legend<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    pos: SeriesLabelPosition,
) -> Result<(), String>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(pos)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)
}

/// Draw `runs` on one chart at `out` (SVG). Push-fanout runs get the
/// delivery-time distribution; others the three request/response panels.
pub fn draw(out: &Path, title: &str, runs: &[Run]) -> Result<(), String> {
    if runs.is_empty() {
        return Err("nothing to draw: give at least one report".into());
    }
    if runs.iter().all(Run::is_fanout) {
        draw_fanout(out, title, runs)
    } else if runs.iter().any(Run::is_fanout) {
        Err("push-fanout reports and request/response reports go on separate charts".into())
    } else {
        draw_relay(out, title, runs)
    }
}

fn draw_relay(out: &Path, title: &str, runs: &[Run]) -> Result<(), String> {
    let root = SVGBackend::new(out, (1500, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let panels = root.split_evenly((1, 3));

    // Latency by percentile.
    let curves: Vec<Vec<(f64, f64)>> = runs.iter().map(Run::latency_ms).collect();
    let all = curves.iter().flatten();
    let hi = all.map(|p| p.1).fold(0.0, f64::max).max(0.01);
    // Linear from zero: a log axis labels only its decades here.
    let (ylo, yhi) = (0.0, hi * 1.1);
    let mut chart = ChartBuilder::on(&panels[0])
        .caption("latency by percentile", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(nines(50.0) - 0.05..MAX_NINES + 0.05, ylo..yhi)
        .map_err(err)?;
    // The x axis is drawn by hand: one tick per percentile that matters,
    // named as people name them (plotters picks round numbers otherwise).
    chart
        .configure_mesh()
        .x_labels(0)
        .disable_x_mesh()
        .y_label_formatter(&|v| format_ms(*v))
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .draw()
        .map_err(err)?;
    for x in [nines(50.0), 1.0, 2.0, 3.0, 4.0, MAX_NINES] {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, ylo), (x, yhi)],
                BLACK.mix(0.12),
            )))
            .map_err(err)?;
        let (px, py) = chart.backend_coord(&(x, ylo));
        let (bx, by) = panels[0].get_base_pixel();
        let (px, py) = (px - bx, py - by);
        panels[0]
            .draw(&Text::new(
                percentile_label(&x),
                (px - 14, py + 6),
                ("sans-serif", 13),
            ))
            .map_err(err)?;
    }
    for (i, (run, pts)) in runs.iter().zip(&curves).enumerate() {
        let c = color(i);
        line(&mut chart, pts.clone(), c, run.label.clone())?;
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled())))
            .map_err(err)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;

    // Throughput, then CPU per message, over time.
    for (panel, key, caption, desc) in [
        (&panels[1], "series", "throughput", "messages per second"),
        (
            &panels[2],
            "cpu_series",
            "relay CPU per message",
            "CPU us per message",
        ),
    ] {
        let lines: Vec<Vec<(f64, f64)>> = runs.iter().map(|r| r.pairs(key)).collect();
        let tmax = lines.iter().flatten().map(|p| p.0).fold(1.0, f64::max);
        let ymax = lines.iter().flatten().map(|p| p.1).fold(1.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..tmax + 0.5, 0f64..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("seconds into the run")
            .y_desc(desc)
            .y_label_formatter(&|v| format_count(*v))
            .draw()
            .map_err(err)?;
        for (i, (run, pts)) in runs.iter().zip(&lines).enumerate() {
            let c = color(i);
            line(&mut chart, pts.clone(), c, run.label.clone())?;
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    }
    root.present().map_err(err)
}

fn draw_fanout(out: &Path, title: &str, runs: &[Run]) -> Result<(), String> {
    let root = SVGBackend::new(out, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let dists: Vec<Vec<f64>> = runs.iter().map(Run::broadcasts_ms).collect();
    let tmax = dists.iter().flatten().copied().fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title}: time for a broadcast to reach every session"),
            ("sans-serif", 20),
        )
        .margin(14)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..tmax, 0f64..100.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("full delivery (ms, from the POST to the last session)")
        .y_desc("% of broadcasts delivered within")
        .x_label_formatter(&|v| format_ms(*v))
        .draw()
        .map_err(err)?;
    for (i, (run, d)) in runs.iter().zip(&dists).enumerate() {
        let c = color(i);
        // A step curve: after the k-th fastest broadcast, k/n of them are in.
        let n = d.len().max(1) as f64;
        let mut pts = vec![(0.0, 0.0)];
        for (k, t) in d.iter().enumerate() {
            pts.push((*t, 100.0 * k as f64 / n));
            pts.push((*t, 100.0 * (k + 1) as f64 / n));
        }
        let median = d.get(d.len() / 2).copied().unwrap_or(0.0);
        let label = format!(
            "{} (n {}, median {} ms)",
            run.label,
            d.len(),
            format_ms(median)
        );
        line(&mut chart, pts, c, label)?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(err)
}

/// Milliseconds the way a person writes them: 0.25, 3, 40, 1200.
fn format_ms(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Counts: 950, 12k, 1.5M.
fn format_count(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_axis_reads_as_percentiles() {
        assert_eq!(percentile_label(&nines(50.0)), "p50");
        assert_eq!(percentile_label(&1.0), "p90");
        assert_eq!(percentile_label(&2.0), "p99");
        assert_eq!(percentile_label(&3.0), "p99.9");
        assert_eq!(percentile_label(&4.0), "p99.99");
        assert_eq!(percentile_label(&MAX_NINES), "max");
    }

    #[test]
    fn numbers_read_as_a_person_writes_them() {
        assert_eq!(format_ms(1200.0), "1200");
        assert_eq!(format_ms(2.5), "2.5");
        assert_eq!(format_ms(3.0), "3");
        assert_eq!(format_ms(0.25), "0.25");
        assert_eq!(format_count(184_000.0), "184k");
        assert_eq!(format_count(1_500_000.0), "1.5M");
        assert_eq!(format_count(7.31), "7.3");
    }

    fn report(scenario: &str) -> Value {
        serde_json::json!({
            "options": {"scenario": scenario},
            "latency_us": {"curve": [[0.0, 100], [50.0, 900], [90.0, 2000], [99.0, 5000],
                                     [99.9, 9000], [100.0, 12000]]},
            "series": [[1.0, 1000.0], [2.0, 1100.0]],
            "cpu_series": [[1.0, 7.5], [2.0, 7.1]],
            "broadcast_full_delivery_us": [40000.0, 25000.0, 90000.0],
        })
    }

    #[test]
    fn draws_both_kinds_and_refuses_to_mix_them() {
        let dir = std::env::temp_dir().join(format!("slg-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let run = |l: &str, s: &str| Run {
            label: l.into(),
            report: report(s),
        };
        let relay = dir.join("relay.svg");
        draw(
            &relay,
            "t",
            &[run("gateway", "steady"), run("haproxy", "steady")],
        )
        .expect("relay");
        let svg = std::fs::read_to_string(&relay).expect("svg");
        for want in ["p50", "p99.9", "gateway", "haproxy", "CPU us per message"] {
            assert!(svg.contains(want), "{want} on the chart");
        }
        assert!(!svg.contains("1000000.0"), "no raw microsecond labels");
        let fan = dir.join("fan.svg");
        draw(&fan, "t", &[run("now", "push-fanout")]).expect("fanout");
        let svg = std::fs::read_to_string(&fan).expect("svg");
        assert!(
            svg.contains("median 40 ms"),
            "the median is the middle broadcast"
        );
        assert!(draw(&fan, "t", &[run("a", "push-fanout"), run("b", "steady")]).is_err());
        assert!(draw(&fan, "t", &[]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
