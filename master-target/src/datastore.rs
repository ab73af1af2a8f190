//! The datastores: the only directories whose files a peer can make the master target open.
//!
//! # Design constraints
//! - A target named on the wire is an absolute path inside one of the configured datastore
//!   directories (`datastore-dirs`). It may not hold `..`, NUL or control characters, and it
//!   is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` relative to the
//!   datastore's directory, so the kernel refuses any resolution that leaves the datastore
//!   or follows a link. Nothing a peer sends reaches another file.
//! - A VM's disks live in its folder, `DATASTORE/VM/`, as ESXi lays them out: an agent can
//!   name (original location) or have created (alternate location) only files in the folder
//!   of the VM its certificate names. Another VM's disks are out of its reach by path.
//! - An original-location target is a VMDK descriptor `DATASTORE/VM/NAME.vmdk` of a flat
//!   disk; its extent is a plain file name beside it. Both must be regular files with one
//!   link (a hard link could make a file outside the datastore look like one inside), and
//!   are opened without blocking (a FIFO cannot stall the service). Raw images are not
//!   accepted from the wire: any file could be called one.
//! - An alternate-location target is a datastore directory (empty: the first one); the new
//!   disk is created in its `VM/` folder with `O_EXCL`, never over a file, and removed
//!   again if it cannot be made whole.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::vmdk::{self, DiskImage, MAX_DESCRIPTOR_BYTES};

/// Longest target path accepted from the wire.
pub const MAX_TARGET_LEN: usize = 1024;

/// One datastore directory.
#[derive(Debug)]
struct Root {
    /// As configured (what peers name).
    configured: PathBuf,
    /// Its canonical form (symlinks resolved once, at start).
    canonical: PathBuf,
    dir: File,
}

/// The configured datastores.
#[derive(Debug)]
pub struct Datastores {
    roots: Vec<Root>,
}

/// A file found inside a datastore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    root: usize,
    /// Relative to the datastore's directory, without `..`.
    rel: PathBuf,
}

fn refuse(target: &str, why: &str) -> Error {
    Error::TargetRefused {
        target: target.chars().take(MAX_TARGET_LEN).collect(),
        reason: why.to_owned(),
    }
}

