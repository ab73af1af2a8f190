//! VMDK descriptors, as far as the master target needs them.
//!
//! A VMDK on a datastore is a small text descriptor (`NAME.vmdk`) naming a flat extent
//! (`NAME-flat.vmdk`) of raw sectors. We accept the two flat forms:
//! ```text
//! createType="vmfs"            RW <sectors> VMFS "NAME-flat.vmdk"        (as ESXi writes it)
//! createType="monolithicFlat"  RW <sectors> FLAT "NAME-flat.vmdk" 0      (as qemu-img writes it)
//! ```
//! and refuse everything we cannot write consistently in place: sparse and stream-optimized
//! disks, and snapshots/deltas (any `parentCID` other than `ffffffff`).
//!
//! This module parses and writes descriptors; [`crate::datastore`] opens the files a peer
//! names, confined to the datastores.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Sector size of VMDK extents.
pub const SECTOR_BYTES: u64 = 512;
/// Descriptors larger than this are not descriptors: refuse rather than read a whole disk.
pub const MAX_DESCRIPTOR_BYTES: u64 = 64 << 10;

/// An on-premises disk: where its data lives and who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskImage {
    /// The descriptor (or the raw image itself).
    pub descriptor: PathBuf,
    /// The file holding the sectors.
    pub data_path: PathBuf,
    /// Size in bytes.
    pub size_bytes: u64,
    /// `ddb.uuid` as written in the descriptor, if any.
    pub uuid: Option<[u8; 16]>,
}

fn unsupported(path: &Path, reason: &str) -> Error {
    Error::UnsupportedDisk {
        path: path.into(),
        reason: reason.into(),
    }
}

fn value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let (k, v) = line.split_once('=')?;
    (k.trim() == key).then(|| v.trim().trim_matches('"'))
}

/// Parses a descriptor's text; `path` locates the extent and names errors.
pub fn parse_descriptor(path: &Path, text: &str) -> Result<DiskImage> {
    let mut create_type = None;
    let mut parent = None;
    let mut uuid = None;
    let mut extents = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(v) = value(line, "createType") {
            create_type = Some(v.to_owned());
        } else if let Some(v) = value(line, "parentCID") {
            parent = Some(v.to_owned());
        } else if let Some(v) = value(line, "ddb.uuid") {
            uuid = Some(parse_uuid(v).ok_or_else(|| {
                unsupported(path, &format!("ddb.uuid {v:?} is not 16 hex bytes"))
            })?);
        } else if let Some(rest) = line
            .strip_prefix("RW ")
            .or_else(|| line.strip_prefix("RDONLY "))
        {
            extents.push(rest.to_owned());
        }
    }
    let create_type =
        create_type.ok_or_else(|| unsupported(path, "descriptor has no createType"))?;
    if !matches!(create_type.as_str(), "vmfs" | "monolithicFlat") {
        return Err(unsupported(path, &format!(
            "createType \"{create_type}\" is a sparse or snapshot disk; only flat disks (vmfs, monolithicFlat) can be written in place: consolidate its snapshots or recover to an alternate location"
        )));
    }
    if let Some(p) = parent.filter(|p| !p.eq_ignore_ascii_case("ffffffff")) {
        return Err(unsupported(path, &format!(
            "the disk has a parent (parentCID={p}): it is a snapshot/delta; delete or consolidate the VM's snapshots, then retry"
        )));
    }
    let [extent] = extents.as_slice() else {
        return Err(unsupported(
            path,
            &format!(
                "{} extents; exactly one flat extent is supported",
                extents.len()
            ),
        ));
    };
    let (sectors, kind, file, offset) = parse_extent(extent)
        .ok_or_else(|| unsupported(path, &format!("extent line {extent:?} not understood")))?;
    if !matches!(kind.as_str(), "VMFS" | "FLAT") || offset != 0 {
        return Err(unsupported(path, &format!("extent type {kind} at offset {offset}: only a flat extent at offset 0 is supported")));
    }
    // ESXi keeps a flat extent beside its descriptor: a name with a path in it (an
    // absolute one would replace the folder outright) reaches files that are not the disk.
    if file.is_empty() || file == "." || file == ".." || file.contains(['/', '\0']) {
        return Err(unsupported(
            path,
            &format!("extent file {file:?} is not a file name beside the descriptor"),
        ));
    }
    let size_bytes = sectors
        .checked_mul(SECTOR_BYTES)
        .ok_or_else(|| unsupported(path, &format!("extent of {sectors} sectors is too large")))?;
    let data_path = parent_dir(path).join(file);
    Ok(DiskImage {
        descriptor: path.into(),
        data_path,
        size_bytes,
        uuid,
    })
}

fn parse_extent(s: &str) -> Option<(u64, String, String, u64)> {
    let mut it = s.splitn(2, ' ');
    let sectors = it.next()?.parse().ok()?;
    let rest = it.next()?.trim();
    let (kind, rest) = rest.split_once(' ')?;
    let rest = rest.trim().strip_prefix('"')?;
    let (file, tail) = rest.split_once('"')?;
    let offset = match tail.trim() {
        "" => 0,
        t => t.parse().ok()?,
    };
    Some((sectors, kind.to_owned(), file.to_owned(), offset))
}

/// Parses `ddb.uuid` ("60 00 C2 9f ... 0c 8f", with a '-' in the middle as ESXi writes it).
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s
        .split([' ', '-'])
        .filter(|p| !p.is_empty())
        .map(|p| u8::from_str_radix(p, 16).ok())
        .collect::<Option<_>>()?;
    hex.try_into().ok()
}

/// Formats a UUID the way ESXi writes `ddb.uuid`.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}", h[..8].join(" "), h[8..].join(" "))
}

