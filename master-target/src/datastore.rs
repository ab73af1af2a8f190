//! The datastores: the only directories whose files a peer can make the master target open.
//!
//! # Design constraints
//! - A target named on the wire is an absolute path inside one of the configured datastore
//!   directories (`datastore-dirs`). It may not hold `..`, NUL or control characters, and it
//!   is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` relative to the
//!   datastore's directory, so the kernel refuses any resolution, through symlinks or not,
//!   that leaves the datastore. Nothing a peer sends reaches another file.
//! - An original-location target is a VMDK descriptor (`NAME.vmdk`) of a flat disk; its
//!   extent is a plain file name in the same directory and must be a regular file. Raw
//!   images are not accepted from the wire: any file could be called one.
//! - An alternate-location target is an existing directory inside a datastore (empty: the
//!   first datastore); new disks are created there with `O_EXCL`, never over a file.

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

/// `openat2(dir, rel, flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`.
fn open_beneath(dir: &File, rel: &Path, flags: i32, mode: u32) -> std::io::Result<File> {
    let c = CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: open_how is a plain struct of integers; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = u64::from(mode);
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
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
                    "it resolves (through a link) to a place outside the datastore".to_owned()
                }
                Some(libc::ENOENT) => "it does not exist".to_owned(),
                _ => format!("it cannot be opened ({e})"),
            };
            refuse(&self.path_of(l).display().to_string(), &why)
        })
    }

    /// Opens the flat disk whose descriptor `target` names (original location).
    pub fn open_original(&self, target: &str) -> Result<(DiskImage, File)> {
        let l = self.locate(target)?;
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
        let f = self.open_at(l, libc::O_RDONLY | libc::O_NOCTTY, 0)?;
        let meta = f.metadata().ctx(|| format!("stat {shown_s}"))?;
        if !meta.is_file() {
            return Err(refuse(&shown_s, "it is not a regular file"));
        }
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
        let data = self.open_at(&extent_loc, libc::O_RDWR | libc::O_NOCTTY, 0)?;
        let meta = data
            .metadata()
            .ctx(|| format!("stat {}", image.data_path.display()))?;
        if !meta.is_file() {
            return Err(refuse(&shown_s, "its extent is not a regular file"));
        }
        Ok((image, data))
    }

    /// Creates a new flat VMDK `NAME.vmdk` + `NAME-flat.vmdk` of `size_bytes` in the
    /// directory `target` names ("" for the first datastore), refusing to replace any file.
    pub fn create(
        &self,
        target: &str,
        name: &str,
        size_bytes: u64,
        uuid: &[u8; 16],
    ) -> Result<(DiskImage, File)> {
        wire_protocol::message::validate_name("disk name", name)
            .map_err(|e| refuse(name, &e.to_string()))?;
        let dir = if target.is_empty() {
            Located {
                root: 0,
                rel: PathBuf::new(),
            }
        } else {
            self.locate(target)?
        };
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
        flat.set_len(size_bytes)
            .ctx(|| format!("size {}", shown_dir.join(&flat_name).display()))?;
        flat.sync_all()
            .ctx(|| format!("fsync {}", shown_dir.join(&flat_name).display()))?;
        desc.write_all(vmdk::descriptor_text(&flat_name, size_bytes, uuid).as_bytes())
            .and_then(|_| desc.sync_all())
            .and_then(|_| dir_file.sync_all())
            .ctx(|| format!("write {}", shown_dir.join(&desc_name).display()))?;
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

    #[test]
    fn links_out_of_a_datastore_are_refused() {
        let (t, ds) = stores();
        let outside = t.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"not a disk").unwrap();
        let desc = "createType=\"vmfs\"\nparentCID=ffffffff\nRW 2048 VMFS \"x-flat.vmdk\"\n";
        std::fs::write(outside.join("x.vmdk"), desc).unwrap();
        std::fs::write(outside.join("x-flat.vmdk"), vec![0u8; 2048 * 512]).unwrap();
        // A directory link and a descriptor link, both pointing out.
        std::os::unix::fs::symlink(&outside, t.path().join("ds1/out")).unwrap();
        std::os::unix::fs::symlink(outside.join("x.vmdk"), t.path().join("ds1/y.vmdk")).unwrap();
        for target in ["ds1/out/x.vmdk", "ds1/y.vmdk"] {
            let e = ds
                .open_original(&t.path().join(target).display().to_string())
                .unwrap_err();
            assert!(
                e.to_string().contains("outside the datastore"),
                "{target}: {e}"
            );
        }
        // A descriptor inside whose extent is a link out.
        std::fs::write(
            t.path().join("ds1/z.vmdk"),
            desc.replace("x-flat", "z-flat"),
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), t.path().join("ds1/z-flat.vmdk"))
            .unwrap();
        let e = ds
            .open_original(&t.path().join("ds1/z.vmdk").display().to_string())
            .unwrap_err();
        assert!(e.to_string().contains("outside the datastore"), "{e}");
        // A file that is not a descriptor is not taken as a raw disk.
        std::fs::write(t.path().join("ds1/plain.vmdk"), b"hello").unwrap();
        assert!(ds
            .open_original(&t.path().join("ds1/plain.vmdk").display().to_string())
            .is_err());
        assert_eq!(
            std::fs::read(outside.join("secret")).unwrap(),
            b"not a disk"
        );
    }

    #[test]
    fn new_disks_never_replace_a_file() {
        let (t, ds) = stores();
        let (img, _) = ds.create("", "vm1-disk1", 1 << 20, &[1; 16]).unwrap();
        assert_eq!(img.descriptor, t.path().join("ds1/vm1-disk1.vmdk"));
        assert!(ds.create("", "vm1-disk1", 1 << 20, &[1; 16]).is_err());
        std::fs::write(t.path().join("ds1/vm2-disk2-flat.vmdk"), b"keep").unwrap();
        assert!(ds.create("", "vm2-disk2", 1 << 20, &[2; 16]).is_err());
        assert_eq!(
            std::fs::read(t.path().join("ds1/vm2-disk2-flat.vmdk")).unwrap(),
            b"keep"
        );
        assert!(
            !t.path().join("ds1/vm2-disk2.vmdk").exists(),
            "a refused create leaves nothing behind"
        );
        assert!(ds.create("", "../x", 1 << 20, &[3; 16]).is_err());
    }
}
