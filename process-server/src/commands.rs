//! The operator's commands against a running process server, through its admin endpoint:
//! `status`, `disks`, `drain`, `retire`, `set-bandwidth`, `groups`, `group-bookmark`.

use std::time::{Duration, Instant};

use runtime::admin::{admin_request, Method};
use runtime::units::{fmt_bytes, fmt_rate, fmt_secs};

use crate::error::{Error, Result};
use crate::metrics::DiskStatus;

/// How often `drain` asks for the status, and how often it prints progress.
const DRAIN_POLL_MS: u64 = 200;
const DRAIN_PRINT_MS: u64 = 2_000;

async fn request(admin: &str, method: Method, path: &str, body: &str) -> Result<(u16, String)> {
    admin_request(admin, method, path, body)
        .await
        .map_err(|e| Error::Io {
            context: format!(
                "reach the process server's admin endpoint at {admin} (is it running? --admin names it)"
            ),
            source: e,
        })
}

/// Every disk's figures from a running process server.
pub async fn fetch_status(admin: &str) -> Result<Vec<DiskStatus>> {
    let (code, body) = request(admin, Method::Get, "/status", "").await?;
    if code != 200 {
        return Err(Error::Refused(format!(
            "the process server answered /status with HTTP {code}: {}",
            body.trim()
        )));
    }
    serde_json::from_str(&body).map_err(|e| {
        Error::Refused(format!(
            "the process server's status could not be read ({e}): is {admin} a process server's admin endpoint?"
        ))
    })
}

/// `status`: a table of every disk, or the JSON.
pub async fn status(admin: &str, json: bool) -> Result<()> {
    let rows = fetch_status(admin).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&rows).expect("status serializes")
        );
        return Ok(());
    }
    println!(
        "{:>6} {:<12} {:<15} {:>9} {:>9} {:>10} {:>8} {:>11} {:>11} {:>11} {:>6} {:>8}",
        "disk",
        "vm",
        "state",
        "cached",
        "durable",
        "backlog",
        "rpo",
        "ingest",
        "logical",
        "wire",
        "ratio",
        "eta"
    );
    for r in rows {
        let eta = r.eta_s.map_or("-".to_string(), fmt_secs);
        println!(
            "{:>6} {:<12} {:<15} {:>9} {:>9} {:>10} {:>8} {:>11} {:>11} {:>11} {:>5.2}x {:>8}",
            r.disk_id,
            r.vm_id,
            r.state,
            r.cached_lsn,
            r.durable_lsn,
            fmt_bytes(r.backlog_bytes),
            fmt_secs(r.rpo_ms as f64 / 1000.0),
            fmt_rate(r.ingest_bps),
            fmt_rate(r.logical_bps),
            fmt_rate(r.wire_bps),
            r.compression_ratio,
            eta
        );
    }
    // Each replication group's RPO (the oldest of its disks') below the disks.
    if let Ok((200, body)) = request(admin, Method::Get, "/groups", "").await {
        let groups = parse_groups(&body)?;
        if !groups.is_empty() {
            println!();
            print_groups(groups);
        }
    }
    Ok(())
}

/// `disks`: every disk this process server knows, with its state and where it goes.
pub async fn disks(admin: &str, json: bool) -> Result<()> {
    let rows = fetch_status(admin).await?;
    if json {
        for r in &rows {
            println!(
                "{}",
                serde_json::json!({"disk": r.disk_id, "vm": r.vm_id, "state": r.state, "master_target": r.master_target, "cached_lsn": r.cached_lsn, "durable_lsn": r.durable_lsn, "backlog_bytes": r.backlog_bytes})
            );
        }
        return Ok(());
    }
    println!(
        "{:>6} {:<12} {:<15} {:<22} {:>9} {:>9} {:>10}",
        "disk", "vm", "state", "master target", "cached", "durable", "backlog"
    );
    for r in rows {
        println!(
            "{:>6} {:<12} {:<15} {:<22} {:>9} {:>9} {:>10}",
            r.disk_id,
            r.vm_id,
            r.state,
            r.master_target,
            r.cached_lsn,
            r.durable_lsn,
            fmt_bytes(r.backlog_bytes)
        );
    }
    Ok(())
}