/// Creates a new flat VMDK (`createType="vmfs"`, as ESXi writes it) in `dir`:
/// `NAME.vmdk` and a sparse `NAME-flat.vmdk` of `size_bytes`. Refuses to overwrite. For
/// local tools (the demo and tests make on-premises disks with it); the service creates
/// disks a peer asks for with [`crate::datastore::Datastores::create`].
pub fn create(dir: &Path, name: &str, size_bytes: u64, uuid: &[u8; 16]) -> Result<DiskImage> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(SECTOR_BYTES) {
        return Err(Error::InvalidParameter {
            param: "size_bytes",
            reason: format!("{size_bytes} is not a positive multiple of 512"),
        });
    }
    fs::create_dir_all(dir).ctx(|| format!("create datastore directory {}", dir.display()))?;
    let descriptor = dir.join(format!("{name}.vmdk"));
    let flat_name = format!("{name}-flat.vmdk");
    let data_path = dir.join(&flat_name);
    let flat = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&data_path)
        .ctx(|| {
            format!(
                "create {} (remove the old disk first if it is no longer wanted)",
                data_path.display()
            )
        })?;
    flat.set_len(size_bytes)
        .ctx(|| format!("size {}", data_path.display()))?;
    flat.sync_all()
        .ctx(|| format!("fsync {}", data_path.display()))?;
    write_descriptor(&descriptor, &flat_name, size_bytes, uuid)?;
    Ok(DiskImage {
        descriptor,
        data_path,
        size_bytes,
        uuid: Some(*uuid),
    })
}

/// Writes a flat descriptor (`createType="vmfs"`, as ESXi writes it) naming `flat_name`
/// beside it.
pub fn write_descriptor(
    descriptor: &Path,
    flat_name: &str,
    size_bytes: u64,
    uuid: &[u8; 16],
) -> Result<()> {
    write_synced(
        descriptor,
        descriptor_text(flat_name, size_bytes, uuid).as_bytes(),
    )
}

/// The text of a flat descriptor (`createType="vmfs"`, as ESXi writes it) naming
/// `flat_name` beside it.
pub fn descriptor_text(flat_name: &str, size_bytes: u64, uuid: &[u8; 16]) -> String {
    let sectors = size_bytes / SECTOR_BYTES;
    let cylinders = (sectors / (255 * 63)).clamp(1, 65535);
    let cid = u32::from_be_bytes([uuid[0], uuid[5], uuid[10], uuid[15]]) | 1;
    format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={cid:08x}\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n\
         # Extent description\nRW {sectors} VMFS \"{flat_name}\"\n\n\
         # The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\nddb.uuid = \"{}\"\nddb.virtualHWVersion = \"14\"\n",
        format_uuid(uuid)
    )
}

/// Writes a file and fsyncs it and its directory, so it exists after a crash.
///
/// The temporary file is created new (`O_EXCL`, a name of its own beside `path`): an
/// existing file or a link of that name is never followed or truncated.
pub fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let (tmp, mut f) = temp_beside(path)?;
    let written = f
        .write_all(data)
        .and_then(|_| f.sync_all())
        .and_then(|_| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io {
            context: format!("write {}", path.display()),
            source: e,
        });
    }
    sync_dir(parent_dir(path))
}

/// A new temporary file beside `path` (`.NAME.PID.N.partial`), created with `O_EXCL` so
/// nothing of that name (a file, a link planted there) is reused.
pub fn temp_beside(path: &Path) -> Result<(PathBuf, fs::File)> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = parent_dir(path).join(format!(".{name}.{}.{n}.partial", std::process::id()));
    // A disk's image is the VM's data: readable by its owner only, as the disks are.
    let f = std::os::unix::fs::OpenOptionsExt::mode(
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true),
        0o600,
    )
    .open(&tmp)
    .ctx(|| format!("create {}", tmp.display()))?;
    Ok((tmp, f))
}

/// The directory holding `path` ("." for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Fsyncs a directory, making renames and new files in it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("fsync directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ESXI: &str = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\nRW 2048 VMFS \"vm1-flat.vmdk\"\n\nddb.uuid = \"60 00 C2 9f 3c 51 5c 0d-d2 c7 1c 13 32 3e 0c 8f\"\n";

    #[test]
    fn esxi_descriptor() {
        let d = parse_descriptor(Path::new("/ds/vm1.vmdk"), ESXI).unwrap();
        assert_eq!(d.size_bytes, 2048 * 512);
        assert_eq!(d.data_path, Path::new("/ds/vm1-flat.vmdk"));
        assert_eq!(
            format_uuid(&d.uuid.unwrap()),
            "60 00 c2 9f 3c 51 5c 0d-d2 c7 1c 13 32 3e 0c 8f"
        );
    }

    #[test]
    fn qemu_descriptor() {
        let t =
            "createType=\"monolithicFlat\"\nparentCID=ffffffff\nRW 100 FLAT \"a-flat.vmdk\" 0\n";
        assert_eq!(
            parse_descriptor(Path::new("a.vmdk"), t).unwrap().size_bytes,
            51200
        );
    }

    #[test]
    fn refuses_snapshots_and_sparse() {
        let snap = ESXI.replace("parentCID=ffffffff", "parentCID=1234abcd");
        let e = parse_descriptor(Path::new("x.vmdk"), &snap)
            .unwrap_err()
            .to_string();
        assert!(e.contains("snapshot"), "{e}");
        for t in [
            "vmfsSparse",
            "seSparse",
            "monolithicSparse",
            "streamOptimized",
        ] {
            let s = ESXI.replace("\"vmfs\"", &format!("\"{t}\""));
            assert!(
                matches!(
                    parse_descriptor(Path::new("x.vmdk"), &s),
                    Err(Error::UnsupportedDisk { .. })
                ),
                "{t}"
            );
        }
    }
}
