//! Attacks with real certificates against real processes (issue #10): an agent of one VM
//! against another VM's disks, paths from the wire against the master target's files, the
//! wrong roles, and connections that try to hog the services. Each test ends by checking
//! that the victim's data and files are exactly as they were.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use failback::harness::{file_blake3, http_get};
use futures::{SinkExt, StreamExt};
use runtime::net::{connect, ClientSpec, ClientStream, Connected};
use runtime::tls::{client_config, PeerRole, TlsFiles};
use tokio_util::codec::Framed;
use wire_protocol::{
    Bookmark, BookmarkKind, DigestRequest, DiskAttach, ErrorCode, LocationKind, Message,
    MessageCodec, Role, Write, WriteBatch,
};

type Link = Framed<ClientStream, MessageCodec>;

/// Connects to `addr` with `files`, announcing `role`, expecting a server of `expect`.
async fn link(addr: &str, files: &TlsFiles, role: Role, expect: PeerRole) -> runtime::Result<Link> {
    let spec = ClientSpec {
        addr: addr.to_owned(),
        server_name: "127.0.0.1".into(),
        config: client_config(files)?,
        expect,
        role,
        node_id: "attacker".into(),
    };
    let Connected { framed, .. } = connect(&spec, MessageCodec::default()).await?;
    Ok(framed)
}

/// Sends `m` and returns the first answer (bounded), past the durability notes a process
/// server sends of the connection's own disks (checked: never of another VM's disk).
async fn ask(l: &mut Link, m: Message) -> Message {
    l.send(m).await.unwrap();
    for _ in 0..1000 {
        let got = tokio::time::timeout(Duration::from_secs(30), l.next())
            .await
            .expect("an answer in time")
            .expect("an answer, not a close")
            .expect("a valid frame");
        match got {
            Message::RemoteDurable { disk_id, .. } => {
                assert_ne!(disk_id, 2, "vm1's connection is never told of vm2's disk")
            }
            other => return other,
        }
    }
    panic!("no answer among 1000 messages")
}

fn attach(disk_id: u64, vm: &str, location: LocationKind, target: &str, size: u64) -> Message {
    Message::DiskAttach(DiskAttach {
        request_id: 0,
        os_type: String::new(),
        disk_id,
        vm_id: vm.into(),
        group_id: String::new(),
        disk_uuid: [disk_id as u8; 16],
        size_bytes: size,
        sector_size: 512,
        location,
        target: target.into(),
    })
}

fn batch(disk_id: u64, lsn: u64) -> Message {
    let data = Bytes::from(vec![0xAB; 4096]);
    Message::WriteBatch(WriteBatch {
        disk_id,
        first_lsn: lsn,
        writes: vec![Write {
            timestamp_us: 1,
            offset: 0,
            digest: wire_protocol::digest(&data),
            data,
        }],
    })
}

fn assert_refused(m: &Message, code: ErrorCode, what: &str) {
    match m {
        Message::Error(e) => assert_eq!(e.code, code, "{what}: {}", e.message),
        other => panic!("{what}: expected an error {code:?}, got {other:?}"),
    }
}

