//! Prometheus text exposition of the master target's figures.

use std::fmt::Write;

use runtime::metrics::{render_series, Series};
use runtime::net::Refusals;

use crate::server::RequestRefusals;

use crate::service::{DiskStats, Disks};

const SERIES: [Series<DiskStats>; 8] = [
    Series {
        name: "failback_mt_applied_bytes_total",
        kind: "counter",
        help: "Block bytes applied to the disk.",
        value: |d| d.bytes_applied as f64,
    },
    Series {
        name: "failback_mt_apply_groups_total",
        kind: "counter",
        help: "Groups (group commits) applied.",
        value: |d| d.groups as f64,
    },
    Series {
        name: "failback_mt_apply_seconds_total",
        kind: "counter",
        help: "Time spent applying groups; divide by groups for the mean apply latency.",
        value: |d| d.apply_us_total as f64 / 1e6,
    },
    Series {
        name: "failback_mt_committed_lsn",
        kind: "gauge",
        help: "Highest durable LSN.",
        value: |d| d.committed_lsn as f64,
    },
    Series {
        name: "failback_mt_journal_bytes",
        kind: "gauge",
        help: "Bytes in the retention journal.",
        value: |d| d.journal_bytes as f64,
    },
    Series {
        name: "failback_mt_recovery_points",
        kind: "gauge",
        help: "Recovery points kept.",
        value: |d| d.points as f64,
    },
    Series {
        name: "failback_mt_retention_window_kept_seconds",
        kind: "gauge",
        help: "Span between the oldest and newest recovery point kept.",
        value: |d| d.window_kept_s as f64,
    },
    Series {
        name: "failback_mt_journal_quota_limited",
        kind: "gauge",
        help: "1 while the journal quota forces points inside the window out.",
        value: |d| u8::from(d.quota_limited) as f64,
    },
];

/// Renders every metric.
pub fn render(disks: &Disks, refusals: &Refusals, requests: &RequestRefusals) -> String {
    let rows: Vec<(String, DiskStats)> = disks
        .stats()
        .into_iter()
        .map(|(id, s)| (format!("disk=\"{id}\""), s))
        .collect();
    let mut s = String::new();
    let _ = writeln!(s, "# HELP failback_mt_disks_attached Disks attached to this master target.\n# TYPE failback_mt_disks_attached gauge\nfailback_mt_disks_attached {}", rows.len());
    render_series(&mut s, &SERIES, &rows);
    let _ = writeln!(s, "# HELP failback_mt_connections_refused_total Connections refused before they were served, by reason.\n# TYPE failback_mt_connections_refused_total counter");
    for (reason, n) in refusals.counts() {
        let _ = writeln!(
            s,
            "failback_mt_connections_refused_total{{reason=\"{reason}\"}} {n}"
        );
    }
    let _ = writeln!(s, "# HELP failback_mt_requests_refused_total Requests refused because the peer's identity may not make them.\n# TYPE failback_mt_requests_refused_total counter\nfailback_mt_requests_refused_total{{reason=\"forbidden\"}} {}", requests.forbidden.load(std::sync::atomic::Ordering::Relaxed));
    s
}
