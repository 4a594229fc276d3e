//! The applied state: the map, the LSN it reflects, and its digest.
//!
//! The digest is order-independent (a wrapping sum of per-entry hashes), so
//! it is kept up to date in O(1) per write and two replicas (or two replays)
//! can be compared in O(1). The hash is our own, fixed forever: it must give
//! the same value on every machine and every release, which `std`'s hashers
//! do not promise.
//!
//! A snapshot takes the state with [`MapState::freeze`] in O(1) and encodes
//! it while applies go on (into an overlay folded back afterwards), so a
//! snapshot of a large map never stalls the node's writes. This module does
//! no I/O and knows nothing of the WAL.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

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

/// The entries of a state: a hash map (an apply costs one hash and about
/// one cache miss, where an ordered map compares keys all the way down).
/// Snapshots sort them.
pub type Entries = HashMap<Vec<u8>, Vec<u8>>;

/// The map as of `applied_lsn`.
///
/// A snapshot must encode one consistent state, which for a large map takes
/// a while, and applies must not wait for it (they run on the node's
/// runtime thread, with the engine's state lock held: waiting would stall
/// the node, and a leader that stalls for an election timeout steps down).
/// So the entries live in a shared `base`: [`MapState::freeze`] hands a
/// snapshot a reference to it in O(1), and while the snapshot holds it,
/// applies go to `changes`, an overlay that reads consult first. The first
/// apply after the snapshot released the base folds the overlay back in.
#[derive(Debug, Default)]
pub struct MapState {
    /// The entries, where `changes` does not override them.
    base: Arc<Entries>,
    /// Applied while `base` was shared, not yet folded in: a key's new
    /// value, or `None` if it was deleted. Empty in the common case.
    changes: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Number of keys (base and changes together).
    len: usize,
    /// Every record with LSN <= this is applied, none above it.
    applied_lsn: u64,
    /// Term of the record at `applied_lsn`.
    applied_term: u64,
    digest: Digest,
}

/// A consistent state for a snapshot, taken without copying the entries.
#[derive(Debug)]
pub struct Frozen {
    /// The entries; while this is alive, the live map leaves them alone.
    pub map: Arc<Entries>,
    pub lsn: u64,
    pub term: u64,
    pub digest: u64,
}

