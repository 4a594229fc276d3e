//! Snapshot (checkpoint) files: format, the durable write protocol, loading.
//!
//! A snapshot is the whole map at one LSN. Writing follows
//! `node/DESIGN.md` ("Snapshots"): temp file, `fdatasync`, rename into place,
//! `fsync` of the directory. The name carries the LSN, so the durable rename
//! *is* the durable record of the snapshot LSN. This module does not decide
//! when to snapshot or which WAL segments to delete; the engine does
//! (`engine/checkpoint.rs`).
//!
//! Layout (little endian): `magic "KVSNAP01" | version u32 | zero u32 |
//! lsn u64 | term u64 | entries u64 | digest u64 | entries... | crc u32`,
//! each entry `key_len u32 | value_len u32 | key | value`, entries in key
//! order, the CRC over every byte before it.
//!
//! Shipping a snapshot to a follower never holds the file in memory: the
//! leader reads it a chunk at a time through a [`SnapshotFile`] (an open
//! handle, so a newer snapshot's cleanup removing the name does not cut the
//! transfer short), and the follower writes the chunks as they arrive to a
//! [`Receive`] temp file (`snap-<lsn>-<n>.snap.recv`), which it syncs,
//! verifies by decoding it from the file, and renames into place. The engine
//! decides whether to install; this module only moves and checks bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{EngineError, Result};
use super::state::{Digest, Entries, entry_hash};
use crate::storage::{Storage, StorageFile};

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

/// True for a temp file a crashed snapshot write (`.snap.tmp`) or an
/// interrupted receive from a leader (`.snap.recv`) left behind: recovery
/// removes both.
pub fn is_snapshot_temp(name: &str) -> bool {
    name.starts_with("snap-") && (name.ends_with(".snap.tmp") || is_snapshot_recv(name))
}

/// True for the temp file of a snapshot being received from a leader.
pub fn is_snapshot_recv(name: &str) -> bool {
    name.starts_with("snap-") && name.ends_with(".snap.recv")
}

/// Numbers the receives of this process, so two streams of the same
/// snapshot (a leader that timed out and retried while the first stream is
/// still being read) never write into one file.
static RECEIVES: AtomicU64 = AtomicU64::new(0);

/// File name of the `n`th receive of the snapshot at `lsn`.
pub fn recv_name(lsn: u64, n: u64) -> String {
    format!("snap-{lsn:020}-{n}.snap.recv")
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
        match decode_file(&*file, &path)? {
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

/// Decodes and verifies the snapshot in `file`, reading it in bounded
/// blocks. The outer error is the disk's (an I/O failure says nothing about
/// the snapshot, so it must not be set aside for it); the inner one is the
/// snapshot's own (damage, a bad format).
pub fn decode_file(
    file: &dyn StorageFile,
    path: &Path,
) -> Result<std::result::Result<Snapshot, String>> {
    let len = file
        .len()
        .map_err(EngineError::io("read snapshot length", path))?;
    let mut io_error = None;
    let decoded = decode_with(len, &mut |buf, offset| {
        file.read_at(buf, offset).inspect_err(|e| {
            io_error = Some(std::io::Error::new(e.kind(), e.to_string()));
        })
    });
    match io_error {
        Some(error) => Err(EngineError::Io {
            op: "read snapshot",
            path: path.to_path_buf(),
            error,
        }),
        None => Ok(decoded),
    }
}

/// A snapshot file opened for shipping to a follower, read a chunk at a
/// time.
///
/// It holds an open handle, not a name: the engine keeps only the two
/// newest snapshots, so two snapshots taken during a long transfer remove
/// this one's name, and the storage contract keeps a removed file readable
/// through a handle opened before (POSIX unlink semantics). Cloning shares
/// the handle.
#[derive(Clone)]
pub struct SnapshotFile {
    file: Arc<dyn StorageFile>,
    path: PathBuf,
    lsn: u64,
    term: u64,
    /// Length in bytes, read once at open (a snapshot is never rewritten).
    len: u64,
}

impl std::fmt::Debug for SnapshotFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotFile")
            .field("path", &self.path)
            .field("lsn", &self.lsn)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl SnapshotFile {
    /// Opens `snap-<lsn>.snap` in `dir` and reads its header (magic,
    /// version, LSN, term). The rest is verified by the receiver, which
    /// decodes every byte before it installs anything.
    pub fn open(storage: &dyn Storage, dir: &Path, lsn: u64) -> Result<SnapshotFile> {
        let path = dir.join(snapshot_name(lsn));
        let file: Arc<dyn StorageFile> = Arc::from(
            storage
                .open(&path)
                .map_err(EngineError::io("open snapshot", &path))?,
        );
        let len = file
            .len()
            .map_err(EngineError::io("read snapshot length", &path))?;
        let corrupt = |reason: String| EngineError::Corrupt {
            file: path.clone(),
            offset: 0,
            lsn: Some(lsn),
            reason,
        };
        if len < (SNAPSHOT_HEADER_BYTES + 4) as u64 {
            return Err(corrupt(format!("{len} bytes is too short for a snapshot")));
        }
        let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
        file.read_at(&mut header, 0)
            .map_err(EngineError::io("read snapshot header", &path))?;
        if header[..8] != SNAPSHOT_MAGIC || u32_of(&header[8..]) != SNAPSHOT_VERSION {
            return Err(corrupt("bad magic or version".into()));
        }
        if u64_of(&header[16..]) != lsn {
            return Err(corrupt(format!(
                "file name says LSN {lsn}, header says {}",
                u64_of(&header[16..])
            )));
        }
        Ok(SnapshotFile {
            file,
            path,
            lsn,
            term: u64_of(&header[24..]),
            len,
        })
    }

    /// The LSN the snapshot covers.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    /// The term of the record at its LSN (from the header).
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a snapshot holds at least a header and a CRC.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where it was opened (the name may be gone by now; the handle is not).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads up to `max` bytes at `offset` (fewer only at the end of the
    /// file; none at or past it).
    pub fn read_chunk(&self, offset: u64, max: usize) -> Result<Vec<u8>> {
        let n = self.len.saturating_sub(offset).min(max as u64) as usize;
        let mut buf = vec![0u8; n];
        self.file
            .read_at(&mut buf, offset)
            .map_err(EngineError::io("read snapshot chunk", &self.path))?;
        Ok(buf)
    }

    /// The whole file in memory (for tests and small tools; shipping reads
    /// it a chunk at a time).
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let len = usize::try_from(self.len).map_err(|_| EngineError::Corrupt {
            file: self.path.clone(),
            offset: 0,
            lsn: Some(self.lsn),
            reason: format!("{} bytes do not fit in memory", self.len),
        })?;
        self.read_chunk(0, len)
    }
}

/// A snapshot being received from a leader, written chunk by chunk to a
/// temp file in the data directory as the chunks arrive.
///
/// Dropping it before [`Receive::rename_into_place`] removes the temp file
/// (best effort: a crash or a failed removal leaves it for the next open,
/// which removes every `*.snap.recv`). A failed write or sync here does not
/// poison the engine: the file is thrown away, and nothing the engine keeps
/// depends on it.
pub struct Receive {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    path: PathBuf,
    file: Box<dyn StorageFile>,
    /// The LSN the leader announced (its header must agree).
    lsn: u64,
    /// The size the leader announced.
    total_bytes: u64,
    /// Bytes written so far: the offset the next chunk must start at.
    /// Invariant: `received <= total_bytes`.
    received: u64,
    /// The temp file is gone (renamed into place or removed).
    finished: bool,
}

impl std::fmt::Debug for Receive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receive")
            .field("path", &self.path)
            .field("received", &self.received)
            .field("total_bytes", &self.total_bytes)
            .finish_non_exhaustive()
    }
}

