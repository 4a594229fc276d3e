//! Snapshot (checkpoint) files: format, the durable write protocol, loading.
//!
//! A snapshot is the whole map at one LSN. Writing follows
//! `node/DESIGN.md` ("Snapshots"): temp file, `fdatasync`, rename into place,
//! `fsync` of the directory. The name carries the LSN, so the durable rename
//! *is* the durable record of the snapshot LSN. This module does not decide
//! when to snapshot or which WAL segments to delete; the engine does.
//!
//! Layout (little endian): `magic "KVSNAP01" | version u32 | zero u32 |
//! lsn u64 | term u64 | entries u64 | digest u64 | entries... | crc u32`,
//! each entry `key_len u32 | value_len u32 | key | value`, entries in key
//! order, the CRC over every byte before it.

use std::path::{Path, PathBuf};

use super::error::{EngineError, Result};
use super::state::{Digest, Entries, entry_hash};
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
    pub map: Entries,
    /// The state digest at `lsn` (verified against the entries).
    pub digest: u64,
}

/// Encodes the map as a snapshot file's bytes; `entries` must come in key
/// order (decoding refuses anything else).
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

/// Reads a snapshot body front to back in bounded blocks, feeding every byte
/// to the CRC, so loading never holds the whole file in memory.
struct BodyReader<'a> {
    read_at: &'a mut dyn FnMut(&mut [u8], u64) -> std::io::Result<()>,
    /// Next file offset to read from.
    offset: u64,
    /// End of the body (the CRC follows it).
    end: u64,
    buf: Vec<u8>,
    pos: usize,
    crc: crc32fast::Hasher,
}

const READ_BLOCK_BYTES: usize = 4 << 20;

