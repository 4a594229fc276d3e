//! Snapshot (checkpoint) files: format, the durable write protocol, loading.
//!
//! A snapshot is the whole map at one LSN. Writing follows
//! `shared/design/storage.md`: temp file, `fdatasync`, rename into place,
//! `fsync` of the directory. The name carries the LSN, so the durable rename
//! *is* the durable record of the snapshot LSN. This module does not decide
//! when to snapshot or which WAL segments to delete; the engine does.
//!
//! Layout (little endian): `magic "KVSNAP01" | version u32 | zero u32 |
//! lsn u64 | term u64 | entries u64 | digest u64 | entries... | crc u32`,
//! each entry `key_len u32 | value_len u32 | key | value`, entries in key
//! order, the CRC over every byte before it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::{EngineError, Result};
use super::state::{Digest, entry_hash};
use crate::storage::Storage;

/// Magic at the start of a snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"KVSNAP01";
/// Bytes before the first entry.
pub const SNAPSHOT_HEADER_BYTES: usize = 48;
const SNAPSHOT_VERSION: u32 = 1;
const _: () = assert!(SNAPSHOT_HEADER_BYTES == 8 + 4 + 4 + 8 + 8 + 8 + 8);

/// File name of the snapshot at `lsn`.
pub fn snapshot_name(lsn: u64) -> String {
    format!("snap-{lsn:020}.snap")
}

/// Parses a snapshot file name back into its LSN.
pub fn parse_snapshot_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("snap-")?.strip_suffix(".snap")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// True for a temp file a crashed snapshot write left behind.
pub fn is_snapshot_temp(name: &str) -> bool {
    name.starts_with("snap-") && name.ends_with(".snap.tmp")
}

/// A decoded snapshot.
#[derive(Debug)]
pub struct Snapshot {
    /// Last LSN whose effect the snapshot includes.
    pub lsn: u64,
    /// Term of the record at `lsn`.
    pub term: u64,
    /// The map at `lsn`.
    pub map: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The state digest at `lsn` (verified against the entries).
    pub digest: u64,
}

/// Encodes the map as a snapshot file's bytes.
pub fn encode<'a>(
    lsn: u64,
    term: u64,
    digest: u64,
    len: usize,
    entries: impl Iterator<Item = (&'a Vec<u8>, &'a Vec<u8>)>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + len * 48);
    out.extend_from_slice(&SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&term.to_le_bytes());
    out.extend_from_slice(&(len as u64).to_le_bytes());
    out.extend_from_slice(&digest.to_le_bytes());
    let mut count = 0usize;
    for (k, v) in entries {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(v);
        count += 1;
    }
    assert_eq!(count, len, "snapshot entry count matches the map");
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn take<'a>(bytes: &'a [u8], at: &mut usize, n: usize) -> std::result::Result<&'a [u8], String> {
    let end = at
        .checked_add(n)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| format!("entry at offset {at} runs past the end of the file"))?;
    let s = &bytes[*at..end];
    *at = end;
    Ok(s)
}

fn u32_of(s: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&s[..4]);
    u32::from_le_bytes(a)
}

fn u64_of(s: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&s[..8]);
    u64::from_le_bytes(a)
}