/// Whether a disk still has something to ship, and if so what stops it being drained.
fn pending(r: &DiskStatus) -> Option<String> {
    match r.state.as_str() {
        "resync-required" => Some(format!(
            "disk {}: data was lost in the cache and must be resynced by its agent (agent resync --mode differential); not drained",
            r.disk_id
        )),
        _ if r.durable_lsn < r.cached_lsn => Some(format!(
            "disk {}: {} of {} durable, {} pending, RPO {}{}",
            r.disk_id,
            r.durable_lsn,
            r.cached_lsn,
            fmt_bytes(r.backlog_bytes),
            fmt_secs(r.rpo_ms as f64 / 1000.0),
            if r.state == "link-down" {
                " (the link to the master target is down)"
            } else {
                ""
            }
        )),
        _ => None,
    }
}

/// `drain`: waits until every LSN cached here for the disks (every attached disk, or those
/// named) is durable on the master target and none needs a resync.
pub async fn drain(admin: &str, disks: &[u64], timeout_s: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    let mut last_print: Option<Instant> = None;
    loop {
        let all = fetch_status(admin).await?;
        if let Some(missing) = disks.iter().find(|d| !all.iter().any(|r| r.disk_id == **d)) {
            return Err(Error::Refused(format!(
                "disk {missing} is not known to this process server (process-server disks lists them)"
            )));
        }
        let gone = |r: &DiskStatus| matches!(r.state.as_str(), "detached" | "retired");
        if let Some(r) = all.iter().find(|r| disks.contains(&r.disk_id) && gone(r)) {
            return Err(Error::Refused(format!(
                "disk {} is {}: nothing more of it is shipped",
                r.disk_id, r.state
            )));
        }
        let rows: Vec<&DiskStatus> = all
            .iter()
            .filter(|r| {
                if disks.is_empty() {
                    !gone(r)
                } else {
                    disks.contains(&r.disk_id)
                }
            })
            .collect();
        let waiting: Vec<String> = rows.iter().filter_map(|r| pending(r)).collect();
        if waiting.is_empty() {
            if rows.is_empty() {
                println!("no disk to drain: every disk here is detached or retired (process-server disks lists them)");
            }
            for r in &rows {
                println!(
                    "disk {}: drained, lsn {} durable on the master target",
                    r.disk_id, r.durable_lsn
                );
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Refused(format!(
                "not drained after {timeout_s} s:\n  {}",
                waiting.join("\n  ")
            )));
        }
        if last_print.is_none_or(|t| t.elapsed() >= Duration::from_millis(DRAIN_PRINT_MS)) {
            for w in &waiting {
                println!("{w}");
            }
            last_print = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(DRAIN_POLL_MS)).await;
    }
}

/// POSTs a state change and prints the answer.
async fn change(admin: &str, path: &str, body: &str) -> Result<()> {
    let (code, answer) = request(admin, Method::Post, path, body).await?;
    if code == 200 {
        print!("{answer}");
        Ok(())
    } else {
        Err(Error::Refused(answer.trim().to_owned()))
    }
}

/// `retire`: deletes a detached disk's cache; it is never attached again.
pub async fn retire(admin: &str, disk: u64) -> Result<()> {
    change(admin, "/disks/retire", &disk.to_string()).await
}

/// `set-bandwidth`: changes the link's limit at once.
pub async fn set_bandwidth(admin: &str, rate: &str) -> Result<()> {
    change(admin, "/bandwidth", rate).await
}