impl BodyReader<'_> {
    /// Bytes of the body not yet consumed.
    fn remaining(&self) -> u64 {
        self.end - self.offset + (self.buf.len() - self.pos) as u64
    }

    /// The next `n` bytes; `n` is checked against what is left first, so a
    /// damaged length never causes a large allocation.
    fn take(&mut self, n: usize) -> std::result::Result<&[u8], String> {
        if n as u64 > self.remaining() {
            return Err(format!(
                "an entry needs {n} bytes but only {} are left before the CRC",
                self.remaining()
            ));
        }
        if self.buf.len() - self.pos < n {
            self.buf.drain(..self.pos);
            self.pos = 0;
            let want = (n - self.buf.len()).max(READ_BLOCK_BYTES) as u64;
            let len = want.min(self.end - self.offset) as usize;
            let start = self.buf.len();
            self.buf.resize(start + len, 0);
            (self.read_at)(&mut self.buf[start..], self.offset)
                .map_err(|e| format!("read at offset {}: {e}", self.offset))?;
            self.crc.update(&self.buf[start..]);
            self.offset += len as u64;
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
}

/// Decodes and verifies a snapshot of `len` bytes read through `read_at`
/// (CRC, counts, key order, digest), streaming it in bounded blocks.
pub fn decode_with(
    len: u64,
    read_at: &mut dyn FnMut(&mut [u8], u64) -> std::io::Result<()>,
) -> std::result::Result<Snapshot, String> {
    if len < (SNAPSHOT_HEADER_BYTES + 4) as u64 {
        return Err(format!("{len} bytes is too short for a snapshot"));
    }
    let mut crc_bytes = [0u8; 4];
    read_at(&mut crc_bytes, len - 4).map_err(|e| format!("read CRC: {e}"))?;
    let crc_stored = u32::from_le_bytes(crc_bytes);
    let mut r = BodyReader {
        read_at,
        offset: 0,
        end: len - 4,
        buf: Vec::new(),
        pos: 0,
        crc: crc32fast::Hasher::new(),
    };
    let header = r.take(SNAPSHOT_HEADER_BYTES)?.to_vec();
    if header[..8] != SNAPSHOT_MAGIC {
        return Err("bad magic".into());
    }
    if u32_of(&header[8..]) != SNAPSHOT_VERSION {
        return Err("unsupported version".into());
    }
    let lsn = u64_of(&header[16..]);
    let term = u64_of(&header[24..]);
    let count = u64_of(&header[32..]);
    let digest_stored = u64_of(&header[40..]);
    // Every entry takes at least 8 bytes: bound the count before trusting it.
    if count > r.remaining() / 8 {
        return Err(format!("entry count {count} cannot fit in the file"));
    }
    // Reserve modestly: the count is not verified until the CRC at the end.
    let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(count.min(1 << 16) as usize);
    let mut digest = Digest::default();
    for i in 0..count {
        let lens = r.take(8)?;
        let (kl, vl) = (u32_of(lens) as usize, u32_of(&lens[4..]) as usize);
        let key = r.take(kl)?.to_vec();
        let value = r.take(vl)?.to_vec();
        if let Some((prev, _)) = entries.last()
            && *prev >= key
        {
            return Err(format!("keys out of order at entry {i}"));
        }
        digest.add(entry_hash(&key, &value));
        entries.push((key, value));
    }
    if r.remaining() != 0 {
        return Err(format!("{} bytes after the last entry", r.remaining()));
    }
    if r.crc.clone().finalize() != crc_stored {
        return Err("CRC mismatch".into());
    }
    if digest.value() != digest_stored {
        return Err("state digest does not match the entries".into());
    }
    let map: Entries = entries.into_iter().collect();
    Ok(Snapshot {
        lsn,
        term,
        map,
        digest: digest_stored,
    })
}

/// Decodes and verifies snapshot bytes held in memory.
pub fn decode(bytes: &[u8]) -> std::result::Result<Snapshot, String> {
    decode_with(bytes.len() as u64, &mut |buf, offset| {
        let start = offset as usize;
        let src = bytes
            .get(start..start + buf.len())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
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
        let file = storage
            .open(&path)
            .map_err(EngineError::io("open snapshot", &path))?;
        let len = file
            .len()
            .map_err(EngineError::io("read snapshot length", &path))?;
        // An I/O error is the disk's failure, not the snapshot's: report it
        // rather than setting a possibly good snapshot aside.
        let mut io_error = None;
        let decoded = decode_with(len, &mut |buf, offset| {
            file.read_at(buf, offset).inspect_err(|e| {
                io_error = Some(std::io::Error::new(e.kind(), e.to_string()));
            })
        });
        if let Some(error) = io_error {
            return Err(EngineError::Io {
                op: "read snapshot",
                path,
                error,
            });
        }
        match decoded {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn sample() -> (BTreeMap<Vec<u8>, Vec<u8>>, Vec<u8>) {
        let mut map = BTreeMap::new();
        let mut digest = Digest::default();
        for i in 0..50u32 {
            let (k, v) = (format!("key{i:03}").into_bytes(), vec![i as u8; i as usize]);
            digest.add(entry_hash(&k, &v));
            map.insert(k, v);
        }
        let bytes = encode(77, 2, digest.value(), map.len(), map.iter());
        (map, bytes)
    }

    #[test]
    fn round_trip() {
        let (map, bytes) = sample();
        let snap = decode(&bytes).unwrap();
        assert_eq!((snap.lsn, snap.term), (77, 2));
        assert_eq!(snap.map, map.into_iter().collect::<Entries>());
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_rejected() {
        let (_, bytes) = sample();
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut} accepted");
        }
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x08;
            assert!(decode(&bad).is_err(), "flip at {at} accepted");
        }
    }

    #[test]
    fn damaged_lengths_never_allocate_on_trust() {
        let (_, mut bytes) = sample();
        // An absurd entry count, with a CRC that matches it: refused by the
        // size bound, not by running out of memory.
        bytes[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        let body = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
        let err = decode(&bytes).unwrap_err();
        assert!(err.contains("cannot fit"), "{err}");
    }
}
