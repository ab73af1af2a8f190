//! Prometheus text exposition of the master target's figures.

use std::fmt::Write;

use crate::service::Disks;

/// Renders every metric.
pub fn render(disks: &Disks) -> String {
    let stats = disks.stats();
    let mut s = String::new();
    let _ = writeln!(s, "# HELP failback_mt_disks_attached Disks attached to this master target.\n# TYPE failback_mt_disks_attached gauge\nfailback_mt_disks_attached {}", stats.len());
    let series: [(&str, &str, &str, fn(&crate::service::DiskStats) -> f64); 8] = [
        (
            "failback_mt_applied_bytes_total",
            "counter",
            "Block bytes applied to the disk.",
            |d| d.bytes_applied as f64,
        ),
        (
            "failback_mt_apply_groups_total",
            "counter",
            "Groups (group commits) applied.",
            |d| d.groups as f64,
        ),
        (
            "failback_mt_apply_seconds_total",
            "counter",
            "Time spent applying groups; divide by groups for the mean latency.",
            |d| d.apply_us_total as f64 / 1e6,
        ),
        (
            "failback_mt_committed_lsn",
            "gauge",
            "Highest durable LSN.",
            |d| d.committed_lsn as f64,
        ),
        (
            "failback_mt_journal_bytes",
            "gauge",
            "Bytes in the retention journal.",
            |d| d.journal_bytes as f64,
        ),
        (
            "failback_mt_recovery_points",
            "gauge",
            "Recovery points kept.",
            |d| d.points as f64,
        ),
        (
            "failback_mt_retention_window_kept_seconds",
            "gauge",
            "Span between the oldest and newest recovery point kept.",
            |d| d.window_kept_s as f64,
        ),
        (
            "failback_mt_journal_quota_limited",
            "gauge",
            "1 while the journal quota forces points inside the window out.",
            |d| u8::from(d.quota_limited) as f64,
        ),
    ];
    for (name, kind, help, f) in series {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (id, d) in &stats {
            let _ = writeln!(s, "{name}{{disk=\"{id}\"}} {}", f(d));
        }
    }
    s
}