/// The sum of every sample of metric lines starting with `name`.
fn metric(admin: &str, name: &str) -> f64 {
    let (_, body) = http_get(admin, "/metrics").unwrap();
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn an_agent_can_touch_its_own_vms_disks_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    // The victim: VM 2's disk, replicated to the end.
    let r = finish(
        &c,
        2,
        replay(
            &c,
            2,
            "tpcc-small.disksim",
            "disksim-ns",
            &["--max-writes=300", "--bookmark-every-s=0.02"],
        ),
    );
    c.wait_durable(
        2,
        r["last_lsn"].as_u64().unwrap(),
        Duration::from_secs(60),
        |_| {},
    )
    .unwrap();
    let before = file_blake3(&onprem(&c, 2)).unwrap();
    let lsn = r["last_lsn"].as_u64().unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let vm1 = TlsFiles::of_role(&c.agent_tls("vm1"), PeerRole::Agent);
    rt.block_on(async {
        let mut l = link(&c.ps_addr, &vm1, Role::Agent, PeerRole::ProcessServer)
            .await
            .unwrap();
        let size = 256 << 20;
        // Attach VM 2's disk as VM 2, or claim its id as VM 1.
        let a = ask(&mut l, attach(2, "vm2", LocationKind::Alternate, "", size)).await;
        assert_refused(&a, ErrorCode::Forbidden, "attach as another VM");
        let a = ask(&mut l, attach(2, "vm1", LocationKind::Alternate, "", size)).await;
        assert_refused(&a, ErrorCode::Forbidden, "claim another VM's disk id");
        // Write at the next LSN and at a wrong one: the refusal never tells the LSN.
        for at in [lsn + 1, 1, 999_999] {
            let a = ask(&mut l, batch(2, at)).await;
            assert_refused(&a, ErrorCode::Forbidden, "write into another VM's disk");
            let Message::Error(e) = a else { unreachable!() };
            assert!(!e.message.contains(&(lsn + 1).to_string()), "{}", e.message);
        }
        let a = ask(
            &mut l,
            Message::Bookmark(Bookmark {
                disk_id: 2,
                lsn: lsn + 1,
                kind: BookmarkKind::ResyncStarted,
                time_us: 1,
                group_marker: 0,
                group_members: 0,
                tag: "evil".into(),
            }),
        )
        .await;
        assert_refused(&a, ErrorCode::Forbidden, "bookmark another VM's disk");
        let a = ask(
            &mut l,
            Message::DigestRequest(DigestRequest {
                request_id: 0,
                disk_id: 2,
                block_size: 65536,
                first_block: 0,
                block_count: 16,
            }),
        )
        .await;
        assert_refused(&a, ErrorCode::Forbidden, "read another VM's digests");
        // Detach is an operator command, even for one's own disks.
        for d in [2, 1] {
            let a = ask(&mut l, Message::Detach { disk_id: d }).await;
            assert_refused(&a, ErrorCode::Forbidden, "detach from an agent");
        }
        // Its own VM's disk is fine.
        let a = ask(
            &mut l,
            attach(1, "vm1", LocationKind::Alternate, "", 1 << 20),
        )
        .await;
        assert!(matches!(a, Message::Ack(_)), "own disk: {a:?}");
        // Digests of tiny blocks would give a disk's bytes away: refused even for its own.
        let a = ask(
            &mut l,
            Message::DigestRequest(DigestRequest {
                request_id: 0,
                disk_id: 1,
                block_size: 1,
                first_block: 0,
                block_count: 256,
            }),
        )
        .await;
        assert_refused(&a, ErrorCode::Malformed, "1-byte digest blocks");
        // One VM cannot take every place: past its share, attaches are refused.
        let mut refused = None;
        for id in 100..100 + process_server::ingest::MAX_DISKS_PER_VM as u64 + 1 {
            let a = ask(
                &mut l,
                attach(id, "vm1", LocationKind::Alternate, "", 1 << 20),
            )
            .await;
            if let Message::Error(e) = a {
                refused = Some((id, e.code));
                break;
            }
        }
        assert_eq!(
            refused,
            Some((
                99 + process_server::ingest::MAX_DISKS_PER_VM as u64,
                ErrorCode::DiskLimit
            )),
            "vm1 has disk 1 and {} more at most",
            process_server::ingest::MAX_DISKS_PER_VM - 1
        );
    });
    assert!(metric(&c.ps_admin, "failback_ps_requests_refused_total") >= 9.0);
    // Another process server of the deployment cannot write a disk this one attached.
    let other = c.tls.join("ps-other");
    runtime::tls::issue(
        &c.tls,
        &runtime::tls::IssueRequest {
            identity: runtime::tls::Identity {
                role: PeerRole::ProcessServer,
                name: "ps-other".into(),
            },
            server_names: vec!["127.0.0.1".into()],
            days: 30,
        },
        &other,
    )
    .unwrap();
    rt.block_on(async {
        let files = TlsFiles::of_role(&other, PeerRole::ProcessServer);
        let mut l = link(
            &c.mt_addr,
            &files,
            Role::ProcessServer,
            PeerRole::MasterTarget,
        )
        .await
        .unwrap();
        let a = ask(
            &mut l,
            attach(2, "vm2", LocationKind::Alternate, "", 256 << 20),
        )
        .await;
        assert_refused(&a, ErrorCode::Forbidden, "attach by another process server");
        let a = ask(&mut l, batch(2, lsn + 1)).await;
        assert_refused(&a, ErrorCode::Forbidden, "write by another process server");
    });
    // VM 2's disk is exactly what its agent replicated, and its own agent carries on.
    assert_eq!(file_blake3(&onprem(&c, 2)).unwrap(), before);
    replicate_and_verify(&c, 2, 600);
}

