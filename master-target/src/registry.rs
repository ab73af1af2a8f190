//! The master target's list of disks, kept durable in `DATA_DIR/disks.json`.
//!
//! Written whole to a temporary file, fsynced and renamed: a crash leaves the old list or the
//! new one, never half of either.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::vmdk::write_synced;

/// A disk the master target knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Data-plane id.
    pub disk_id: u64,
    /// VM.
    pub vm_id: String,
    /// Replication group.
    pub group_id: String,
    /// UUID as 32 hex digits.
    pub uuid: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Descriptor (or raw image).
    pub descriptor: PathBuf,
    /// The flat extent written.
    pub data_path: PathBuf,
    /// True while attached (locked, receiving); false once detached for failback, which
    /// is final: a detached disk is never attached again.
    pub attached: bool,
    /// The identity of the process server that attached it (only it may write the disk).
    #[serde(default)]
    pub process_server: String,
    /// The committed LSN when it was detached.
    #[serde(default)]
    pub detached_lsn: u64,
    /// The VM's OS type ("" in lists from before replication groups).
    #[serde(default)]
    pub os_type: String,
}

/// The durable disk list.
#[derive(Debug)]
pub struct Registry {
    path: PathBuf,
    /// Every disk, attached or detached.
    pub disks: Vec<DiskRecord>,
}

impl Registry {
    /// Loads `DATA_DIR/disks.json` (empty if absent).
    pub fn load(data_dir: &Path) -> Result<Registry> {
        fs::create_dir_all(data_dir)
            .ctx(|| format!("create data directory {}", data_dir.display()))?;
        let path = data_dir.join("disks.json");
        let disks = match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::InvalidParameter {
                param: "disks.json",
                reason: format!("{}: {e}", path.display()),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(Error::Io {
                    context: format!("read {}", path.display()),
                    source: e,
                })
            }
        };
        Ok(Registry { path, disks })
    }

    /// Loads the list for an offline command: a missing list is an error that names the
    /// place looked at (a wrong data directory must not look like "no such disk").
    pub fn read(data_dir: &Path) -> Result<Registry> {
        let path = data_dir.join("disks.json");
        if !path.exists() {
            return Err(Error::InvalidParameter {
                param: "data-dir",
                reason: format!(
                    "no disk list at {}: is this the master target's data directory? (pass --config, or --data-dir and --retention-dir)",
                    path.display()
                ),
            });
        }
        Registry::load(data_dir)
    }

    /// Writes the list durably.
    pub fn save(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.disks).expect("serializable");
        write_synced(&self.path, &json)
    }

    /// The record of `disk_id`.
    pub fn get(&self, disk_id: u64) -> Option<&DiskRecord> {
        self.disks.iter().find(|d| d.disk_id == disk_id)
    }

    /// Inserts or replaces a record, and saves.
    pub fn put(&mut self, rec: DiskRecord) -> Result<()> {
        self.disks.retain(|d| d.disk_id != rec.disk_id);
        self.disks.push(rec);
        self.disks.sort_by_key(|d| d.disk_id);
        self.save()
    }
}

/// 32 lowercase hex digits.
pub fn uuid_hex(u: &[u8; 16]) -> String {
    u.iter().map(|b| format!("{b:02x}")).collect()
}

/// The 16 bytes of a UUID written as 32 hex digits (zeros where a digit pair is not hex).
pub fn uuid_bytes(hex: &str) -> [u8; 16] {
    let mut uuid = [0u8; 16];
    for (i, b) in uuid.iter_mut().enumerate() {
        *b = hex
            .get(i * 2..i * 2 + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    uuid
}
