//! Runs a master target and a process server as real processes on loopback, with real
//! certificates, and drives agents against them.
//!
//! Every wait is bounded in time; children are killed when the harness is dropped.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What can go wrong while running the services.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A step did not go as it must.
    #[error("{0}")]
    Failed(String),
}

/// Result with the harness's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

fn io<T>(r: std::io::Result<T>, context: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|source| Error::Io {
        context: context(),
        source,
    })
}

/// Lowest port [`free_port`] hands out: below it, privileged and well-known services.
const TEST_PORT_LOW: u16 = 20_000;
/// Tries before [`free_port`] lets the kernel choose.
const FREE_PORT_TRIES: u32 = 500;
/// How often `wait_durable` reads the status: the benches time short cases by it.
const DURABLE_POLL_MS: u64 = 20;

/// A free port on loopback (bound, then released), from below the kernel's ephemeral range.
///
/// Why not port 0: the kernel hands ports of its ephemeral range to every outgoing
/// connection too, so a service restarted on the port it had (a process server after a
/// SIGKILL) could find it taken by some client's connection (seen once in CI: the restarted
/// process server exited "address in use"). Ports below the range are never given out
/// that way. Nor is a port handed out twice in one process: tests of one binary run in
/// parallel, and a port released by the check could be picked again for another cluster
/// before its service bound it (seen once in CI: "address in use" at a process server's
/// first start).
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: std::sync::Mutex<Option<std::collections::HashSet<u16>>> =
        std::sync::Mutex::new(None);
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(Default::default);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > TEST_PORT_LOW + 1_000 {
        for _ in 0..FREE_PORT_TRIES {
            let port = fastrand::u16(TEST_PORT_LOW..ephemeral_low);
            if !handed.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                handed.insert(port);
                return Ok(port);
            }
        }
    }
    let l = io(TcpListener::bind("127.0.0.1:0"), || {
        "find a free port".into()
    })?;
    Ok(io(l.local_addr(), || "local addr".into())?.port())
}

/// The last lines of a service's log, for an error that says why it did not start.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Per-disk figures from the process server's `/status`.
pub use process_server::metrics::DiskStatus;

/// The two services and their directories.
pub struct Cluster {
    /// Working directory.
    pub dir: PathBuf,
    /// The `failback` binary (runs every service).
    pub bin: PathBuf,
    /// Certificates.
    pub tls: PathBuf,
    /// Master target address.
    pub mt_addr: String,
    /// Master target admin address.
    pub mt_admin: String,
    /// Process server address.
    pub ps_addr: String,
    /// Process server admin address.
    pub ps_admin: String,
    /// Extra process-server flags (e.g. `--max-bandwidth`).
    pub ps_extra: Vec<String>,
    /// Extra master-target flags.
    pub mt_extra: Vec<String>,
    /// Where the process server reaches the master target, if not directly (a relay).
    pub ps_upstream: Option<String>,
    /// The network namespace the master target runs in (`ip netns exec`), if not this one:
    /// the WAN bench puts it behind a shaped link.
    pub mt_netns: Option<String>,
    mt: Option<Child>,
    ps: Option<Child>,
    /// Extra master targets: address and process.
    extra_mts: Vec<(String, Child)>,
}

impl Cluster {
    /// Makes certificates and directories under `dir`; starts nothing yet.
    pub fn new(dir: &Path, bin: &Path) -> Result<Cluster> {
        // Absolute: the master target takes only absolute datastore paths.
        let dir = &io(std::path::absolute(dir), || {
            format!("resolve {}", dir.display())
        })?;
        for d in [
            "tls",
            "logs",
            "data/master-target",
            "data/retention",
            "data/process-server",
            "onprem",
            "source",
            "agents",
        ] {
            io(std::fs::create_dir_all(dir.join(d)), || {
                format!("create {}", dir.join(d).display())
            })?;
        }
        let tls = dir.join("tls");
        if !tls.join("ca.pem").exists() {
            runtime::tls::make_test_pki(&tls, &["localhost".into(), "127.0.0.1".into()], &[])
                .map_err(|e| Error::Failed(format!("certificates: {e}")))?;
        }
        let port = |_| -> Result<String> { Ok(format!("127.0.0.1:{}", free_port()?)) };
        Ok(Cluster {
            dir: dir.into(),
            bin: bin.into(),
            tls,
            mt_addr: port(0)?,
            mt_admin: port(1)?,
            ps_addr: port(2)?,
            ps_admin: port(3)?,
            ps_extra: Vec::new(),
            mt_extra: Vec::new(),
            ps_upstream: None,
            mt_netns: None,
            mt: None,
            ps: None,
            extra_mts: Vec::new(),
        })
    }