impl MapState {
    /// A state loaded from a snapshot (`digest` already verified).
    pub fn from_snapshot(map: Entries, lsn: u64, term: u64, digest: u64) -> Self {
        MapState {
            len: map.len(),
            base: Arc::new(map),
            changes: HashMap::new(),
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
        self.fold();
        let (key, value) = match op {
            Op::Put { key, value } => (key, Some(value)),
            Op::Delete { key } => (key, None),
        };
        let put = value.is_some();
        match Arc::get_mut(&mut self.base).filter(|_| self.changes.is_empty()) {
            // The common case: nobody shares the base, nothing to fold.
            Some(base) => {
                let old = match value {
                    Some(value) => {
                        self.digest.add(entry_hash(&key, &value));
                        // One lookup, whether the key is new or not.
                        match base.entry(key) {
                            Entry::Occupied(mut e) => {
                                let old = std::mem::replace(e.get_mut(), value);
                                Some(entry_hash(e.key(), &old))
                            }
                            Entry::Vacant(e) => {
                                e.insert(value);
                                None
                            }
                        }
                    }
                    None => base.remove_entry(&key).map(|(k, old)| entry_hash(&k, &old)),
                };
                self.account(old, put);
            }
            // A snapshot holds the base: record the change on top of it.
            None => {
                let old = self.get(&key).map(|old| entry_hash(&key, old));
                if let Some(value) = &value {
                    self.digest.add(entry_hash(&key, value));
                }
                if put || old.is_some() {
                    self.changes.insert(key, value);
                }
                self.account(old, put);
            }
        }
        self.applied_lsn = lsn;
        self.applied_term = term;
    }

    /// Updates the digest and the key count for one applied change: `old`
    /// is the hash of the entry it replaced or removed, and `put` whether it
    /// was a put (whose own hash is already added).
    fn account(&mut self, old: Option<u64>, put: bool) {
        match old {
            Some(hash) => {
                self.digest.remove(hash);
                if !put {
                    self.len -= 1;
                }
            }
            None if put => self.len += 1,
            None => {}
        }
    }

    /// Folds the overlay back into the base, if no snapshot shares it any
    /// more (O(overlay): the writes applied while one snapshot encoded).
    fn fold(&mut self) {
        if self.changes.is_empty() {
            return;
        }
        let Some(base) = Arc::get_mut(&mut self.base) else {
            return;
        };
        for (key, value) in self.changes.drain() {
            match value {
                Some(value) => {
                    base.insert(key, value);
                }
                None => {
                    base.remove(&key);
                }
            }
        }
    }

    /// This state, for a snapshot: O(1) unless an overlay from the last
    /// snapshot is still to be folded back (then O(its size)). Applies
    /// carry on while the returned reference lives. At most one may live at
    /// a time: the last one must be dropped first.
    pub fn freeze(&mut self) -> Frozen {
        self.fold();
        assert!(
            self.changes.is_empty(),
            "one frozen state at a time (snapshots hold the engine's snapshot lock)"
        );
        debug_assert_eq!(self.base.len(), self.len, "key count matches the entries");
        Frozen {
            map: self.base.clone(),
            lsn: self.applied_lsn,
            term: self.applied_term,
            digest: self.digest.value(),
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Vec<u8>> {
        match self.changes.get(key) {
            Some(changed) => changed.as_ref(),
            None => self.base.get(key),
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if there are no keys.
    pub fn is_empty(&self) -> bool {
        self.len == 0
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
        for (k, v) in self.iter() {
            d.add(entry_hash(k, v));
        }
        d.value()
    }

    /// Every entry (the overlay over the base), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Vec<u8>, &Vec<u8>)> {
        let changes = &self.changes;
        let unchanged = self
            .base
            .iter()
            .filter(move |(k, _)| !changes.contains_key(*k));
        let changed = changes
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)));
        unchanged.chain(changed)
    }
}

/// `entries` sorted by key, as a snapshot stores them.
pub fn sorted(entries: &Entries) -> Vec<(&Vec<u8>, &Vec<u8>)> {
    let mut sorted: Vec<_> = entries.iter().collect();
    sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
    sorted
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

    /// Random puts and deletes with snapshots frozen and released at random
    /// points, against a plain map: reads, the key count, the digest and the
    /// iteration order always match it, and a frozen state stays exactly the
    /// state it was taken at while applies go on.
    #[test]
    fn applies_while_frozen_match_a_plain_map() {
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        type Map = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;
        let mut state = MapState::default();
        let mut model = Map::new();
        let mut frozen: Option<(Frozen, Map)> = None;
        let mut frozen_count = 0;
        for lsn in 1..=20_000u64 {
            let key = format!("k{:02}", next(40)).into_bytes();
            if next(4) == 0 {
                model.remove(&key);
                state.apply(lsn, 1, Op::Delete { key });
            } else {
                let value = format!("v{lsn}").into_bytes();
                model.insert(key.clone(), value.clone());
                state.apply(lsn, 1, Op::Put { key, value });
            }
            match next(100) {
                0..=1 if frozen.is_none() => {
                    frozen = Some((state.freeze(), model.clone()));
                    frozen_count += 1;
                }
                2..=4 => frozen = None,
                _ => {}
            }
            if let Some((f, at)) = &frozen {
                let frozen_entries: Map =
                    f.map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                assert_eq!(frozen_entries, *at, "a frozen state does not change");
                let mut d = Digest::default();
                for (k, v) in at {
                    d.add(entry_hash(k, v));
                }
                assert_eq!(f.digest, d.value());
            }
            assert_eq!(state.len(), model.len(), "LSN {lsn}");
            for k in 0..40 {
                let key = format!("k{k:02}").into_bytes();
                assert_eq!(state.get(&key), model.get(&key), "LSN {lsn}");
            }
            let mut merged: Vec<_> = state.iter().collect();
            merged.sort_unstable();
            assert_eq!(merged, model.iter().collect::<Vec<_>>(), "LSN {lsn}");
            assert_eq!(state.digest(), state.digest_full(), "LSN {lsn}");
        }
        assert!(frozen_count > 50, "the test froze often: {frozen_count}");
        // Released for good: the next apply folds the overlay back.
        drop(frozen);
        state.apply(20_001, 1, put("k00", "last"));
        assert!(state.changes.is_empty(), "the overlay was folded back");
        assert_eq!(state.len(), state.base.len());
    }

    #[test]
    #[should_panic(expected = "LSN order")]
    fn applying_out_of_order_is_a_bug() {
        let mut s = MapState::default();
        s.apply(2, 0, put("x", "1"));
    }
}