/// `openat2(dir, rel, flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: no symlink is followed
/// at all inside a datastore (its directory itself was resolved once, at start), so a link
/// cannot lead out of it, nor from one VM's folder into another's.
fn open_beneath(dir: &File, rel: &Path, flags: i32, mode: u32) -> std::io::Result<File> {
    let c = CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: open_how is a plain struct of integers; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = u64::from(mode);
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS;
    // SAFETY: valid directory fd, NUL-terminated path, a valid open_how and its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

impl Datastores {
    /// Opens (creating if absent) each configured directory. The first is where disks of an
    /// alternate location go when the attach names no directory.
    pub fn open(dirs: &[PathBuf]) -> Result<Datastores> {
        if dirs.is_empty() {
            return Err(Error::InvalidParameter {
                param: "datastore-dirs",
                reason: "at least one datastore directory is needed".into(),
            });
        }
        let mut roots = Vec::new();
        for d in dirs {
            if !d.is_absolute() {
                return Err(Error::InvalidParameter {
                    param: "datastore-dirs",
                    reason: format!("{} is not an absolute path", d.display()),
                });
            }
            std::fs::create_dir_all(d).ctx(|| format!("create datastore {}", d.display()))?;
            let canonical =
                std::fs::canonicalize(d).ctx(|| format!("resolve datastore {}", d.display()))?;
            let dir = File::open(&canonical).ctx(|| format!("open datastore {}", d.display()))?;
            roots.push(Root {
                configured: d.clone(),
                canonical,
                dir,
            });
        }
        Ok(Datastores { roots })
    }

    /// The datastore directories, as configured.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.roots.iter().map(|r| r.configured.clone()).collect()
    }

    /// Where `target` (a path from the wire) is: inside which datastore, and under what
    /// relative path. Refuses anything else, saying why, without touching the filesystem.
    pub fn locate(&self, target: &str) -> Result<Located> {
        if target.len() > MAX_TARGET_LEN {
            return Err(refuse(target, "the path is too long"));
        }
        if target.chars().any(|c| c.is_control()) {
            return Err(refuse(target, "the path holds a control character"));
        }
        let path = Path::new(target);
        if !path.is_absolute() {
            return Err(refuse(target, "the path is not absolute"));
        }
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(refuse(target, "the path holds . or .. components"));
        }
        for (i, r) in self.roots.iter().enumerate() {
            for base in [&r.configured, &r.canonical] {
                if let Ok(rel) = path.strip_prefix(base) {
                    return Ok(Located {
                        root: i,
                        rel: rel.to_path_buf(),
                    });
                }
            }
        }
        Err(refuse(
            target,
            "it is not inside a datastore of this master target (datastore-dirs)",
        ))
    }

    /// The absolute path of a located file (for logs and the disk list).
    pub fn path_of(&self, l: &Located) -> PathBuf {
        self.roots[l.root].configured.join(&l.rel)
    }

    fn open_at(&self, l: &Located, flags: i32, mode: u32) -> Result<File> {
        let rel = if l.rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &l.rel
        };
        open_beneath(&self.roots[l.root].dir, rel, flags, mode).map_err(|e| {
            let why = match e.raw_os_error() {
                Some(libc::EXDEV) | Some(libc::ELOOP) => {
                    "it goes through a symbolic link: inside a datastore links are not followed (they could lead outside it, or into another VM's folder)".to_owned()
                }
                Some(libc::ENOENT) => "it does not exist".to_owned(),
                _ => format!("it cannot be opened ({e})"),
            };
            refuse(&self.path_of(l).display().to_string(), &why)
        })
    }

    /// Opens the flat disk whose descriptor `target` names (original location), which must
    /// lie in the folder of VM `vm`.
    pub fn open_original(&self, target: &str, vm: &str) -> Result<(DiskImage, File)> {
        let l = self.locate(target)?;
        let mut parts = l.rel.components();
        let folder = parts.next().map(|c| c.as_os_str());
        if folder != Some(std::ffi::OsStr::new(vm)) || parts.count() != 1 {
            return Err(refuse(
                target,
                &format!("a disk of VM {vm} must be a descriptor in its folder, DATASTORE/{vm}/NAME.vmdk"),
            ));
        }
        self.open_descriptor(&l)
    }

    /// Opens a disk by its descriptor's location (also used on restart, for disks in the
    /// disk list).
    pub fn open_descriptor(&self, l: &Located) -> Result<(DiskImage, File)> {
        let shown = self.path_of(l);
        let shown_s = shown.display().to_string();
        if l.rel.extension().is_none_or(|e| e != "vmdk")
            || l.rel.to_string_lossy().ends_with("-flat.vmdk")
        {
            return Err(refuse(
                &shown_s,
                "a target must be a VMDK descriptor (NAME.vmdk)",
            ));
        }
        let f = self.open_at(l, libc::O_RDONLY | libc::O_NOCTTY | libc::O_NONBLOCK, 0)?;
        check_plain(&f, &shown_s, "it")?;
        let mut text = Vec::new();
        f.take(MAX_DESCRIPTOR_BYTES + 1)
            .read_to_end(&mut text)
            .ctx(|| format!("read {shown_s}"))?;
        if text.starts_with(b"KDMV") || text.starts_with(b"COWD") {
            return Err(Error::UnsupportedDisk { path: shown.clone(), reason: "a sparse VMDK (monolithicSparse/streamOptimized): convert it to a flat disk (qemu-img convert -O vmdk -o subformat=monolithicFlat) or recover to an alternate location".into() });
        }
        let text = match std::str::from_utf8(&text) {
            Ok(t) if text.len() as u64 <= MAX_DESCRIPTOR_BYTES && t.contains("createType") => t,
            _ => return Err(refuse(&shown_s, "it is not a VMDK descriptor")),
        };
        let image = vmdk::parse_descriptor(&shown, text)?;
        let extent = image
            .data_path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("");
        if image.data_path.parent() != shown.parent()
            || wire_protocol::message::validate_name("extent", extent).is_err()
            || image.data_path == shown
        {
            return Err(refuse(
                &shown_s,
                "its extent must be a plain file name beside the descriptor",
            ));
        }
        let extent_loc = Located {
            root: l.root,
            rel: l.rel.with_file_name(extent),
        };
        let data = self.open_at(
            &extent_loc,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK,
            0,
        )?;
        check_plain(&data, &shown_s, "its extent")?;
        Ok((image, data))
    }

    /// The folder of VM `vm` in the datastore `target` names ("" for the first), made if
    /// it is not there yet.
    fn vm_folder(&self, target: &str, vm: &str) -> Result<Located> {
        let root = if target.is_empty() {
            Located {
                root: 0,
                rel: PathBuf::new(),
            }
        } else {
            self.locate(target)?
        };
        if !root.rel.as_os_str().is_empty() && root.rel != Path::new(vm) {
            return Err(refuse(
                target,
                &format!("a new disk of VM {vm} goes into a datastore (its {vm}/ folder is made there): name the datastore directory"),
            ));
        }
        let root_dir = self.open_at(
            &Located {
                root: root.root,
                rel: PathBuf::new(),
            },
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        mkdir_beneath(&root_dir, vm).ctx(|| {
            format!(
                "create the folder {vm} in {}",
                self.roots[root.root].configured.display()
            )
        })?;
        Ok(Located {
            root: root.root,
            rel: PathBuf::from(vm),
        })
    }

    /// Creates a new flat VMDK `NAME.vmdk` + `NAME-flat.vmdk` of `size_bytes` in the folder
    /// of VM `vm` in the datastore `target` names ("" for the first), refusing to replace any
    /// file.
    pub fn create(
        &self,
        target: &str,
        vm: &str,
        name: &str,
        size_bytes: u64,
        uuid: &[u8; 16],
    ) -> Result<(DiskImage, File)> {
        for (what, n) in [("vm id", vm), ("disk name", name)] {
            wire_protocol::message::validate_name(what, n)
                .map_err(|e| refuse(n, &e.to_string()))?;
        }
        let dir = self.vm_folder(target, vm)?;
        let shown_dir = self.path_of(&dir);
        let dir_file = self.open_at(&dir, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        if !size_bytes.is_multiple_of(vmdk::SECTOR_BYTES) || size_bytes == 0 {
            return Err(Error::InvalidParameter {
                param: "size_bytes",
                reason: format!("{size_bytes} is not a positive multiple of 512"),
            });
        }
        let flat_name = format!("{name}-flat.vmdk");
        let desc_name = format!("{name}.vmdk");
        let create = |n: &str| {
            open_beneath(
                &dir_file,
                Path::new(n),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
                0o600,
            )
            .map_err(|e| {
                let why = if e.kind() == std::io::ErrorKind::AlreadyExists {
                    "a file of that name exists: a new disk is never created over one (remove the old disk first if it is no longer wanted)".to_owned()
                } else {
                    format!("it cannot be created ({e})")
                };
                refuse(&shown_dir.join(n).display().to_string(), &why)
            })
        };
        // The descriptor first: if it exists, nothing was touched.
        let mut desc = create(&desc_name)?;
        let flat = match create(&flat_name) {
            Ok(f) => f,
            Err(e) => {
                drop(desc);
                let _ = unlink_beneath(&dir_file, &desc_name);
                return Err(e);
            }
        };
        let made = flat
            .set_len(size_bytes)
            .and_then(|_| flat.sync_all())
            .and_then(|_| {
                desc.write_all(vmdk::descriptor_text(&flat_name, size_bytes, uuid).as_bytes())
            })
            .and_then(|_| desc.sync_all())
            .and_then(|_| dir_file.sync_all());
        if let Err(e) = made {
            // Nothing half-made stays behind to block the next attempt.
            let _ = unlink_beneath(&dir_file, &flat_name);
            let _ = unlink_beneath(&dir_file, &desc_name);
            return Err(Error::Io {
                context: format!("create {}", shown_dir.join(&flat_name).display()),
                source: e,
            });
        }
        Ok((
            DiskImage {
                descriptor: shown_dir.join(&desc_name),
                data_path: shown_dir.join(&flat_name),
                size_bytes,
                uuid: Some(*uuid),
            },
            flat,
        ))
    }

    /// Checks that a path of the disk list is still inside a datastore (a restart after the
    /// configuration changed) and opens its disk.
    pub fn reopen(&self, descriptor: &Path) -> Result<(DiskImage, File)> {
        let l = self.locate(&descriptor.display().to_string())?;
        self.open_descriptor(&l)
    }
}

/// Refuses anything but a regular file with exactly one link, and clears `O_NONBLOCK`.
fn check_plain(f: &File, shown: &str, what: &str) -> Result<()> {
    let m = f.metadata().ctx(|| format!("stat {shown}"))?;
    if !m.is_file() {
        return Err(refuse(shown, &format!("{what} is not a regular file")));
    }
    if m.nlink() != 1 {
        return Err(refuse(
            shown,
            &format!("{what} has {} hard links: a disk file has one", m.nlink()),
        ));
    }
    // SAFETY: fcntl on a valid descriptor; regular files ignore O_NONBLOCK anyway, this only
    // keeps the descriptor's flags plain.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(())
}

/// `mkdirat(dir, name)`, leaving an existing directory (or anything else of that name, which
/// the confined open that follows then judges) alone.
fn mkdir_beneath(dir: &File, name: &str) -> std::io::Result<()> {
    let c =
        CString::new(name).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: valid directory fd and NUL-terminated name.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    Ok(())
}

fn unlink_beneath(dir: &File, name: &str) -> std::io::Result<()> {
    let c =
        CString::new(name).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: valid directory fd and NUL-terminated name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Device and inode of a file, for comparing what two paths resolve to.
pub fn identity_of(f: &File) -> std::io::Result<(u64, u64)> {
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stores() -> (tempfile::TempDir, Datastores) {
        let t = tempfile::tempdir().unwrap();
        let ds = Datastores::open(&[t.path().join("ds1"), t.path().join("ds2")]).unwrap();
        (t, ds)
    }

    #[test]
    fn paths_from_the_wire_stay_inside() {
        let (t, ds) = stores();
        let inside = t.path().join("ds2/vm1/vm1.vmdk");
        assert!(ds.locate(&inside.display().to_string()).is_ok());
        for bad in [
            "/etc/passwd".to_owned(),
            "relative/vm.vmdk".to_owned(),
            format!("{}/ds1/../ds1/x.vmdk", t.path().display()),
            format!("{}/ds1/a\0b.vmdk", t.path().display()),
            format!("{}/ds1/a\nb.vmdk", t.path().display()),
            format!("{}/ds10/x.vmdk", t.path().display()),
        ] {
            assert!(
                matches!(ds.locate(&bad), Err(Error::TargetRefused { .. })),
                "{bad:?}"
            );
        }
    }

    const DESC: &str = "createType=\"vmfs\"\nparentCID=ffffffff\nRW 2048 VMFS \"x-flat.vmdk\"\n";

    fn target(t: &tempfile::TempDir, rel: &str) -> String {
        t.path().join(rel).display().to_string()
    }

    #[test]
    fn links_out_of_a_datastore_are_refused() {
        let (t, ds) = stores();
        let outside = t.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::create_dir_all(t.path().join("ds1/vm1")).unwrap();
        std::fs::write(outside.join("secret"), b"not a disk").unwrap();
        std::fs::write(outside.join("x.vmdk"), DESC).unwrap();
        std::fs::write(outside.join("x-flat.vmdk"), vec![0u8; 2048 * 512]).unwrap();
        // The VM's folder itself a link out, and a descriptor link out.
        std::os::unix::fs::symlink(&outside, t.path().join("ds2/vm1")).unwrap();
        std::os::unix::fs::symlink(outside.join("x.vmdk"), t.path().join("ds1/vm1/y.vmdk"))
            .unwrap();
        for rel in ["ds2/vm1/x.vmdk", "ds1/vm1/y.vmdk"] {
            let e = ds.open_original(&target(&t, rel), "vm1").unwrap_err();
            assert!(e.to_string().contains("symbolic link"), "{rel}: {e}");
        }
        // A descriptor inside whose extent is a link out.
        std::fs::write(
            t.path().join("ds1/vm1/z.vmdk"),
            DESC.replace("x-flat", "z-flat"),
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), t.path().join("ds1/vm1/z-flat.vmdk"))
            .unwrap();
        let e = ds
            .open_original(&target(&t, "ds1/vm1/z.vmdk"), "vm1")
            .unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // ... or a hard link to a file outside.
        std::fs::write(
            t.path().join("ds1/vm1/h.vmdk"),
            DESC.replace("x-flat", "h-flat"),
        )
        .unwrap();
        std::fs::hard_link(
            outside.join("x-flat.vmdk"),
            t.path().join("ds1/vm1/h-flat.vmdk"),
        )
        .unwrap();
        let e = ds
            .open_original(&target(&t, "ds1/vm1/h.vmdk"), "vm1")
            .unwrap_err();
        assert!(e.to_string().contains("hard links"), "{e}");
        // A file that is not a descriptor is not taken as a raw disk.
        std::fs::write(t.path().join("ds1/vm1/plain.vmdk"), b"hello").unwrap();
        assert!(ds
            .open_original(&target(&t, "ds1/vm1/plain.vmdk"), "vm1")
            .is_err());
        assert_eq!(
            std::fs::read(outside.join("secret")).unwrap(),
            b"not a disk"
        );
    }

    #[test]
    fn a_vm_reaches_only_its_own_folder() {
        let (t, ds) = stores();
        for vm in ["vm1", "vm2"] {
            std::fs::create_dir_all(t.path().join(format!("ds1/{vm}"))).unwrap();
            std::fs::write(t.path().join(format!("ds1/{vm}/x.vmdk")), DESC).unwrap();
            std::fs::write(
                t.path().join(format!("ds1/{vm}/x-flat.vmdk")),
                vec![0u8; 1 << 20],
            )
            .unwrap();
        }
        std::fs::write(t.path().join("ds1/x.vmdk"), DESC).unwrap();
        assert!(ds
            .open_original(&target(&t, "ds1/vm1/x.vmdk"), "vm1")
            .is_ok());
        for rel in ["ds1/vm2/x.vmdk", "ds1/x.vmdk", "ds1/vm1/sub/x.vmdk"] {
            let e = ds.open_original(&target(&t, rel), "vm1").unwrap_err();
            assert!(e.to_string().contains("its folder"), "{rel}: {e}");
        }
        let e = ds
            .create(
                &target(&t, "ds1/vm2"),
                "vm1",
                "vm1-disk1",
                1 << 20,
                &[1; 16],
            )
            .unwrap_err();
        assert!(matches!(e, Error::TargetRefused { .. }), "{e}");
    }

    #[test]
    fn a_fifo_does_not_stall_an_attach() {
        let (t, ds) = stores();
        std::fs::create_dir_all(t.path().join("ds1/vm1")).unwrap();
        let fifo = CString::new(t.path().join("ds1/vm1/f.vmdk").display().to_string()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let e = ds
            .open_original(&target(&t, "ds1/vm1/f.vmdk"), "vm1")
            .unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn new_disks_never_replace_a_file() {
        let (t, ds) = stores();
        let (img, _) = ds
            .create("", "vm1", "vm1-disk1", 1 << 20, &[1; 16])
            .unwrap();
        assert_eq!(img.descriptor, t.path().join("ds1/vm1/vm1-disk1.vmdk"));
        assert!(ds
            .create("", "vm1", "vm1-disk1", 1 << 20, &[1; 16])
            .is_err());
        std::fs::write(t.path().join("ds1/vm2/vm2-disk2-flat.vmdk"), b"keep").unwrap_err();
        std::fs::create_dir_all(t.path().join("ds1/vm2")).unwrap();
        std::fs::write(t.path().join("ds1/vm2/vm2-disk2-flat.vmdk"), b"keep").unwrap();
        assert!(ds
            .create("", "vm2", "vm2-disk2", 1 << 20, &[2; 16])
            .is_err());
        assert_eq!(
            std::fs::read(t.path().join("ds1/vm2/vm2-disk2-flat.vmdk")).unwrap(),
            b"keep"
        );
        assert!(
            !t.path().join("ds1/vm2/vm2-disk2.vmdk").exists(),
            "a refused create leaves nothing behind"
        );
        assert!(ds.create("", "vm3", "../x", 1 << 20, &[3; 16]).is_err());
        // A size the filesystem cannot hold leaves nothing behind either.
        assert!(ds
            .create("", "vm4", "vm4-disk4", u64::MAX / 2 / 512 * 512, &[4; 16])
            .is_err());
        assert!(!t.path().join("ds1/vm4/vm4-disk4.vmdk").exists());
        assert!(!t.path().join("ds1/vm4/vm4-disk4-flat.vmdk").exists());
    }
}