    /// Starts `failback SERVICE ARGS`, logging to `logs/LOG.log`.
    fn spawn(&self, service: &str, log: &str, args: &[String]) -> Result<Child> {
        let name = service;
        let log = self.dir.join("logs").join(format!("{log}.log"));
        let out = io(File::options().create(true).append(true).open(&log), || {
            format!("open {}", log.display())
        })?;
        let err = io(out.try_clone(), || "dup log".into())?;
        let mut cmd = match (&self.mt_netns, name) {
            (Some(ns), "master-target") => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            _ => Command::new(&self.bin),
        };
        io(
            cmd.arg(name)
                .args(args)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn(),
            || format!("start {name} ({})", self.bin.display()),
        )
    }

    /// Starts the master target.
    pub fn start_mt(&mut self) -> Result<()> {
        let (addr, admin) = (self.mt_addr.clone(), self.mt_admin.clone());
        self.mt = Some(self.spawn_mt("", &addr, &admin)?);
        Ok(())
    }

    /// Starts one more master target (its directories end in `-N`, its VMDKs go to
    /// `onprem-N`); the process server, started after, fills the master targets in order.
    /// Returns its address.
    pub fn start_extra_mt(&mut self) -> Result<String> {
        let n = self.extra_mts.len() + 2;
        let (addr, admin) = (
            format!("127.0.0.1:{}", free_port()?),
            format!("127.0.0.1:{}", free_port()?),
        );
        let child = self.spawn_mt(&mt_suffix(n), &addr, &admin)?;
        self.extra_mts.push((addr.clone(), child));
        Ok(addr)
    }

    fn spawn_mt(&self, suffix: &str, addr: &str, admin: &str) -> Result<Child> {
        let d = &self.dir;
        let mut args: Vec<String> = vec![
            "serve".into(),
            format!("--listen={addr}"),
            format!("--admin-listen={admin}"),
            format!(
                "--data-dir={}",
                d.join(format!("data/master-target{suffix}")).display()
            ),
            format!(
                "--retention-dir={}",
                d.join(format!("data/retention{suffix}")).display()
            ),
            format!(
                "--datastore-dirs={}",
                d.join(format!("onprem{suffix}")).display()
            ),
            format!("--tls-ca={}", self.tls.join("ca.pem").display()),
            format!(
                "--tls-cert={}",
                self.tls.join("master-target.pem").display()
            ),
            format!("--tls-key={}", self.tls.join("master-target.key").display()),
            "--allow-shared-retention-volume".into(),
        ];
        args.extend(self.mt_extra.iter().cloned());
        let log = format!("master-target{suffix}");
        let mut child = self.spawn("master-target", &log, &args)?;
        self.wait_started(&mut child, &log, admin, "/health")?;
        Ok(child)
    }