#[test]
fn no_path_from_the_wire_reaches_a_file_outside_the_vms_folder() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let outside = c.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let secret = outside.join("passwd");
    std::fs::write(&secret, b"root:x:0:0\n").unwrap();
    let desc = "createType=\"vmfs\"\nparentCID=ffffffff\nRW 2048 VMFS \"x-flat.vmdk\"\n";
    std::fs::write(outside.join("x.vmdk"), desc).unwrap();
    std::fs::write(outside.join("x-flat.vmdk"), vec![7u8; 1 << 20]).unwrap();
    let ds = c.dir.join("onprem");
    let vm1_dir = ds.join("vm1");
    std::fs::create_dir_all(&vm1_dir).unwrap();
    std::os::unix::fs::symlink(&outside, vm1_dir.join("link-out")).unwrap();
    std::os::unix::fs::symlink(outside.join("x.vmdk"), vm1_dir.join("y.vmdk")).unwrap();
    std::fs::write(vm1_dir.join("notes.txt"), b"hello").unwrap();
    std::fs::write(vm1_dir.join("plain.vmdk"), vec![1u8; 4096]).unwrap();
    std::fs::write(vm1_dir.join("h.vmdk"), desc.replace("x-flat", "h-flat")).unwrap();
    std::fs::hard_link(outside.join("x-flat.vmdk"), vm1_dir.join("h-flat.vmdk")).unwrap();
    let fifo = std::ffi::CString::new(vm1_dir.join("f.vmdk").display().to_string()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    // Another VM's disk in its own folder, and a disk at the datastore's root.
    master_target::vmdk::create(&ds.join("vm2"), "vm2-disk2", 1 << 20, &[2; 16]).unwrap();
    master_target::vmdk::create(&ds, "loose", 1 << 20, &[3; 16]).unwrap();
    let snapshot = |p: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let data = if e.file_type().unwrap().is_file() {
                    std::fs::read(e.path()).unwrap()
                } else {
                    Vec::new()
                };
                (e.file_name().to_string_lossy().into_owned(), data)
            })
            .collect();
        v.sort();
        v
    };
    let before: Vec<_> = [&outside, &ds.join("vm2"), &ds]
        .iter()
        .map(|d| snapshot(d))
        .collect();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let vm1 = TlsFiles::of_role(&c.agent_tls("vm1"), PeerRole::Agent);
    let (o, v, out) = (
        ds.display().to_string(),
        vm1_dir.display().to_string(),
        outside.display().to_string(),
    );
    let original = [
        secret.display().to_string(),
        format!("{v}/../../outside/passwd"),
        format!("{out}/x.vmdk"),
        format!("{v}/link-out/x.vmdk"),
        format!("{v}/y.vmdk"),
        format!("{v}/notes.txt"),
        format!("{v}/plain.vmdk"),
        format!("{v}/h.vmdk"),
        format!("{v}/f.vmdk"),
        format!("{o}/vm2/vm2-disk2.vmdk"),
        format!("{o}/loose.vmdk"),
        "relative/x.vmdk".into(),
    ];
    let alternate = [
        out.clone(),
        format!("{v}/link-out"),
        format!("{o}/../outside"),
        format!("{o}/vm2"),
    ];
    let cases = original
        .iter()
        .map(|t| (LocationKind::Original, t))
        .chain(alternate.iter().map(|t| (LocationKind::Alternate, t)));
    rt.block_on(async {
        let mut l = link(&c.ps_addr, &vm1, Role::Agent, PeerRole::ProcessServer)
            .await
            .unwrap();
        for (i, (loc, target)) in cases.enumerate() {
            let a = ask(&mut l, attach(10 + i as u64, "vm1", loc, target, 1 << 20)).await;
            let Message::Error(e) = &a else {
                panic!("{target}: accepted: {a:?}")
            };
            assert!(
                matches!(e.code, ErrorCode::UnsupportedDisk | ErrorCode::Forbidden),
                "{target}: {e:?}"
            );
            // The refusal says why, never what a file holds.
            assert!(!e.message.contains("root:"), "{}", e.message);
        }
    });
    let after: Vec<_> = [&outside, &ds.join("vm2"), &ds]
        .iter()
        .map(|d| snapshot(d))
        .collect();
    assert_eq!(
        after, before,
        "nothing outside vm1's folder was touched or made"
    );
    assert_eq!(std::fs::read(vm1_dir.join("notes.txt")).unwrap(), b"hello");
    // The master target is still up and takes a legitimate disk; once that disk is detached
    // for failback, no new disk id may attach its file again.
    replicate_and_verify(&c, 1, 200);
    rt.block_on(async {
        let mut l = link(&c.ps_addr, &vm1, Role::Agent, PeerRole::ProcessServer)
            .await
            .unwrap();
        let t = format!("{v}/vm1-disk1.vmdk");
        let a = ask(
            &mut l,
            attach(77, "vm1", LocationKind::Original, &t, 256 << 20),
        )
        .await;
        assert_refused(
            &a,
            ErrorCode::Forbidden,
            "a detached disk's file under a new id",
        );
    });
}

