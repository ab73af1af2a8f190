//! `failback demo --group`: two VMs of one replication group fail back together.
//!
//! 1. certificates;
//! 2. the services, the process server with the group `demo` of vm1 and vm2;
//! 3. each VM's source disk and a stale on-premises VMDK of it;
//! 4. both agents resync differentially and replay the trace (slowed, so cuts land
//!    mid-stream) while the process server cuts the group every second and the demo takes
//!    app-consistent group bookmarks on demand;
//! 5. drain and detach both;
//! 6. verify each on-premises disk equals its source, and export the latest and an earlier
//!    group point whole: every disk of it must equal what its agent recorded while it held
//!    writes for that cut.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use failback::harness::{file_blake3, Cluster, Result};
use serde_json::json;

use crate::demo::{digest_of, fail, human, io, make_disks, step, DemoArgs};

const GROUP: &str = "demo";
/// The group's VMs: (vm, disk id).
const VMS: [(&str, u64); 2] = [("vm1", 1), ("vm2", 2)];
/// The built-in trace lasts 0.14 s; at this pace about 5 s, so cuts land mid-stream.
const PACE: &str = "0.025x";
/// How often the demo takes an on-demand group bookmark while the agents run.
const BOOKMARK_EVERY_MS: u64 = 1_500;

fn source(dir: &Path, vm: &str, disk: u64) -> PathBuf {
    dir.join("source").join(format!("{vm}-disk{disk}.img"))
}

fn vm_folder(dir: &Path, vm: &str) -> PathBuf {
    dir.join("onprem").join(vm)
}

