//! The apply path's disk I/O: io_uring where the kernel allows it, plain syscalls otherwise.
//!
//! With io_uring, a group's writes and the fdatasync that follows them go to the kernel in
//! one submission, linked (`IO_LINK`) so the sync starts only after every write completed.
//! Any write that comes back short, failed or cancelled is redone with `pwrite`, and a sync
//! that did not succeed is redone with `fdatasync`: the result is the same as the syscall
//! path, only fewer syscalls. The backend is chosen once at start-up and logged.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Ring size: writes per submission (one slot stays for the sync).
const RING_ENTRIES: u32 = 256;

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum IoChoice {
    /// io_uring if the kernel allows it, else syscalls.
    #[default]
    Auto,
    /// io_uring, or fail at start-up.
    Uring,
    /// pwrite and fdatasync.
    Syscall,
}

/// The chosen backend.
pub enum IoBackend {
    /// pwrite + fdatasync.
    Syscall,
    /// A ring of [`RING_ENTRIES`].
    Uring(Box<io_uring::IoUring>),
}

impl std::fmt::Debug for IoBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl IoBackend {
    /// Picks a backend; `Auto` falls back to syscalls (with the reason) where the kernel or
    /// its settings refuse io_uring.
    pub fn new(choice: IoChoice) -> io::Result<(IoBackend, String)> {
        if choice == IoChoice::Syscall {
            return Ok((
                IoBackend::Syscall,
                "syscall backend chosen by configuration".into(),
            ));
        }
        match io_uring::IoUring::new(RING_ENTRIES) {
            Ok(r) => Ok((IoBackend::Uring(Box::new(r)), "io_uring available".into())),
            Err(e) if choice == IoChoice::Auto => Ok((
                IoBackend::Syscall,
                format!("io_uring unavailable ({e}); using pwrite + fdatasync"),
            )),
            Err(e) => Err(e),
        }
    }

    /// The backend's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            IoBackend::Syscall => "syscall",
            IoBackend::Uring(_) => "io_uring",
        }
    }

    /// Writes every `(offset, data)` in order to `file`, then makes them durable.
    pub fn write_all_sync(&mut self, file: &File, writes: &[(u64, &[u8])]) -> io::Result<()> {
        let ring = match self {
            IoBackend::Syscall => {
                for (off, data) in writes {
                    file.write_all_at(data, *off)?;
                }
                return file.sync_data();
            }
            IoBackend::Uring(r) => r,
        };
        use io_uring::{opcode, squeue, types};
        let fd = types::Fd(file.as_raw_fd());
        let chunk = (RING_ENTRIES - 1) as usize;
        let n_chunks = writes.len().div_ceil(chunk).max(1);
        for (ci, part) in writes
            .chunks(chunk)
            .chain((writes.is_empty()).then_some(&[][..]))
            .enumerate()
        {
            let last = ci + 1 == n_chunks;
            let mut done = vec![false; part.len()];
            let mut synced = !last;
            {
                let mut sq = ring.submission();
                for (i, (off, data)) in part.iter().enumerate() {
                    // Linked so the sync that ends the last chunk starts after every write.
                    let e = opcode::Write::new(fd, data.as_ptr(), data.len() as u32)
                        .offset(*off)
                        .build()
                        .user_data(i as u64)
                        .flags(squeue::Flags::IO_LINK);
                    // SAFETY: the buffers outlive the submission: we wait for every completion
                    // of this chunk below before returning or touching them.
                    unsafe { sq.push(&e) }
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                }
                if last {
                    let e = opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .user_data(u64::MAX);
                    // SAFETY: no buffer is involved.
                    unsafe { sq.push(&e) }
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                }
            }
            let expect = part.len() + usize::from(last);
            wait_for(ring, expect);
            let mut seen = 0;
            // Bounded: exactly `expect` completions belong to this chunk.
            while seen < expect {
                let Some(cqe) = ring.completion().next() else {
                    wait_for(ring, 1);
                    continue;
                };
                seen += 1;
                let res = cqe.result();
                match cqe.user_data() {
                    u64::MAX => synced = res == 0,
                    i => done[i as usize] = res >= 0 && res as usize == part[i as usize].1.len(),
                }
            }
            // Redo what the ring did not finish (short, failed or cancelled links).
            for (i, (off, data)) in part.iter().enumerate() {
                if !done[i] {
                    file.write_all_at(data, *off)?;
                    synced = !last;
                }
            }
            if !synced {
                file.sync_data()?;
            }
        }
        Ok(())
    }
}

/// Submits what is queued and waits for `n` completions, again when a signal interrupted
/// the wait: a signal (the service's SIGTERM, delivered to this thread) must not return
/// while the kernel still writes from the caller's buffers, nor roll a group back under
/// writes still landing.
///
/// Any other failure of the wait aborts the process. The ring is sized so that its
/// completions never overflow, so such a failure is a broken invariant, and nothing
/// after it is safe: the kernel may still write from buffers the caller would free, over
/// whatever comes next (a rollback, the next group). Unwinding would free those buffers
/// too. On restart, the journal's recovery puts the uncommitted group back.
fn wait_for(ring: &mut io_uring::IoUring, n: usize) {
    loop {
        match ring.submit_and_wait(n) {
            Ok(_) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "io_uring wait failed with writes in flight: aborting; the journal's recovery puts the group back at the next start");
                eprintln!("failback master target: io_uring wait failed with writes in flight ({e}): aborting; the journal's recovery puts the group back at the next start");
                std::process::abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_backends_write_the_same_bytes() {
        for choice in [IoChoice::Syscall, IoChoice::Auto] {
            let f = tempfile::tempfile().unwrap();
            f.set_len(1 << 20).unwrap();
            let (mut b, _) = IoBackend::new(choice).unwrap();
            let a = vec![1u8; 4096];
            let c = vec![2u8; 300];
            // More writes than one ring holds, overlapping, in order.
            let writes: Vec<(u64, &[u8])> = (0..600u64)
                .map(|i| ((i % 200) * 4096, if i % 3 == 0 { &c[..] } else { &a[..] }))
                .collect();
            b.write_all_sync(&f, &writes).unwrap();
            let mut want = vec![0u8; 1 << 20];
            for (off, d) in &writes {
                want[*off as usize..*off as usize + d.len()].copy_from_slice(d);
            }
            let mut got = vec![0u8; 1 << 20];
            f.read_exact_at(&mut got, 0).unwrap();
            assert!(got == want, "{}", b.name());
            b.write_all_sync(&f, &[]).unwrap();
        }
    }
}
