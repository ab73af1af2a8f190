//! Prometheus text exposition of the master target's figures.

use runtime::metrics::{refusal_samples, Escaped, Exposition, Kind, Labels, Series, Value};
use runtime::net::Refusals;

use crate::server::RequestRefusals;

use crate::service::{DiskStats, Disks};

const SERIES: [Series<DiskStats>; 10] = [
    Series {
        name: "failback_mt_applied_bytes",
        kind: Kind::Counter,
        help: "Block bytes applied to the disk.",
        value: |d| Value::Int(d.bytes_applied),
    },
    Series {
        name: "failback_mt_unchanged_writes",
        kind: Kind::Counter,
        help: "Writes of the bytes the disk already held (such as zeros onto never-written blocks), or that earlier writes of the same group had put there: neither journaled nor written.",
        value: |d| Value::Int(d.writes_unchanged),
    },
    Series {
        name: "failback_mt_covered_writes",
        kind: Kind::Counter,
        help: "Writes wholly over bytes an earlier write of the same group (since its last bookmark) changed: written, with no undo record of their own.",
        value: |d| Value::Int(d.writes_covered),
    },
    Series {
        name: "failback_mt_apply_groups",
        kind: Kind::Counter,
        help: "Groups (group commits) applied.",
        value: |d| Value::Int(d.groups),
    },
    Series {
        name: "failback_mt_apply_seconds",
        kind: Kind::Counter,
        help: "Time spent applying groups; divide by groups for the mean apply latency.",
        value: |d| Value::Float(d.apply_us_total as f64 / 1e6),
    },
    Series {
        name: "failback_mt_committed_lsn",
        kind: Kind::Gauge,
        help: "Highest durable LSN.",
        value: |d| Value::Int(d.committed_lsn),
    },
    Series {
        name: "failback_mt_journal_bytes",
        kind: Kind::Gauge,
        help: "Bytes in the retention journal.",
        value: |d| Value::Int(d.journal_bytes),
    },
    Series {
        name: "failback_mt_recovery_points",
        kind: Kind::Gauge,
        help: "Recovery points kept.",
        value: |d| Value::Int(d.points),
    },
    Series {
        name: "failback_mt_retention_window_kept_seconds",
        kind: Kind::Gauge,
        help: "Span between the oldest and newest recovery point kept.",
        value: |d| Value::Int(d.window_kept_s),
    },
    Series {
        name: "failback_mt_journal_quota_limited",
        kind: Kind::Gauge,
        help: "1 while the journal quota forces points inside the window out.",
        value: |d| Value::Int(d.quota_limited.into()),
    },
];

/// Renders every metric (OpenMetrics text).
pub fn render(disks: &Disks, refusals: &Refusals, requests: &RequestRefusals) -> String {
    let rows: Vec<(Labels, DiskStats)> = disks
        .stats()
        .into_iter()
        .map(|(id, s)| (vec![("disk", Escaped::new(&id.to_string()))], s))
        .collect();
    let mut e = Exposition::default();
    e.single(
        "failback_mt_disks_attached",
        Kind::Gauge,
        "Disks attached to this master target.",
        Value::Int(rows.len() as u64),
    );
    e.rows(&SERIES, &rows);
    e.family(
        "failback_mt_connections_refused",
        Kind::Counter,
        "Connections refused before they were served, by reason.",
        refusal_samples(refusals),
    );
    e.family(
        "failback_mt_requests_refused",
        Kind::Counter,
        "Requests refused because the peer's identity may not make them.",
        vec![(
            vec![("reason", Escaped::new("forbidden"))],
            Value::Int(
                requests
                    .forbidden
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
        )],
    );
    e.render()
}
