//! The node's current term and its vote in that term, persisted durably
//! before the node acts on them (a vote is persisted before it is granted).
//!
//! `TERM` in the data directory holds `term u64 | voted_for u64 | crc32 u32`
//! (`voted_for` 0: no vote; a file from before elections holds only
//! `term u64 | crc32 u32` and reads as no vote). It is replaced with the
//! temp-file protocol (write, fsync, rename, fsync the directory), so after
//! any crash it holds either the old pair or the new one, never a torn
//! value. A missing file is term 0 with no vote.

use std::path::Path;

use crate::engine::{EngineError, Result};
use crate::storage::Storage;

/// File name of the persisted term.
pub const TERM_FILE: &str = "TERM";

/// The persisted pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TermState {
    /// The current term.
    pub term: u64,
    /// The node voted for in `term`, if any.
    pub voted_for: Option<u64>,
}

fn encode(state: TermState) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..8].copy_from_slice(&state.term.to_le_bytes());
    b[8..16].copy_from_slice(&state.voted_for.unwrap_or(0).to_le_bytes());
    let crc = crc32fast::hash(&b[..16]);
    b[16..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn crc_ok(body: &[u8], crc: &[u8]) -> bool {
    let mut c = [0u8; 4];
    c.copy_from_slice(crc);
    crc32fast::hash(body) == u32::from_le_bytes(c)
}

/// Reads the persisted term and vote (term 0, no vote, if there is none).
/// A file that does not verify is an error: forgetting a term or a vote
/// could let a node accept a stale leader or vote twice in one term.
pub fn load(storage: &dyn Storage, dir: &Path) -> Result<TermState> {
    let path = dir.join(TERM_FILE);
    let names = storage
        .list_dir(dir)
        .map_err(EngineError::io("list data directory", dir))?;
    if !names.iter().any(|n| n == TERM_FILE) {
        return Ok(TermState::default());
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
    match bytes.len() {
        20 if crc_ok(&bytes[..16], &bytes[16..20]) => Ok(TermState {
            term: u64_at(&bytes, 0),
            voted_for: Some(u64_at(&bytes, 8)).filter(|v| *v != 0),
        }),
        12 if crc_ok(&bytes[..8], &bytes[8..12]) => Ok(TermState {
            term: u64_at(&bytes, 0),
            voted_for: None,
        }),
        20 | 12 => Err(corrupt("term file CRC mismatch")),
        n => Err(corrupt(&format!("term file has {n} bytes, expected 20"))),
    }
}

/// Makes `state` the persisted term and vote, durably, before returning.
pub fn persist(storage: &dyn Storage, dir: &Path, state: TermState) -> Result<()> {
    let path = dir.join(TERM_FILE);
    let tmp = dir.join(format!("{TERM_FILE}.tmp"));
    let file = storage
        .create(&tmp)
        .map_err(EngineError::io("create term file", &tmp))?;
    file.write_at(&encode(state), 0)
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
        assert_eq!(load(&s, dir).unwrap(), TermState::default());
        let voted = TermState {
            term: 7,
            voted_for: Some(3),
        };
        persist(&s, dir, voted).unwrap();
        s.crash();
        assert_eq!(load(&s, dir).unwrap(), voted);
        let path = dir.join(TERM_FILE);
        let mut bytes = s.file_bytes(&path).unwrap();
        bytes[0] ^= 1;
        s.set_file_bytes(&path, bytes).unwrap();
        assert!(load(&s, dir).is_err());
    }

    #[test]
    fn a_term_file_from_before_elections_reads_as_no_vote() {
        let s = SimStorage::new(SimOptions::default());
        let dir = Path::new("/d");
        s.create_dir_all(dir).unwrap();
        let path = dir.join(TERM_FILE);
        let mut old = 5u64.to_le_bytes().to_vec();
        old.extend_from_slice(&crc32fast::hash(&old).to_le_bytes());
        s.create(&path).unwrap().write_at(&old, 0).unwrap();
        assert_eq!(
            load(&s, dir).unwrap(),
            TermState {
                term: 5,
                voted_for: None
            }
        );
    }

    #[test]
    fn a_crash_at_any_step_leaves_the_old_or_the_new_term() {
        for stop_after in 0..8 {
            let s = SimStorage::new(SimOptions::default());
            let dir = Path::new("/d");
            s.create_dir_all(dir).unwrap();
            let old = TermState {
                term: 3,
                voted_for: None,
            };
            let new = TermState {
                term: 4,
                voted_for: Some(2),
            };
            persist(&s, dir, old).unwrap();
            s.fail_after_ops(stop_after);
            let _ = persist(&s, dir, new);
            s.crash();
            let got = load(&s, dir).unwrap();
            assert!(got == old || got == new, "stop after {stop_after}: {got:?}");
        }
    }
}
