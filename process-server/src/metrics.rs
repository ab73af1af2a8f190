//! Prometheus metrics and the status table of the process server.

use std::sync::atomic::Ordering;

use runtime::metrics::{refusal_samples, Escaped, Exposition, Kind, Labels, Series, Value};
use runtime::net::Refusals;

use crate::state::{now_us, State};

/// Figures of one disk at one instant.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DiskStatus {
    /// Disk id.
    pub disk_id: u64,
    /// VM.
    pub vm_id: String,
    /// linked, resyncing, resync-required, link-down, detached or retired.
    #[serde(default)]
    pub state: String,
    /// The master target it replicates to.
    #[serde(default)]
    pub master_target: String,
    /// Highest LSN cached here.
    pub cached_lsn: u64,
    /// Highest LSN durable on the master target.
    pub durable_lsn: u64,
    /// Bytes waiting in the cache.
    pub backlog_bytes: u64,
    /// Age of the oldest write not yet durable on the master target, milliseconds.
    pub rpo_ms: u64,
    /// Block bytes received.
    pub ingest_bytes: u64,
    /// Block bytes shipped before coalescing and compression.
    pub logical_bytes: u64,
    /// Bytes put on the link.
    pub wire_bytes: u64,
    /// Bytes coalescing kept off the link.
    pub coalesced_bytes: u64,
    /// Block bytes received per second (smoothed).
    pub ingest_bps: f64,
    /// Block bytes shipped per second, before coalescing and compression.
    pub logical_bps: f64,
    /// Bytes on the link per second.
    pub wire_bps: f64,
    /// Logical bytes per wire byte so far.
    pub compression_ratio: f64,
    /// Seconds to drain the backlog at the current drain rate (None: not draining).
    pub eta_s: Option<f64>,
}

/// Status of every disk.
pub fn status(state: &State) -> Vec<DiskStatus> {
    let now = now_us();
    state
        .all()
        .iter()
        .map(|d| {
            let c = d.cache.lock().expect("poisoned");
            let rates = *d.counters.rates.lock().expect("poisoned");
            let uplink = &state.uplinks[d.route];
            DiskStatus {
                disk_id: d.attach.disk_id,
                vm_id: d.attach.vm_id.clone(),
                state: d.state(uplink.connected.load(Ordering::Acquire)).to_owned(),
                master_target: uplink.target.addr.clone(),
                cached_lsn: c.last_lsn(),
                durable_lsn: d.counters.mt_durable_lsn.load(Ordering::Acquire),
                backlog_bytes: c.backlog_bytes(),
                rpo_ms: c
                    .oldest_unacked_ts_us()
                    .map_or(0, |t| now.saturating_sub(t) / 1000),
                ingest_bytes: d.counters.ingest_bytes.load(Ordering::Relaxed),
                logical_bytes: d.counters.logical_bytes_shipped.load(Ordering::Relaxed),
                wire_bytes: d.counters.wire_bytes.load(Ordering::Relaxed),
                coalesced_bytes: d.counters.coalesced_bytes.load(Ordering::Relaxed),
                ingest_bps: rates.ingest_bps,
                logical_bps: rates.logical_bps,
                wire_bps: rates.wire_bps,
                compression_ratio: {
                    let (l, w) = (
                        d.counters.logical_bytes_shipped.load(Ordering::Relaxed),
                        d.counters.wire_bytes.load(Ordering::Relaxed),
                    );
                    if w > 0 {
                        l as f64 / w as f64
                    } else {
                        0.0
                    }
                },
                eta_s: {
                    let backlog = c.backlog_bytes();
                    if backlog == 0 {
                        Some(0.0)
                    } else if rates.drain_bps > 1.0 {
                        Some(backlog as f64 / rates.drain_bps)
                    } else {
                        None
                    }
                },
            }
        })
        .collect()
}

const GROUP_SERIES: [Series<crate::cuts::GroupStatus>; 6] = [
    Series {
        name: "failback_ps_group_rpo_seconds",
        kind: Kind::Gauge,
        help: "A replication group's RPO: the age of its last group point, or its disks' own RPO if older.",
        value: |g| Value::Float(g.rpo_ms as f64 / 1000.0),
    },
    Series {
        name: "failback_ps_group_cuts_made",
        kind: Kind::Counter,
        help: "Group-consistent cuts made (every disk of the group marked).",
        value: |g| Value::Int(g.cuts_made),
    },
    Series {
        name: "failback_ps_group_cuts_abandoned",
        kind: Kind::Counter,
        help:
            "Group-consistent cuts abandoned (a member refused, was slow or gone): no group point.",
        value: |g| Value::Int(g.cuts_abandoned),
    },
    Series {
        name: "failback_ps_group_cuts_skipped",
        kind: Kind::Counter,
        help: "Group cuts not begun: a member VM had no disk attached, or its agent was not connected.",
        value: |g| Value::Int(g.cuts_skipped),
    },
    Series {
        name: "failback_ps_group_cut_pause_p99_seconds",
        kind: Kind::Gauge,
        help: "p99 of how long a member's writes were held for a cut (last 1024 holds).",
        value: |g| Value::Float(g.pause_p99_us as f64 / 1e6),
    },
    Series {
        name: "failback_ps_group_last_cut_timestamp_seconds",
        kind: Kind::Gauge,
        help: "When the group's last cut was made (0: never).",
        value: |g| Value::Float(g.last_cut_time_us as f64 / 1e6),
    },
];

