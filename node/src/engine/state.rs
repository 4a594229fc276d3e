//! The applied state: the ordered map, the LSN it reflects, and its digest.
//!
//! The digest is order-independent (a wrapping sum of per-entry hashes), so
//! it is kept up to date in O(1) per write and two replicas (or two replays)
//! can be compared in O(1). The hash is our own, fixed forever: it must give
//! the same value on every machine and every release, which `std`'s hashers
//! do not promise. This module does no I/O and knows nothing of the WAL.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use super::record::Op;

/// 64-bit hash of one `(key, value)` entry. Lengths are hashed too, so
/// `("ab", "c")` and `("a", "bc")` differ.
pub fn entry_hash(key: &[u8], value: &[u8]) -> u64 {
    let mut h = Hasher64::default();
    h.write_u64(key.len() as u64);
    h.write(key);
    h.write_u64(value.len() as u64);
    h.write(value);
    h.finish()
}

#[derive(Default)]
struct Hasher64 {
    state: u64,
}

impl Hasher64 {
    const K: u64 = 0xf135_7aea_2e62_a9c5;

    fn write_u64(&mut self, word: u64) {
        self.state = (self.state.rotate_left(26) ^ word).wrapping_mul(Self::K);
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(a));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut a = [0u8; 8];
            a[..rest.len()].copy_from_slice(rest);
            self.write_u64(u64::from_le_bytes(a));
        }
    }

    fn finish(&self) -> u64 {
        // splitmix64's finaliser: every input bit affects every output bit.
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// An order-independent digest of a set of entries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Digest(u64);

impl Digest {
    /// Adds an entry's hash.
    pub fn add(&mut self, h: u64) {
        self.0 = self.0.wrapping_add(h);
    }

    /// Removes an entry's hash.
    pub fn remove(&mut self, h: u64) {
        self.0 = self.0.wrapping_sub(h);
    }

    /// The digest value.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// The map as of `applied_lsn`.
#[derive(Debug, Default)]
pub struct MapState {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Every record with LSN <= this is applied, none above it.
    applied_lsn: u64,
    /// Term of the record at `applied_lsn`.
    applied_term: u64,
    digest: Digest,
}

impl MapState {
    /// A state loaded from a snapshot (`digest` already verified).
    pub fn from_snapshot(
        map: BTreeMap<Vec<u8>, Vec<u8>>,
        lsn: u64,
        term: u64,
        digest: u64,
    ) -> Self {
        MapState {
            map,
            applied_lsn: lsn,
            applied_term: term,
            digest: Digest(digest),
        }
    }

    /// Applies the record at `lsn`. Records must come in LSN order, one by one.
    pub fn apply(&mut self, lsn: u64, term: u64, op: Op) {
        assert_eq!(
            lsn,
            self.applied_lsn + 1,
            "records are applied in LSN order without gaps"
        );
        match op {
            Op::Put { key, value } => {
                self.digest.add(entry_hash(&key, &value));
                // One descent of the tree, whether the key is new or not.
                match self.map.entry(key) {
                    Entry::Occupied(mut e) => {
                        self.digest.remove(entry_hash(e.key(), e.get()));
                        *e.get_mut() = value;
                    }
                    Entry::Vacant(e) => {
                        e.insert(value);
                    }
                }
            }
            Op::Delete { key } => {
                if let Some(old) = self.map.remove(&key) {
                    self.digest.remove(entry_hash(&key, &old));
                }
            }
        }
        self.applied_lsn = lsn;
        self.applied_term = term;
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Vec<u8>> {
        self.map.get(key)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if there are no keys.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// LSN of the last applied record.
    pub fn applied_lsn(&self) -> u64 {
        self.applied_lsn
    }

    /// Term of the last applied record.
    pub fn applied_term(&self) -> u64 {
        self.applied_term
    }

    /// The incrementally maintained digest.
    pub fn digest(&self) -> u64 {
        self.digest.value()
    }

    /// The digest recomputed from every entry (for checks: must equal `digest`).
    pub fn digest_full(&self) -> u64 {
        let mut d = Digest::default();
        for (k, v) in &self.map {
            d.add(entry_hash(k, v));
        }
        d.value()
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&Vec<u8>, &Vec<u8>)> {
        self.map.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Op {
        Op::Put {
            key: k.into(),
            value: v.into(),
        }
    }

    #[test]
    fn digest_is_order_independent_and_tracks_deletes() {
        let mut a = MapState::default();
        a.apply(1, 0, put("x", "1"));
        a.apply(2, 0, put("y", "2"));
        a.apply(3, 0, put("x", "3"));
        let mut b = MapState::default();
        b.apply(1, 0, put("y", "2"));
        b.apply(2, 0, put("x", "3"));
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.digest(), a.digest_full());
        b.apply(3, 0, Op::Delete { key: b"y".to_vec() });
        assert_ne!(a.digest(), b.digest());
        assert_eq!(b.digest(), b.digest_full());
        assert_ne!(entry_hash(b"ab", b"c"), entry_hash(b"a", b"bc"));
    }

    #[test]
    #[should_panic(expected = "LSN order")]
    fn applying_out_of_order_is_a_bug() {
        let mut s = MapState::default();
        s.apply(2, 0, put("x", "1"));
    }
}