#[test]
fn certificates_of_the_wrong_role_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tls = |r| TlsFiles::of_role(&c.tls, r);
    let vm1 = TlsFiles::of_role(&c.agent_tls("vm1"), PeerRole::Agent);
    rt.block_on(async {
        // A master target's certificate is a server certificate: TLS itself refuses it as a
        // client, at both services.
        for (addr, expect) in [
            (&c.ps_addr, PeerRole::ProcessServer),
            (&c.mt_addr, PeerRole::MasterTarget),
        ] {
            let e = link(
                addr,
                &tls(PeerRole::MasterTarget),
                Role::ProcessServer,
                expect,
            )
            .await
            .unwrap_err();
            assert_eq!(e.retry(), wire_protocol::Retry::Permanent, "{addr}: {e}");
        }
        // Wrong roles for a port: refused after TLS with a Forbidden error frame.
        for (addr, files, role, expect) in [
            (
                &c.ps_addr,
                tls(PeerRole::ProcessServer),
                Role::Agent,
                PeerRole::ProcessServer,
            ),
            (
                &c.ps_addr,
                tls(PeerRole::Operator),
                Role::Admin,
                PeerRole::ProcessServer,
            ),
            (&c.mt_addr, vm1.clone(), Role::Agent, PeerRole::MasterTarget),
            (
                &c.mt_addr,
                vm1.clone(),
                Role::ProcessServer,
                PeerRole::MasterTarget,
            ),
        ] {
            match link(addr, &files, role, expect).await {
                Err(runtime::Error::Refused { code, .. }) => {
                    assert_eq!(code, ErrorCode::Forbidden, "{addr} {role:?}")
                }
                other => panic!("{addr}: {role:?} got in: {other:?}"),
            }
        }
        // A process server may not detach; an operator may not write.
        let mut ps = link(
            &c.mt_addr,
            &tls(PeerRole::ProcessServer),
            Role::ProcessServer,
            PeerRole::MasterTarget,
        )
        .await
        .unwrap();
        assert_refused(
            &ask(&mut ps, Message::Detach { disk_id: 1 }).await,
            ErrorCode::Forbidden,
            "detach by a process server",
        );
        let mut op = link(
            &c.mt_addr,
            &tls(PeerRole::Operator),
            Role::Admin,
            PeerRole::MasterTarget,
        )
        .await
        .unwrap();
        assert_refused(
            &ask(&mut op, batch(1, 1)).await,
            ErrorCode::Forbidden,
            "write by an operator",
        );
        // An agent checks it is talking to a process server: the master target is not one.
        let e = link(&c.mt_addr, &vm1, Role::Agent, PeerRole::ProcessServer)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("not a process-server")
                || e.retry() == wire_protocol::Retry::Permanent,
            "{e}"
        );
    });
    assert!(metric(&c.mt_admin, "failback_mt_connections_refused_total") >= 3.0);
    assert!(metric(&c.ps_admin, "failback_ps_connections_refused_total") >= 3.0);
}

/// Opens `n` connections from `from` to `addr` that do nothing (idle TCP), and `n` that
/// send half a TLS ClientHello and stop.
fn hog(addr: &str, from: &str, n: usize) -> Vec<TcpStream> {
    let target: SocketAddr = addr.parse().unwrap();
    let mut held = Vec::new();
    for i in 0..2 * n {
        let s = socket2_connect_from(from, target);
        if let Some(mut s) = s {
            if i % 2 == 1 {
                // A ClientHello's record header promising 512 bytes, and 10 of them.
                let _ = std::io::Write::write_all(&mut s, &[0x16, 3, 1, 2, 0, 1, 0, 1, 0xfc, 3, 3]);
            }
            held.push(s);
        }
    }
    held
}

