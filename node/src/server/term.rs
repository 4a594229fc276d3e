//! The node's current term, persisted durably before the node acts on it.
//!
//! `TERM` in the data directory holds `term u64 | crc32 u32`. It is replaced
//! with the temp-file protocol (write, fsync, rename, fsync the directory),
//! so after any crash it holds either the old term or the new one, never a
//! torn value. A missing file is term 0 (a node that never saw a term).
//! (Votes will join it when elections arrive.)

use std::path::Path;

use crate::engine::{EngineError, Result};
use crate::storage::Storage;

/// File name of the persisted term.
pub const TERM_FILE: &str = "TERM";

fn encode(term: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&term.to_le_bytes());
    let crc = crc32fast::hash(&b[..8]);
    b[8..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Reads the persisted term (0 if there is none). A file that does not
/// verify is an error: forgetting a term could let a node accept a stale
/// leader.
pub fn load(storage: &dyn Storage, dir: &Path) -> Result<u64> {
    let path = dir.join(TERM_FILE);
    let names = storage
        .list_dir(dir)
        .map_err(EngineError::io("list data directory", dir))?;
    if !names.iter().any(|n| n == TERM_FILE) {
        return Ok(0);
    }
    let bytes = storage
        .read_file(&path)
        .map_err(EngineError::io("read term file", &path))?;
    let corrupt = |reason: &str| EngineError::Corrupt {
        file: path.clone(),
        offset: 0,
        lsn: None,
        reason: reason.to_owned(),
    };
    let b = bytes
        .get(..12)
        .ok_or_else(|| corrupt("term file is too short"))?;
    let mut term = [0u8; 8];
    term.copy_from_slice(&b[..8]);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&b[8..12]);
    if crc32fast::hash(&b[..8]) != u32::from_le_bytes(crc) {
        return Err(corrupt("term file CRC mismatch"));
    }
    Ok(u64::from_le_bytes(term))
}

/// Makes `term` the persisted term, durably, before returning.
pub fn persist(storage: &dyn Storage, dir: &Path, term: u64) -> Result<()> {
    let path = dir.join(TERM_FILE);
    let tmp = dir.join(format!("{TERM_FILE}.tmp"));
    let file = storage
        .create(&tmp)
        .map_err(EngineError::io("create term file", &tmp))?;
    file.write_at(&encode(term), 0)
        .map_err(EngineError::io("write term file", &tmp))?;
    file.sync_data()
        .map_err(EngineError::io("sync term file", &tmp))?;
    storage
        .rename(&tmp, &path)
        .map_err(EngineError::io("rename term file", &path))?;
    storage
        .sync_dir(dir)
        .map_err(EngineError::io("sync data directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{SimOptions, SimStorage};

    #[test]
    fn a_persisted_term_survives_a_crash_and_damage_is_an_error() {
        let s = SimStorage::new(SimOptions::default());
        let dir = Path::new("/d");
        s.create_dir_all(dir).unwrap();
        assert_eq!(load(&s, dir).unwrap(), 0);
        persist(&s, dir, 7).unwrap();
        s.crash();
        assert_eq!(load(&s, dir).unwrap(), 7);
        let path = dir.join(TERM_FILE);
        let mut bytes = s.file_bytes(&path).unwrap();
        bytes[0] ^= 1;
        s.set_file_bytes(&path, bytes).unwrap();
        assert!(load(&s, dir).is_err());
    }

    #[test]
    fn a_crash_at_any_step_leaves_the_old_or_the_new_term() {
        for stop_after in 0..8 {
            let s = SimStorage::new(SimOptions::default());
            let dir = Path::new("/d");
            s.create_dir_all(dir).unwrap();
            persist(&s, dir, 3).unwrap();
            s.fail_after_ops(stop_after);
            let _ = persist(&s, dir, 4);
            s.crash();
            let term = load(&s, dir).unwrap();
            assert!(term == 3 || term == 4, "stop after {stop_after}: {term}");
        }
    }
}