impl Receive {
    /// Creates the temp file for a snapshot at `lsn` of `total_bytes`.
    pub fn begin(
        storage: Arc<dyn Storage>,
        dir: &Path,
        lsn: u64,
        total_bytes: u64,
    ) -> Result<Receive> {
        let n = RECEIVES.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(recv_name(lsn, n));
        let file = storage
            .create(&path)
            .map_err(EngineError::io("create snapshot receive file", &path))?;
        Ok(Receive {
            storage,
            dir: dir.to_path_buf(),
            path,
            file,
            lsn,
            total_bytes,
            received: 0,
            finished: false,
        })
    }

    /// The LSN the leader announced.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    /// The size the leader announced.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The temp file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once every announced byte arrived.
    pub fn is_complete(&self) -> bool {
        self.received == self.total_bytes
    }

    /// Writes the next chunk, which must start where the last one ended and
    /// stay within the announced size.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if offset != self.received {
            return Err(EngineError::InvalidLogOp(format!(
                "snapshot chunk at offset {offset}, expected {}",
                self.received
            )));
        }
        let end = offset.saturating_add(data.len() as u64);
        if end > self.total_bytes {
            return Err(EngineError::InvalidLogOp(format!(
                "snapshot chunk ends at byte {end}, past the announced {}",
                self.total_bytes
            )));
        }
        self.file
            .write_at(data, offset)
            .map_err(EngineError::io("write snapshot receive file", &self.path))?;
        self.received = end;
        Ok(())
    }

    /// Checks that every announced byte arrived, makes the file durable, and
    /// decodes and verifies it from the file (in bounded blocks). An error
    /// is the disk's; `Ok(Err(reason))` says the snapshot does not verify.
    pub fn sync_and_decode(&mut self) -> Result<std::result::Result<Snapshot, String>> {
        if !self.is_complete() {
            return Ok(Err(format!(
                "the stream ended after {} of {} bytes",
                self.received, self.total_bytes
            )));
        }
        self.file
            .sync_data()
            .map_err(EngineError::io("sync snapshot receive file", &self.path))?;
        Ok(match decode_file(&*self.file, &self.path)? {
            Ok(snap) if snap.lsn != self.lsn => Err(format!(
                "announced LSN {}, header says {}",
                self.lsn, snap.lsn
            )),
            decoded => decoded,
        })
    }

    /// Renames the (synced, verified) file to `snap-<lsn>.snap` and syncs
    /// the directory: from then on it is the snapshot recovery loads.
    pub fn rename_into_place(&mut self) -> Result<PathBuf> {
        let to = self.dir.join(snapshot_name(self.lsn));
        self.storage
            .rename(&self.path, &to)
            .map_err(EngineError::io("rename received snapshot into place", &to))?;
        self.finished = true;
        self.storage
            .sync_dir(&self.dir)
            .map_err(EngineError::io("sync data directory", &self.dir))?;
        Ok(to)
    }
}

impl Drop for Receive {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // No directory sync: a removal lost to a crash is redone at open.
        if let Err(e) = self.storage.remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove an unfinished snapshot receive; the next open removes it");
        }
    }
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