/// A TCP connection to `to` from the local address `from` (loopback has all of 127/8).
fn socket2_connect_from(from: &str, to: SocketAddr) -> Option<TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as u16;
        sa.sin_addr.s_addr = u32::from_ne_bytes(from.parse::<std::net::Ipv4Addr>().ok()?.octets());
        if libc::bind(
            fd,
            &sa as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            libc::close(fd);
            return None;
        }
        let SocketAddr::V4(t) = to else { return None };
        let mut ta: libc::sockaddr_in = std::mem::zeroed();
        ta.sin_family = libc::AF_INET as u16;
        ta.sin_port = t.port().to_be();
        ta.sin_addr.s_addr = u32::from_ne_bytes(t.ip().octets());
        if libc::connect(
            fd,
            &ta as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            libc::close(fd);
            return None;
        }
        Some(TcpStream::from_raw_fd(fd))
    }
}

#[test]
fn idle_and_half_open_connections_do_not_delay_a_legitimate_peer() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let vm1 = TlsFiles::of_role(&c.agent_tls("vm1"), PeerRole::Agent);
    let ps = TlsFiles::of_role(&c.tls, PeerRole::ProcessServer);
    // Several hundred connections at each service: idle, half-open, and (below) mutually
    // authenticated ones that never send a Hello.
    // From four addresses, 300 connections each at each service: more than one address may
    // hold, fewer than all may.
    let _held: Vec<TcpStream> = [&c.ps_addr, &c.mt_addr]
        .iter()
        .flat_map(|a| {
            ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
                .into_iter()
                .flat_map(move |from| hog(a, from, 150))
        })
        .collect();
    let silent = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..40 {
            // A real handshake, then nothing: TLS without our Hello.
            let tcp = tokio::net::TcpStream::connect(&c.ps_addr).await.unwrap();
            let cfg = client_config(&vm1).unwrap();
            if let Ok(s) = tokio_rustls::TlsConnector::from(cfg)
                .connect(runtime::tls::server_name("127.0.0.1").unwrap(), tcp)
                .await
            {
                v.push(s);
            }
        }
        v
    });
    assert!(
        !silent.is_empty(),
        "silent TLS clients got through the handshake"
    );
    for (addr, files, role, expect) in [
        (&c.ps_addr, &vm1, Role::Agent, PeerRole::ProcessServer),
        (&c.mt_addr, &ps, Role::ProcessServer, PeerRole::MasterTarget),
    ] {
        for _ in 0..3 {
            let t = Instant::now();
            let l = rt.block_on(link(addr, files, role, expect));
            let took = t.elapsed();
            assert!(l.is_ok(), "{addr}: {l:?}");
            assert!(
                took < Duration::from_secs(1),
                "{addr}: a legitimate handshake took {took:?} behind the hogs"
            );
        }
    }
    assert!(
        metric(
            &c.ps_admin,
            "failback_ps_connections_refused_total{reason=\"handshake_limit\""
        ) >= 1.0
    );
    // And replication goes on while the hogs are held.
    replicate_and_verify(&c, 1, 200);
    drop(silent);
}