const SERIES: [Series<DiskStatus>; 8] = [
    Series {
        name: "failback_ps_rpo_seconds",
        kind: Kind::Gauge,
        help: "Age of the oldest write not yet durable on the master target.",
        value: |d| Value::Float(d.rpo_ms as f64 / 1000.0),
    },
    Series {
        name: "failback_ps_backlog_bytes",
        kind: Kind::Gauge,
        help: "Bytes cached and not yet acknowledged by the master target.",
        value: |d| Value::Int(d.backlog_bytes),
    },
    Series {
        name: "failback_ps_ingest_bytes",
        kind: Kind::Counter,
        help: "Block bytes received from agents.",
        value: |d| Value::Int(d.ingest_bytes),
    },
    Series {
        name: "failback_ps_logical_bytes",
        kind: Kind::Counter,
        help: "Block bytes shipped, before coalescing and compression.",
        value: |d| Value::Int(d.logical_bytes),
    },
    Series {
        name: "failback_ps_wire_bytes",
        kind: Kind::Counter,
        help: "Bytes put on the link.",
        value: |d| Value::Int(d.wire_bytes),
    },
    Series {
        name: "failback_ps_coalesced_bytes",
        kind: Kind::Counter,
        help: "Bytes coalescing kept off the link.",
        value: |d| Value::Int(d.coalesced_bytes),
    },
    Series {
        name: "failback_ps_cached_lsn",
        kind: Kind::Gauge,
        help: "Highest LSN durable in the cache.",
        value: |d| Value::Int(d.cached_lsn),
    },
    Series {
        name: "failback_ps_durable_lsn",
        kind: Kind::Gauge,
        help: "Highest LSN durable on the master target.",
        value: |d| Value::Int(d.durable_lsn),
    },
];

/// Prometheus (OpenMetrics) text exposition.
pub fn render(state: &State, refusals: &Refusals) -> String {
    let mut e = Exposition::default();
    let links = state
        .uplinks
        .iter()
        .map(|u| {
            let up = u8::from(u.connected.load(Ordering::Acquire));
            (
                vec![("master_target", Escaped::new(&u.target.addr))],
                Value::Int(up.into()),
            )
        })
        .collect();
    e.family(
        "failback_ps_link_up",
        Kind::Gauge,
        "1 while connected to the master target.",
        links,
    );
    let streamed = state
        .uplinks
        .iter()
        .map(|u| {
            (
                vec![("master_target", Escaped::new(&u.target.addr))],
                Value::Int(u.stream_bytes.load(Ordering::Relaxed)),
            )
        })
        .collect();
    e.family(
        "failback_ps_link_stream_bytes",
        Kind::Counter,
        "Bytes of the frames (before compression, headers and short frames passed as they were included) of batches sent through the link's zstd stream: while the link is the bottleneck, batches are compressed with the history of those before them.",
        streamed,
    );
    e.single(
        "failback_ps_max_bandwidth_bytes_per_second",
        Kind::Gauge,
        "Link bandwidth limit (0: none).",
        Value::Int(state.max_bandwidth_bps.load(Ordering::Relaxed)),
    );
    e.single(
        "failback_ps_compression_level",
        Kind::Gauge,
        "zstd level of new batches on the link (0: none).",
        Value::Signed(state.compression_level.load(Ordering::Relaxed).into()),
    );
    let disks = status(state);
    let groups: Vec<(Labels, crate::cuts::GroupStatus)> = crate::cuts::status(state, &disks)
        .into_iter()
        .map(|g| (vec![("group", Escaped::new(&g.group))], g))
        .collect();
    e.rows(&GROUP_SERIES, &groups);
    let rows: Vec<(Labels, DiskStatus)> = disks
        .into_iter()
        .map(|d| {
            let labels = vec![
                ("disk", Escaped::new(&d.disk_id.to_string())),
                ("vm", Escaped::new(&d.vm_id)),
            ];
            (labels, d)
        })
        .collect();
    e.rows(&SERIES, &rows);
    e.family(
        "failback_ps_connections_refused",
        Kind::Counter,
        "Agent connections refused before they were served, by reason.",
        refusal_samples(refusals),
    );
    e.family(
        "failback_ps_requests_refused",
        Kind::Counter,
        "Agent requests refused because the VM in the certificate may not make them.",
        vec![(
            vec![("reason", Escaped::new("forbidden"))],
            Value::Int(state.refused.forbidden.load(Ordering::Relaxed)),
        )],
    );
    e.render()
}

/// Folds the counters of the last `dt_s` seconds into every disk's rates.
pub fn sample_rates(state: &State, dt_s: f64) {
    for d in state.all() {
        let acked = d.cache.lock().expect("poisoned").trimmed_bytes;
        let c = &d.counters;
        c.rates.lock().expect("poisoned").sample(
            c.ingest_bytes.load(Ordering::Relaxed),
            c.logical_bytes_shipped.load(Ordering::Relaxed),
            c.wire_bytes.load(Ordering::Relaxed),
            acked,
            dt_s,
        );
    }
}

/// Warns when a disk's RPO passes the threshold, and again when it recovers.
pub fn check_rpo(state: &State) {
    let threshold_ms = state.cfg.rpo_threshold_s * 1000;
    for (d, s) in state.all().iter().zip(status(state)) {
        let over = s.rpo_ms > threshold_ms;
        if over != d.rpo_alarm.swap(over, Ordering::AcqRel) {
            if over {
                tracing::warn!(disk = s.disk_id, vm = %s.vm_id, rpo_s = s.rpo_ms / 1000, threshold_s = state.cfg.rpo_threshold_s, backlog_bytes = s.backlog_bytes, "RPO threshold passed: check the link to the master target and its bandwidth limit");
            } else {
                tracing::info!(disk = s.disk_id, vm = %s.vm_id, rpo_s = s.rpo_ms / 1000, "RPO back under its threshold");
            }
        }
    }
}
