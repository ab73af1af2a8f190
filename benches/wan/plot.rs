//! SVG plots of a WAN run: RPO and throughput over time for each churn case, and link
//! utilization per link and case.

use std::path::Path;

use plotters::prelude::*;

/// One churn sample: seconds, RPO ms, logical MB/s since the previous sample.
type Sample = (f64, f64, f64);

/// Colours of the series, in order.
const COLOURS: [RGBColor; 3] = [BLUE, RED, GREEN];

/// Writes `churn.svg` (RPO and logical throughput over time, one line per link) and
/// `utilization.svg` (link utilization per case, one bar group per link) into `dir`.
pub(crate) fn write(dir: &Path, rows: &[(&str, serde_json::Value)]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    // A partial run leaves an earlier run's plots alone where it lacks their cases (a
    // missing case would draw as a bar of zero).
    let shaped = |case: &str| rows.iter().any(|(_, v)| v[case]["link_used"].is_number());
    if shaped("churn") {
        churn(&dir.join("churn.svg"), rows).map_err(|e| format!("churn.svg: {e}"))?;
    }
    if ["bulk", "drain", "churn"].iter().all(|c| shaped(c)) {
        utilization(&dir.join("utilization.svg"), rows)
            .map_err(|e| format!("utilization.svg: {e}"))?;
    }
    Ok(())
}

/// (seconds, RPO ms, logical MB/s over the last sample) of a churn case.
fn series(v: &serde_json::Value) -> Vec<Sample> {
    let points: Vec<Sample> = v["series_ms_rpo_logical_wire"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    let n = |i: usize| p[i].as_f64();
                    Some((n(0)? / 1000.0, n(1)?, n(2)?))
                })
                .collect()
        })
        .unwrap_or_default();
    points
        .windows(2)
        .map(|w| {
            let dt = (w[1].0 - w[0].0).max(1e-3);
            (w[1].0, w[1].1, (w[1].2 - w[0].2) / dt / 1e6)
        })
        .collect()
}

fn churn(
    path: &Path,
    rows: &[(&str, serde_json::Value)],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(350);
    let all: Vec<(&str, Vec<Sample>)> = rows
        .iter()
        // Shaped links only: the sink case asks far more than half a link.
        .filter(|(_, v)| v["churn"]["link_used"].is_number())
        .map(|(n, v)| (*n, series(&v["churn"])))
        .collect();
    let max_t = all
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    for (area, title, pick, unit) in [
        (
            &top,
            "RPO under churn at half the link's rate",
            1usize,
            "RPO ms",
        ),
        (&bottom, "logical throughput under churn", 2usize, "MB/s"),
    ] {
        let value = |p: &Sample| if pick == 1 { p.1 } else { p.2 };
        let max_y = all
            .iter()
            .flat_map(|(_, s)| s.iter().map(value))
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..max_t, 0.0..max_y)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(unit)
            .draw()?;
        for (i, (name, s)) in all.iter().enumerate() {
            let c = COLOURS[i % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(s.iter().map(|p| (p.0, value(p))), c))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        }
        chart.configure_series_labels().border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}

fn utilization(
    path: &Path,
    rows: &[(&str, serde_json::Value)],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let shaped: Vec<&(&str, serde_json::Value)> = rows
        .iter()
        .filter(|(_, v)| v["bulk"]["link_used"].is_number())
        .collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "link utilization (wire bytes / link rate)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..(shaped.len() as f64 * 4.0), 0.0..1.1)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|x| {
            let i = (*x / 4.0) as usize;
            shaped.get(i).map_or(String::new(), |(n, _)| n.to_string())
        })
        .x_labels(shaped.len().max(1) * 2)
        .y_desc("share of the link")
        .draw()?;
    for (k, case) in ["bulk", "drain", "churn"].into_iter().enumerate() {
        let c = COLOURS[k];
        chart
            .draw_series(shaped.iter().enumerate().map(|(i, (_, v))| {
                let u = v[case]["link_used"].as_f64().unwrap_or(0.0).min(1.1);
                let x = i as f64 * 4.0 + 0.5 + k as f64;
                Rectangle::new([(x, 0.0), (x + 0.9, u)], c.filled())
            }))?
            .label(case)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], c.filled()));
    }
    chart.configure_series_labels().border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