/// `groups`: every replication group's figures.
pub async fn groups(admin: &str, json: bool) -> Result<()> {
    let (code, body) = request(admin, Method::Get, "/groups", "").await?;
    if code != 200 {
        return Err(Error::Refused(format!(
            "the process server answered /groups with HTTP {code}: {}",
            body.trim()
        )));
    }
    if json {
        println!("{body}");
        return Ok(());
    }
    let groups = parse_groups(&body)?;
    if groups.is_empty() {
        println!("no replication groups configured (process-server --group ID=VM,VM,...)");
    }
    print_groups(groups);
    Ok(())
}

fn parse_groups(body: &str) -> Result<Vec<crate::cuts::GroupStatus>> {
    serde_json::from_str(body).map_err(|e| {
        Error::Refused(format!(
            "the process server's group status could not be read ({e})"
        ))
    })
}

/// The groups' table (`groups`, and `status` below its disks).
fn print_groups(groups: Vec<crate::cuts::GroupStatus>) {
    println!(
        "{:<16} {:>5} {:>9} {:>8} {:>7} {:>9} {:>7} {:>10} {:>10}  last abandoned or skipped",
        "GROUP",
        "DISKS",
        "CONNECTED",
        "RPO",
        "CUTS",
        "ABANDONED",
        "SKIPPED",
        "PAUSE_P99",
        "PAUSE_MAX"
    );
    for g in groups {
        println!(
            "{:<16} {:>5} {:>9} {:>8} {:>7} {:>9} {:>7} {:>8.1}ms {:>8.1}ms  {}",
            g.group,
            g.disks.len(),
            g.connected.len(),
            fmt_secs(g.rpo_ms as f64 / 1000.0),
            g.cuts_made,
            g.cuts_abandoned,
            g.cuts_skipped,
            g.pause_p99_us as f64 / 1000.0,
            g.pause_max_us as f64 / 1000.0,
            g.last_abandoned
        );
    }
}

/// `group-bookmark`: an app-consistent bookmark of a whole group, durable on the master
/// target before this returns 0.
pub async fn group_bookmark(
    admin: &str,
    (group, tag): (&str, &str),
    wait_s: u64,
    json: bool,
) -> Result<()> {
    let body = serde_json::to_string(&crate::cli::GroupBookmarkRequest {
        group: group.into(),
        tag: tag.into(),
        wait_s: wait_s.min(crate::cli::MAX_GROUP_BOOKMARK_WAIT_S),
    })
    .expect("serializable");
    let (code, answer) = request(admin, Method::Post, "/groups/bookmark", &body).await?;
    let refused = |why: String| {
        if json {
            // A script gets an answer to parse either way.
            println!(
                "{}",
                serde_json::json!({"group": group, "tag": tag, "made": false, "durable": false, "error": why})
            );
        }
        Error::Refused(why)
    };
    if code != 200 {
        return Err(refused(answer.trim().to_owned()));
    }
    let r: crate::cuts::BookmarkResult = serde_json::from_str(&answer).map_err(|e| {
        refused(format!(
            "the process server's answer could not be read ({e}): {answer}"
        ))
    })?;
    if json {
        println!(
            "{}",
            serde_json::json!({"group": group, "tag": tag, "made": true, "cut_id": r.cut_id, "marks": r.marks, "durable": r.durable})
        );
    } else {
        let marks: Vec<String> = r
            .marks
            .iter()
            .map(|(disk, lsn)| format!("disk {disk} at lsn {lsn}"))
            .collect();
        println!(
            "group {group}: bookmark {tag:?} is cut {} (markers: {}){}",
            r.cut_id,
            marks.join(", "),
            if r.durable {
                "; durable on the master target: list it with `master-target points --group`"
            } else {
                ""
            }
        );
    }
    if r.durable {
        Ok(())
    } else {
        Err(Error::Refused(format!(
            "group {group}: cut {} was made, but not every marker is durable on the master target yet; it becomes a group point when they are (check process-server status)",
            r.cut_id
        )))
    }
}