#[test]
fn slow_admin_clients_do_not_block_health_and_state_changes_need_post() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let mut slow = Vec::new();
    for admin in [&c.ps_admin, &c.mt_admin] {
        // 300 that say nothing, and 40 that trickle a header.
        for _ in 0..300 {
            if let Ok(s) = TcpStream::connect(admin) {
                slow.push(s);
            }
        }
        for _ in 0..40 {
            let mut s = TcpStream::connect(admin).unwrap();
            std::io::Write::write_all(&mut s, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .unwrap();
            slow.push(s);
        }
    }
    // The slow clients trickle a header byte now and then; /health answers meanwhile.
    for round in 0..6 {
        for s in &mut slow {
            let _ = std::io::Write::write_all(s, b"X");
        }
        for admin in [&c.ps_admin, &c.mt_admin] {
            let t = Instant::now();
            let (code, _) = http_get(admin, "/health").unwrap();
            assert_eq!(code, 200, "{admin}: round {round}");
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "{admin}: /health took {:?}",
                t.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // State changes: POST only, with the admin header and a local Host.
    let raw = |req: &str| -> u16 {
        let mut s = TcpStream::connect(&c.ps_admin).unwrap();
        std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut out);
        out.split_whitespace()
            .nth(1)
            .and_then(|x| x.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        raw("GET /bandwidth HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
        405
    );
    assert_eq!(raw("POST /bandwidth HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\nConnection: close\r\n\r\n8bit"), 403, "no admin header: a cross-site form post");
    assert_eq!(raw("POST /bandwidth HTTP/1.1\r\nHost: evil.example:9444\r\nx-failback-admin: 1\r\nContent-Length: 7\r\nConnection: close\r\n\r\n10kbit\n"), 403, "a DNS-rebound page");
    let out = std::process::Command::new(BIN)
        .args([
            "process-server",
            "set-bandwidth",
            "--admin",
            &c.ps_admin,
            "50mbit",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        metric(&c.ps_admin, "failback_ps_max_bandwidth_bytes_per_second"),
        6_250_000.0
    );
}

/// A member VM's agent that forges group markers: one timed in the far future (to age out
/// every real point of its disk), a marker for a cut its disk was never asked to mark (to
/// make a group point of its own), and one claiming another disk count for a real cut (to
/// hide it). The process server keeps both as plain bookmarks: the real
/// group point stays listed and exports, and no group point holds the forger's disk.
#[test]
fn a_member_cannot_forge_or_hide_group_points() {
    let dir = tempfile::tempdir().unwrap();
    let c = start_group_cluster(
        failback::harness::Cluster::new(dir.path(), Path::new(env!("CARGO_BIN_EXE_failback")))
            .unwrap(),
    );
    let honest: Vec<_> = [1, 2]
        .map(|d| {
            replay(
                &c,
                d,
                "tencent-cbs-50k.msr.csv",
                "msr",
                &["--group=erp", "--pace=30x"],
            )
        })
        .into();
    let deadline = Instant::now() + Duration::from_secs(60);
    while groups_status(&c)["cuts_made"].as_u64().unwrap_or(0) < 2 {
        assert!(
            Instant::now() < deadline,
            "no group cut made: {}",
            groups_status(&c)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let real = groups_status(&c)["last_cut_id"].as_u64().unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let vm1 = TlsFiles::of_role(&c.agent_tls("vm1"), PeerRole::Agent);
    rt.block_on(async {
        let mut l = link(&c.ps_addr, &vm1, Role::Agent, PeerRole::ProcessServer)
            .await
            .unwrap();
        // A new disk of VM 1 in the group (the process server may first say "not ready").
        let Message::DiskAttach(mut a) = attach(33, "vm1", LocationKind::Alternate, "", 64 << 20)
        else {
            unreachable!()
        };
        a.group_id = "erp".into();
        a.os_type = "linux".into();
        let mut attached = false;
        for _ in 0..100 {
            match ask(&mut l, Message::DiskAttach(a.clone())).await {
                Message::Ack(_) => {
                    attached = true;
                    break;
                }
                Message::Error(e) if e.code == ErrorCode::NotReady => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => panic!("attach of the forger's disk: {other:?}"),
            }
        }
        assert!(attached, "the forger's disk attaches");
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        let forged = |lsn: u64, cut: u64, members: u32, time_us: u64| {
            Message::Bookmark(Bookmark {
                disk_id: 33,
                lsn,
                kind: BookmarkKind::AppConsistent,
                time_us,
                group_marker: cut,
                group_members: members,
                tag: "forged".into(),
            })
        };
        // Timed in the far future, a bookmark would be its disk's newest point and age out
        // every real one on the master target: refused.
        let a = ask(&mut l, forged(1, real, 2, 2_100_000_000_000_000)).await;
        assert_refused(&a, ErrorCode::OutOfRange, "a bookmark from the future");
        // A cut of its own (an issued id its disk was never asked for), then the real cut
        // claimed with another count: both taken, as plain bookmarks.
        for (lsn, cut, members) in [(1, 1, 1), (2, real, 3)] {
            match ask(&mut l, forged(lsn, cut, members, now_us)).await {
                Message::Ack(_) | Message::RemoteDurable { .. } => {}
                other => panic!("the forged marker at lsn {lsn}: {other:?}"),
            }
        }
    });
    let reports: Vec<_> = honest
        .into_iter()
        .zip([1, 2])
        .map(|(child, d)| finish(&c, d, child))
        .collect();
    drain_and_detach(&c, &[(1, &reports[0]), (2, &reports[1])]);
    let (points, listed) = group_points(&c, "erp");
    let p = points
        .iter()
        .find(|p| p["id"].as_u64() == Some(real))
        .unwrap_or_else(|| panic!("the real group point {real} is hidden: {listed}"));
    let disks: Vec<u64> = p["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["disk"].as_u64().unwrap())
        .collect();
    assert_eq!(disks, [1, 2], "{listed}");
    assert!(
        points.iter().all(|p| p["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["disk"] != 33)),
        "a group point holds the forger's disk: {listed}"
    );
    let out = c.dir.join("real-point");
    export_group(&c, "erp", &real.to_string(), &out).unwrap();
}