/// The whole group failback; returns the summary.
pub fn demo(args: &DemoArgs, dir: &Path) -> Result<serde_json::Value> {
    let disk_bytes = runtime::units::parse_bytes(&args.disk_size).map_err(fail)?;
    let bin = std::env::current_exe().map_err(io("find own binary"))?;
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    step(1, "making a CA and server/client certificates");
    let dir = std::path::absolute(dir).map_err(io(format!("resolve {}", dir.display())))?;
    let mut c = Cluster::new(&dir, &bin)?;
    c.ps_extra = vec![
        format!("--group={GROUP}=vm1,vm2"),
        "--group-cut-interval-s=1".into(),
    ];
    if let Some(l) = &args.link {
        runtime::units::parse_rate(l).map_err(fail)?;
        c.ps_extra.push(format!("--max-bandwidth={l}"));
    }
    step(
        2,
        &format!("starting master-target and process-server (replication group {GROUP}: vm1, vm2)"),
    );
    c.start_mt()?;
    c.start_ps()?;
    c.wait_linked(Duration::from_secs(30))?;
    step(
        3,
        &format!(
            "making each VM's source disk ({}) and a stale on-premises VMDK of it",
            args.disk_size
        ),
    );
    for (vm, disk) in VMS {
        let name = format!("{vm}-disk{disk}");
        make_disks(
            &source(&dir, vm, disk),
            (&vm_folder(&dir, vm), &name),
            disk_bytes,
            args.differ_percent,
            args.compressibility,
        )?;
    }
    let trace = dir.join("tpcc-small.disksim");
    std::fs::write(&trace, crate::demo::DEFAULT_TRACE)
        .map_err(io(format!("write {}", trace.display())))?;

    step(4, "both agents resync, then replay while the group is cut every second and bookmarked on demand");
    let started = Instant::now();
    let mut agents = Vec::new();
    for (vm, disk) in VMS {
        agents.push(start_agent(&c, args, &dir, (vm, disk), &trace)?);
    }
    let reports = watch(&c, agents, started)?;
    let replicate_secs = started.elapsed().as_secs_f64();

    step(5, "failing back the group: both disks drained and detached");
    let failback_started = Instant::now();
    for ((_, disk), r) in VMS.iter().zip(&reports) {
        let lsn = r["last_lsn"]
            .as_u64()
            .ok_or_else(|| fail("no last_lsn in an agent's report"))?;
        c.wait_durable(*disk, lsn, Duration::from_secs(600), |_| {})?;
    }
    let groups = group_status(&c);
    for (_, disk) in VMS {
        c.detach(disk)?;
    }
    step(
        6,
        "verifying every disk, and the latest and an earlier group point exported whole",
    );
    let v = verify(&c, &dir)?;
    let failback_secs = failback_started.elapsed().as_secs_f64();
    c.stop();
    for p in &v.problems {
        eprintln!("MISMATCH: {p}");
    }
    Ok(json!({
        "verified": v.problems.is_empty(),
        "mode": "group",
        "group": GROUP,
        "disk_bytes": disk_bytes,
        "writes": reports.iter().map(|r| r["writes"].as_u64().unwrap_or(0)).sum::<u64>(),
        "seconds": replicate_secs,
        "failback_seconds": failback_secs,
        "group_points": v.group_points,
        "app_consistent_group_points": v.app_points,
        "latest_group_point": v.latest,
        "earlier_group_point_checked": v.earlier,
        "cuts_made": groups["cuts_made"],
        "cuts_abandoned": groups["cuts_abandoned"],
        "cut_pause_p50_ms": groups["pause_p50_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "cut_pause_p99_ms": groups["pause_p99_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "cut_pause_max_ms": groups["pause_max_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "disks": v.disks,
        "kept_in": args.keep.as_ref().map(|d| d.display().to_string()),
    }))
}

fn start_agent(
    c: &Cluster,
    args: &DemoArgs,
    dir: &Path,
    (vm, disk): (&str, u64),
    trace: &Path,
) -> Result<Child> {
    let folder = vm_folder(dir, vm);
    let mut agent = c.agent_in_vm("replay", vm, disk, &source(dir, vm, disk), &args.disk_size);
    let log =
        std::fs::File::create(dir.join(format!("logs/agent-{vm}.log"))).map_err(io("agent log"))?;
    agent
        .arg(format!("--trace={}", trace.display()))
        .arg("--format=disksim-ns")
        .arg("--device=all")
        .arg(format!("--pace={PACE}"))
        .arg(format!("--compressibility={}", args.compressibility))
        .arg("--location=original")
        .arg(format!(
            "--target={}",
            folder.join(format!("{vm}-disk{disk}.vmdk")).display()
        ))
        .arg("--resync=differential")
        .arg(format!("--group={GROUP}"))
        // Each VM writes its own data.
        .arg(format!("--seed={disk}"))
        .arg("--final-bookmark=failback-final")
        .stdout(Stdio::piped())
        .stderr(log);
    agent.spawn().map_err(io("start an agent"))
}

/// The group's figures from the process server (`null` if unreadable).
fn group_status(c: &Cluster) -> serde_json::Value {
    failback::harness::http_get(&c.ps_admin, "/groups")
        .ok()
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
        .map_or(serde_json::Value::Null, |v| v[0].clone())
}

/// Shows progress and takes on-demand group bookmarks until both agents end; returns
/// their reports.
fn watch(c: &Cluster, mut agents: Vec<Child>, started: Instant) -> Result<Vec<serde_json::Value>> {
    let bar = indicatif::ProgressBar::new_spinner();
    let mut next_bookmark = Instant::now() + Duration::from_millis(BOOKMARK_EVERY_MS);
    let mut n = 0;
    // Bounded: 30 minutes.
    while agents
        .iter_mut()
        .any(|a| a.try_wait().ok().flatten().is_none())
    {
        if started.elapsed() > Duration::from_secs(1800) {
            agents.iter_mut().for_each(|a| drop(a.kill()));
            return Err(fail("the agents did not finish in 30 minutes"));
        }
        if Instant::now() >= next_bookmark {
            n += 1;
            // Refused while a disk resyncs (the group is not consistent yet): said in the log.
            let _ = Command::new(&c.bin)
                .args([
                    "process-server",
                    "group-bookmark",
                    "--wait-s=0",
                    &format!("--group={GROUP}"),
                ])
                .arg(format!("--admin={}", c.ps_admin))
                .arg(format!("--tag=demo-app-{n}"))
                .output();
            next_bookmark = Instant::now() + Duration::from_millis(BOOKMARK_EVERY_MS);
        }
        let g = group_status(c);
        bar.set_message(format!(
            "group {GROUP}: RPO {:.1} s | cuts made {} abandoned {} | pause p99 {:.1} ms",
            g["rpo_ms"].as_f64().unwrap_or(0.0) / 1000.0,
            g["cuts_made"],
            g["cuts_abandoned"],
            g["pause_p99_us"].as_f64().unwrap_or(0.0) / 1000.0
        ));
        bar.tick();
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
    let mut reports = Vec::new();
    for (a, (vm, _)) in agents.into_iter().zip(VMS) {
        let out = a.wait_with_output().map_err(io("agent"))?;
        if !out.status.success() {
            return Err(fail(format!(
                "the agent of {vm} failed ({}); see logs/agent-{vm}.log",
                out.status
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        reports.push(
            text.lines()
                .find_map(|l| serde_json::from_str(l).ok())
                .ok_or_else(|| fail(format!("the agent of {vm} printed no report")))?,
        );
    }
    Ok(reports)
}

struct Verified {
    problems: Vec<String>,
    group_points: usize,
    app_points: usize,
    latest: Option<u64>,
    earlier: Option<u64>,
    disks: Vec<serde_json::Value>,
}

fn verify(c: &Cluster, dir: &Path) -> Result<Verified> {
    let mut problems = Vec::new();
    let mut disks = Vec::new();
    for (vm, disk) in VMS {
        let (s, d) = (
            file_blake3(&source(dir, vm, disk))?,
            file_blake3(&vm_folder(dir, vm).join(format!("{vm}-disk{disk}-flat.vmdk")))?,
        );
        if s != d {
            problems.push(format!("{vm}'s on-premises disk differs from its source"));
        }
        disks.push(json!({"vm": vm, "disk": disk, "source_blake3": s.to_hex().to_string(), "onprem_blake3": d.to_hex().to_string()}));
    }
    let mut args = vec![
        "points".to_owned(),
        format!("--group={GROUP}"),
        "--json".into(),
    ];
    args.extend(c.mt_dirs());
    let points: Vec<serde_json::Value> = c
        .mt_cmd(&args)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if points.len() < 2 {
        problems.push(format!(
            "{} group points were made; at least 2 were expected",
            points.len()
        ));
    }
    let latest = points.last().and_then(|p| p["id"].as_u64());
    let earlier = (points.len() >= 2)
        .then(|| points[points.len() / 2 - 1]["id"].as_u64())
        .flatten();
    for id in [latest, earlier].into_iter().flatten() {
        check_point(c, dir, id, &mut problems)?;
    }
    Ok(Verified {
        problems,
        app_points: points
            .iter()
            .filter(|p| p["kind"] == "app-consistent")
            .count(),
        group_points: points.len(),
        latest,
        earlier,
        disks,
    })
}

/// Exports group point `id` whole (VMDKs) and checks each disk against its agent's record.
fn check_point(c: &Cluster, dir: &Path, id: u64, problems: &mut Vec<String>) -> Result<()> {
    let out = dir.join("onprem").join(format!("group-point-{id}"));
    std::fs::create_dir_all(&out).map_err(io(format!("create {}", out.display())))?;
    let mut args = vec![
        "export".to_owned(),
        format!("--group={GROUP}"),
        format!("--point={id}"),
        format!("--out={}", out.display()),
        "--format=vmdk".into(),
    ];
    args.extend(c.mt_dirs());
    c.mt_cmd(&args)?;
    for (vm, disk) in VMS {
        let records =
            agent::engine::read_bookmarks(&c.agent_state(disk)).map_err(|e| fail(e.to_string()))?;
        let Some(r) = records.iter().find(|r| r.group_marker == id) else {
            problems.push(format!("{vm} has no record of group point {id}"));
            continue;
        };
        let got = digest_of(&out.join(format!("{vm}-disk-{disk}-flat.vmdk")))?;
        if got != r.disk_digest {
            problems.push(format!("group point {id}: {vm}'s disk exports to digest {got}, but its agent recorded {} when it held writes for the cut", r.disk_digest));
        }
    }
    Ok(())
}

/// The rows of the human summary.
pub fn rows(s: &serde_json::Value) -> Vec<(&'static str, String)> {
    let ms = |k: &str| s[k].as_f64().unwrap_or(0.0);
    vec![
        ("verified", s["verified"].to_string()),
        (
            "group",
            format!("{} ({} VMs)", s["group"].as_str().unwrap_or(""), VMS.len()),
        ),
        ("writes", s["writes"].to_string()),
        ("disk size", human(s["disk_bytes"].as_u64().unwrap_or(0))),
        (
            "group points",
            format!(
                "{} ({} app-consistent)",
                s["group_points"], s["app_consistent_group_points"]
            ),
        ),
        (
            "cuts made / abandoned",
            format!("{} / {}", s["cuts_made"], s["cuts_abandoned"]),
        ),
        (
            "cut pause p50/p99/max",
            format!(
                "{:.2} / {:.2} / {:.2} ms",
                ms("cut_pause_p50_ms"),
                ms("cut_pause_p99_ms"),
                ms("cut_pause_max_ms")
            ),
        ),
        (
            "latest group point",
            format!("{} (every disk exported, checked)", s["latest_group_point"]),
        ),
        (
            "earlier group point",
            format!(
                "{} (every disk exported, checked)",
                s["earlier_group_point_checked"]
            ),
        ),
        (
            "replicate / failback",
            format!("{:.1} s / {:.1} s", ms("seconds"), ms("failback_seconds")),
        ),
    ]
}