    /// Starts the process server.
    pub fn start_ps(&mut self) -> Result<()> {
        let mut args: Vec<String> = vec![
            "serve".into(),
            format!("--listen={}", self.ps_addr),
            format!("--admin-listen={}", self.ps_admin),
            format!(
                "--master-target={}",
                self.ps_upstream.clone().unwrap_or_else(|| {
                    std::iter::once(self.mt_addr.clone())
                        .chain(self.extra_mts.iter().map(|m| m.0.clone()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
            ),
            format!(
                "--cache-dir={}",
                self.dir.join("data/process-server").display()
            ),
            format!("--tls-ca={}", self.tls.join("ca.pem").display()),
            format!(
                "--tls-cert={}",
                self.tls.join("process-server.pem").display()
            ),
            format!(
                "--tls-key={}",
                self.tls.join("process-server.key").display()
            ),
        ];
        args.extend(self.ps_extra.iter().cloned());
        let mut child = self.spawn("process-server", "process-server", &args)?;
        let waited = self.wait_started(&mut child, "process-server", &self.ps_admin, "/metrics");
        self.ps = Some(child);
        waited
    }

    /// Waits until a service just started answers `path` with 200, or says why not: it
    /// exited (with its log's last lines), or it did not answer in 30 s.
    fn wait_started(&self, child: &mut Child, log: &str, addr: &str, path: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                let file = self.dir.join("logs").join(format!("{log}.log"));
                return Err(Error::Failed(format!(
                    "{log} exited ({status}) instead of serving {addr}; {} ends:\n{}",
                    file.display(),
                    log_tail(&file)
                )));
            }
            if matches!(http_get(addr, path), Ok((200, _))) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(Error::Failed(format!(
            "{addr}{path} did not answer in 30 s; see the logs in {}",
            self.dir.join("logs").display()
        )))
    }

    /// Waits until the process server is linked to the master target.
    pub fn wait_linked(&self, max: Duration) -> Result<()> {
        self.wait_http(&self.ps_admin, "/health", |c| c == 200, max)
    }

    fn wait_http(
        &self,
        addr: &str,
        path: &str,
        ok: impl Fn(u16) -> bool,
        max: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + max;
        while Instant::now() < deadline {
            if let Ok((code, _)) = http_get(addr, path) {
                if ok(code) {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(Error::Failed(format!(
            "{addr}{path} did not answer in {max:?}; see the logs in {}",
            self.dir.join("logs").display()
        )))
    }

    /// The process ids of the master target and the process server, when running.
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        (
            self.mt.as_ref().map(Child::id),
            self.ps.as_ref().map(Child::id),
        )
    }

    /// SIGKILLs the master target (as a crash would).
    pub fn kill_mt(&mut self) {
        kill(self.mt.take());
    }

    /// SIGKILLs the process server.
    pub fn kill_ps(&mut self) {
        kill(self.ps.take());
    }

    /// Stops the master target with SIGTERM (a clean stop); returns whether it exited 0.
    pub fn term_mt(&mut self) -> bool {
        term(self.mt.take())
    }

    /// Stops the process server with SIGTERM; returns whether it exited 0.
    pub fn term_ps(&mut self) -> bool {
        term(self.ps.take())
    }

    /// Per-disk status from the process server.
    pub fn ps_status(&self) -> Result<Vec<DiskStatus>> {
        let (code, body) = io(http_get(&self.ps_admin, "/status"), || {
            format!("status from {}", self.ps_admin)
        })?;
        if code != 200 {
            return Err(Error::Failed(format!("status: HTTP {code}")));
        }
        serde_json::from_str(&body).map_err(|e| Error::Failed(format!("status: {e}")))
    }

    /// Waits until the master target holds `lsn` of `disk_id`. Calls `tick` with each status.
    pub fn wait_durable(
        &self,
        disk_id: u64,
        lsn: u64,
        max: Duration,
        mut tick: impl FnMut(&DiskStatus),
    ) -> Result<()> {
        let deadline = Instant::now() + max;
        while Instant::now() < deadline {
            if let Some(s) = self
                .ps_status()
                .ok()
                .and_then(|v| v.into_iter().find(|s| s.disk_id == disk_id))
            {
                tick(&s);
                if s.durable_lsn >= lsn {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(DURABLE_POLL_MS));
        }
        Err(Error::Failed(format!(
            "disk {disk_id} did not reach lsn {lsn} on the master target within {max:?}; status {:?}\n{}",
            self.ps_status().ok().and_then(|v| v.into_iter().find(|s| s.disk_id == disk_id)),
            self.log_tails(30)
        )))
    }

    /// The TLS directory of VM `vm`'s agent (its certificate is issued on first use).
    pub fn agent_tls(&self, vm: &str) -> PathBuf {
        let dir = self.tls.join("agents").join(vm);
        if !dir.join("agent.pem").exists() {
            runtime::tls::issue_agent(&self.tls, vm).expect("issue an agent certificate");
        }
        dir
    }

    /// The last `lines` lines of each service's log (for a failure's message).
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for name in ["process-server", "master-target"] {
            let text = std::fs::read_to_string(self.dir.join("logs").join(format!("{name}.log")))
                .unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {name}.log (last {lines} lines)\n"));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// An `agent` command for a disk (of VM `vm{disk_id}`), with the cluster's addresses and
    /// that VM's certificate.
    pub fn agent(&self, sub: &str, disk_id: u64, source: &Path, disk_size: &str) -> Command {
        self.agent_in_vm(sub, &format!("vm{disk_id}"), disk_id, source, disk_size)
    }

    /// [`Cluster::agent`] for a disk of VM `vm` (a VM with several disks runs one agent
    /// process per disk, all with the VM's certificate).
    pub fn agent_in_vm(
        &self,
        sub: &str,
        vm: &str,
        disk_id: u64,
        source: &Path,
        disk_size: &str,
    ) -> Command {
        let tls = self.agent_tls(vm);
        self.agent_command(sub, vm, disk_id, source, disk_size, &tls)
    }

    /// [`Cluster::agent`] with the TLS files of `tls` (tests of wrong certificates).
    pub fn agent_with_tls(
        &self,
        sub: &str,
        disk_id: u64,
        source: &Path,
        disk_size: &str,
        tls: &Path,
    ) -> Command {
        self.agent_command(
            sub,
            &format!("vm{disk_id}"),
            disk_id,
            source,
            disk_size,
            tls,
        )
    }

    fn agent_command(
        &self,
        sub: &str,
        vm: &str,
        disk_id: u64,
        source: &Path,
        disk_size: &str,
        tls: &Path,
    ) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("agent").arg(sub);
        c.arg(format!("--source={}", source.display()))
            .arg("--create-source")
            .arg(format!("--disk-size={disk_size}"))
            .arg(format!("--disk-id={disk_id}"))
            .arg(format!("--vm-id={vm}"))
            .arg(format!("--process-server={}", self.ps_addr))
            .arg(format!("--tls-dir={}", tls.display()))
            .arg(format!(
                "--state-dir={}",
                self.agent_state(disk_id).display()
            ));
        c.stdin(Stdio::null());
        c
    }

    /// The state directory of the agent of `disk_id`.
    pub fn agent_state(&self, disk_id: u64) -> PathBuf {
        self.dir.join("agents").join(format!("disk-{disk_id}"))
    }

    /// Runs `failback master-target ARGS` (points, export, detach) and returns its stdout.
    pub fn mt_cmd(&self, args: &[String]) -> Result<String> {
        let mut c = Command::new(&self.bin);
        c.arg("master-target").args(args);
        let out = io(c.output(), || "run master-target".into())?;
        if !out.status.success() {
            return Err(Error::Failed(format!(
                "master-target {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The directory flags of the master target's offline commands.
    pub fn mt_dirs(&self) -> Vec<String> {
        self.mt_dirs_of(1)
    }

    /// [`Cluster::mt_dirs`] of master target `n` (1 is the first; 2.. those of
    /// [`Cluster::start_extra_mt`], in order).
    pub fn mt_dirs_of(&self, n: usize) -> Vec<String> {
        let suffix = mt_suffix(n);
        vec![
            format!(
                "--data-dir={}",
                self.dir
                    .join(format!("data/master-target{suffix}"))
                    .display()
            ),
            format!(
                "--retention-dir={}",
                self.dir.join(format!("data/retention{suffix}")).display()
            ),
            "--allow-shared-retention-volume".into(),
        ]
    }

    /// The datastore of master target `n` (see [`Cluster::mt_dirs_of`]).
    pub fn onprem_of(&self, n: usize) -> PathBuf {
        self.dir.join(format!("onprem{}", mt_suffix(n)))
    }

    /// The process ids of every running master target, the first one first.
    pub fn mt_pids(&self) -> Vec<u32> {
        self.mt
            .iter()
            .map(Child::id)
            .chain(self.extra_mts.iter().map(|(_, c)| c.id()))
            .collect()
    }

    /// Detaches a disk from the running master target (releasing its lock).
    pub fn detach(&self, disk_id: u64) -> Result<String> {
        self.detach_on(1, disk_id)
    }

    /// [`Cluster::detach`] on master target `n` (see [`Cluster::mt_dirs_of`]).
    pub fn detach_on(&self, n: usize, disk_id: u64) -> Result<String> {
        let addr = match n {
            1 => self.mt_addr.clone(),
            _ => self
                .extra_mts
                .get(n - 2)
                .map(|(a, _)| a.clone())
                .ok_or_else(|| Error::Failed(format!("no master target {n}")))?,
        };
        self.mt_cmd(&[
            "detach".into(),
            format!("--connect={addr}"),
            format!("--tls-dir={}", self.tls.display()),
            format!("--disk={disk_id}"),
        ])
    }

    /// Exports `disk_id` at `point` to `out` (the disk must be detached or the service stopped).
    pub fn export(&self, disk_id: u64, point: &str, out: &Path, format: &str) -> Result<String> {
        self.export_on(1, disk_id, point, out, format)
    }

    /// [`Cluster::export`] from master target `n` (see [`Cluster::mt_dirs_of`]).
    pub fn export_on(
        &self,
        n: usize,
        disk_id: u64,
        point: &str,
        out: &Path,
        format: &str,
    ) -> Result<String> {
        let mut args = vec![
            "export".to_string(),
            format!("--disk={disk_id}"),
            format!("--point={point}"),
            format!("--out={}", out.display()),
            format!("--format={format}"),
        ];
        args.extend(self.mt_dirs_of(n));
        self.mt_cmd(&args)
    }

    /// Recovery points of a disk, as JSON objects.
    pub fn points(&self, disk_id: u64) -> Result<Vec<serde_json::Value>> {
        self.points_on(1, disk_id)
    }

    /// [`Cluster::points`] on master target `n` (see [`Cluster::mt_dirs_of`]).
    pub fn points_on(&self, n: usize, disk_id: u64) -> Result<Vec<serde_json::Value>> {
        let mut args = vec![
            "points".to_string(),
            format!("--disk={disk_id}"),
            "--json".into(),
        ];
        args.extend(self.mt_dirs_of(n));
        let out = self.mt_cmd(&args)?;
        out.lines()
            .map(|l| serde_json::from_str(l).map_err(|e| Error::Failed(format!("points: {e}"))))
            .collect()
    }

    /// Stops both services.
    pub fn stop(&mut self) {
        self.kill_ps();
        self.kill_mt();
        for (_, c) in self.extra_mts.drain(..) {
            kill(Some(c));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGTERM, then a bounded wait (SIGKILL after 30 s); whether it exited 0.
fn term(child: Option<Child>) -> bool {
    let Some(mut c) = child else { return false };
    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    unsafe {
        libc::kill(c.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = c.try_wait() {
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
    false
}

fn kill(child: Option<Child>) {
    if let Some(mut c) = child {
        let _ = c.kill(); // SIGKILL
        let _ = c.wait();
    }
}

/// A plain HTTP GET on loopback (admin endpoints).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &addr
            .parse()
            .map_err(|_| std::io::Error::other("bad address"))?,
        Duration::from_secs(2),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((
        code,
        resp.split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned(),
    ))
}

/// blake3 of a whole file.
pub fn file_blake3(path: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    io(h.update_mmap_rayon(path), || {
        format!("hash {}", path.display())
    })?;
    Ok(h.finalize())
}

/// The first block of `block` bytes where two files differ, if any.
pub fn first_difference(a: &Path, b: &Path, block: usize) -> Result<Option<u64>> {
    use std::io::Read;
    let mut fa = io(File::open(a), || format!("open {}", a.display()))?;
    let mut fb = io(File::open(b), || format!("open {}", b.display()))?;
    let (mut ba, mut bb) = (vec![0u8; block], vec![0u8; block]);
    for i in 0u64.. {
        let na = read_full(&mut fa, &mut ba).map_err(|source| Error::Io {
            context: format!("read {}", a.display()),
            source,
        })?;
        let nb = read_full(&mut fb, &mut bb).map_err(|source| Error::Io {
            context: format!("read {}", b.display()),
            source,
        })?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(Some(i));
        }
        if na == 0 {
            return Ok(None);
        }
    }
    fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    }
    unreachable!("the loop returns")
}

/// The suffix of master target `n`'s directories: none for the first, `-N` after.
fn mt_suffix(n: usize) -> String {
    if n <= 1 {
        String::new()
    } else {
        format!("-{n}")
    }
}