/// Decodes and verifies snapshot bytes (CRC, counts, key order, digest).
pub fn decode(bytes: &[u8]) -> std::result::Result<Snapshot, String> {
    if bytes.len() < SNAPSHOT_HEADER_BYTES + 4 {
        return Err(format!("{} bytes is too short for a snapshot", bytes.len()));
    }
    if bytes[..8] != SNAPSHOT_MAGIC {
        return Err("bad magic".into());
    }
    let body_len = bytes.len() - 4;
    let crc = u32_of(&bytes[body_len..]);
    if crc32fast::hash(&bytes[..body_len]) != crc {
        return Err("CRC mismatch".into());
    }
    let body = &bytes[..body_len];
    if u32_of(&body[8..]) != SNAPSHOT_VERSION {
        return Err("unsupported version".into());
    }
    let lsn = u64_of(&body[16..]);
    let term = u64_of(&body[24..]);
    let count = u64_of(&body[32..]);
    let digest_stored = u64_of(&body[40..]);
    let mut at = SNAPSHOT_HEADER_BYTES;
    let mut entries = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(body.len() / 8));
    let mut digest = Digest::default();
    for _ in 0..count {
        let lens = take(body, &mut at, 8)?;
        let (kl, vl) = (u32_of(lens) as usize, u32_of(&lens[4..]) as usize);
        let key = take(body, &mut at, kl)?.to_vec();
        let value = take(body, &mut at, vl)?.to_vec();
        if let Some((prev, _)) = entries.last()
            && *prev >= key
        {
            return Err(format!("keys out of order at offset {at}"));
        }
        digest.add(entry_hash(&key, &value));
        entries.push((key, value));
    }
    if at != body.len() {
        return Err(format!("{} bytes after the last entry", body.len() - at));
    }
    if digest.value() != digest_stored {
        return Err("state digest does not match the entries".into());
    }
    // Entries are sorted and unique, so this is a linear bulk build.
    let map: BTreeMap<Vec<u8>, Vec<u8>> = entries.into_iter().collect();
    Ok(Snapshot {
        lsn,
        term,
        map,
        digest: digest_stored,
    })
}

/// Writes snapshot bytes durably as `snap-<lsn>.snap` in `dir`: temp file,
/// sync, rename, directory sync. Returns the final path.
pub fn write(storage: &dyn Storage, dir: &Path, lsn: u64, bytes: &[u8]) -> Result<PathBuf> {
    let path = dir.join(snapshot_name(lsn));
    let tmp = dir.join(format!("{}.tmp", snapshot_name(lsn)));
    let file = storage
        .create(&tmp)
        .map_err(EngineError::io("create snapshot temp file", &tmp))?;
    file.write_at(bytes, 0)
        .map_err(EngineError::io("write snapshot", &tmp))?;
    file.sync_data()
        .map_err(EngineError::io("sync snapshot", &tmp))?;
    drop(file);
    storage
        .rename(&tmp, &path)
        .map_err(EngineError::io("rename snapshot into place", &path))?;
    storage
        .sync_dir(dir)
        .map_err(EngineError::io("sync data directory", dir))?;
    Ok(path)
}

/// What loading the newest snapshot found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The newest snapshot that verified, if any.
    pub snapshot: Option<Snapshot>,
    /// Its path.
    pub path: Option<PathBuf>,
    /// Snapshots that did not verify, with the reason (newer than the loaded one).
    pub rejected: Vec<(PathBuf, String)>,
}

/// The LSNs of the snapshots in `dir`, newest first.
pub fn list(storage: &dyn Storage, dir: &Path) -> Result<Vec<u64>> {
    let names = storage
        .list_dir(dir)
        .map_err(EngineError::io("list data directory", dir))?;
    let mut lsns: Vec<u64> = names
        .iter()
        .filter_map(|n| parse_snapshot_name(n))
        .collect();
    lsns.sort_unstable_by(|a, b| b.cmp(a));
    Ok(lsns)
}

/// Loads the newest snapshot that verifies, falling back to older ones.
pub fn load_newest(storage: &dyn Storage, dir: &Path) -> Result<Loaded> {
    let mut loaded = Loaded::default();
    for lsn in list(storage, dir)? {
        let path = dir.join(snapshot_name(lsn));
        let bytes = storage
            .read_file(&path)
            .map_err(EngineError::io("read snapshot", &path))?;
        match decode(&bytes) {
            Ok(snap) if snap.lsn == lsn => {
                loaded.snapshot = Some(snap);
                loaded.path = Some(path);
                return Ok(loaded);
            }
            Ok(snap) => loaded.rejected.push((
                path,
                format!("file name says LSN {lsn}, header says {}", snap.lsn),
            )),
            Err(reason) => loaded.rejected.push((path, reason)),
        }
    }
    Ok(loaded)
}
