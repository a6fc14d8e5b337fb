//! Results: printed as each figure is measured, and gathered into one Markdown table with the
//! target and the raw limit beside each figure.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

/// One line of the results table.
struct Row {
    scenario: String,
    result: String,
    target: String,
    limit: String,
}

#[derive(Default)]
pub struct Report {
    rows: Mutex<Vec<Row>>,
    peak_rss_mib: Mutex<f64>,
    limits: Mutex<Limits>,
}

/// The raw limits measured by the baseline scenario, in events per second.
#[derive(Default, Clone, Copy)]
pub struct Limits {
    pub jetstream: Option<f64>,
    pub copy: Option<f64>,
}

/// Which raw limit a throughput figure is compared with.
#[derive(Clone, Copy)]
pub enum Limit {
    JetStream,
    Copy,
    None,
}

impl Report {
    pub fn set_limits(&self, limits: Limits) {
        *lock(&self.limits) = limits;
    }

    /// A throughput figure, with its target and the fraction of its raw limit.
    pub fn rate(&self, scenario: &str, per_second: f64, unit: &str, target: &str, limit: Limit) {
        let limits = *lock(&self.limits);
        let limit_rate = match limit {
            Limit::JetStream => limits.jetstream.map(|rate| ("raw JetStream publish", rate)),
            Limit::Copy => limits.copy.map(|rate| ("raw COPY", rate)),
            Limit::None => None,
        };
        let limit = match limit_rate {
            Some((name, rate)) => format!("{:.0} % of {name} ({rate:.0}/s)", 100.0 * per_second / rate),
            None => String::new(),
        };
        println!("{scenario}: {per_second:.0} {unit}/s {limit}");
        self.push(scenario, format!("{per_second:.0} {unit}/s"), target, limit);
    }

    /// Latency percentiles of a histogram in microseconds.
    pub fn latency(&self, scenario: &str, histogram: &Histogram<u64>, elapsed: Duration, target: &str) {
        let ms = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1000.0;
        let summary = format!("p50 {:.2} ms · p95 {:.2} ms · p99 {:.2} ms", ms(0.5), ms(0.95), ms(0.99));
        println!(
            "{scenario}: n={} {summary} · max {:.2} ms · {:.0}/s",
            histogram.len(),
            histogram.max() as f64 / 1000.0,
            histogram.len() as f64 / elapsed.as_secs_f64().max(1e-9)
        );
        self.push(scenario, summary, target, String::new());
    }

    /// What a scenario cost in CPU, per 1 000 events.
    pub fn cpu(&self, scenario: &str, per_thousand: &str) {
        self.cpu_per(scenario, "events", per_thousand);
    }

    /// [`Report::cpu`] per 1 000 of something else than events (deliveries, say).
    pub fn cpu_per(&self, scenario: &str, unit: &str, per_thousand: &str) {
        let scenario = format!("{scenario}: CPU per 1 000 {unit}");
        println!("{scenario}: {per_thousand}");
        self.push(&scenario, per_thousand.to_owned(), "", String::new());
    }

    pub fn peak_rss(&self, mib: f64) {
        let mut peak = lock(&self.peak_rss_mib);
        *peak = peak.max(mib);
    }

    pub fn push(&self, scenario: &str, result: String, target: &str, limit: String) {
        lock(&self.rows).push(Row { scenario: scenario.to_owned(), result, target: target.to_owned(), limit });
    }

    /// Prints the table, and writes it to `file` when given.
    pub fn print_table(&self, machine: &str, file: Option<&Path>) -> anyhow::Result<()> {
        let mut table = format!("Machine: {machine}\n\n| Scenario | Result | Target | Limit |\n|---|---|---|---|\n");
        for row in lock(&self.rows).iter() {
            table.push_str(&format!("| {} | {} | {} | {} |\n", row.scenario, row.result, row.target, row.limit));
        }
        let peak = *lock(&self.peak_rss_mib);
        if peak > 0.0 {
            table.push_str(&format!("| service peak RSS | {peak:.0} MiB | | |\n"));
        }
        println!("\n{table}");
        if let Some(file) = file {
            std::fs::write(file, &table)?;
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn new_histogram() -> Histogram<u64> {
    // Microseconds, 1 µs to 1 h, three significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

pub fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let _ = histogram.record((elapsed.as_micros() as u64).max(1));
}

/// CPU model, cores and memory of this machine.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|line| line.starts_with("MemTotal:"))?.to_owned();
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.0} GiB", kib / 1024.0 / 1024.0))
        })
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {memory}")
}

/// A progress bar for a long phase.
pub fn progress(length: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(length);
    if let Ok(style) = indicatif::ProgressStyle::with_template("  {msg} [{bar:30}] {pos}/{len} ({per_sec}, {eta} left)")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}
