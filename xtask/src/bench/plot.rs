//! PNG plots of a benchmark run: request rate against number of services, one line
//! per data plane, one panel per scenario.

use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;

use super::Results;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Draws `results`' traffic rates into `out`.
pub fn rates(results: &Results, out: &Path) -> anyhow::Result<()> {
    let font = std::fs::read(FONT)
        .with_context(|| format!("reading {FONT} (apt package fonts-dejavu-core)"))?;
    // The font must live for the whole process; one plot per run.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("cannot load {FONT}"))?;

    let root = BitMapBackend::new(out, (1500, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    let modes = [
        "direct",
        "ebpf",
        "nftables",
        "iptables",
        "haproxy",
        "kube-proxy nftables",
        "kube-proxy iptables-nft",
        "kube-proxy iptables-legacy",
    ];
    let colors = [
        BLACK,
        BLUE,
        CYAN,
        RED,
        GREEN,
        MAGENTA,
        RGBColor(200, 120, 0),
        RGBColor(120, 120, 120),
    ];
    for (panel, scenario) in panels.iter().zip(["connect", "keep-alive", "udp"]) {
        let rows: Vec<_> = results
            .traffic
            .iter()
            .filter(|r| r.scenario == scenario)
            .collect();
        let max_rate = rows.iter().map(|r| r.rate).fold(1.0, f64::max) * 1.15;
        let max_services = rows.iter().map(|r| r.services).max().unwrap_or(1).max(10) as f64;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{scenario} (req/s)"), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((1f64..max_services * 2.0).log_scale(), 0f64..max_rate)?;
        chart
            .configure_mesh()
            .x_desc("services")
            .label_style(("sans-serif", 14))
            .draw()?;
        for (mode, color) in modes.iter().zip(colors) {
            let mut points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.mode == *mode)
                .map(|r| (r.services.max(1) as f64, r.rate))
                .collect();
            if points.is_empty() {
                continue;
            }
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(*mode)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::LowerLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
