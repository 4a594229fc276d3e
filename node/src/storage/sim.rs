//! [`SimStorage`]: an in-memory disk that forgets what was never synced.
//!
//! The model follows POSIX as a careful engine must assume it:
//! - a file (inode) has *written* bytes and *durable* bytes; `sync_data` makes
//!   the written bytes durable;
//! - a directory has *live* entries and *durable* entries; creating, renaming
//!   or removing a name changes the live entries, `sync_dir` makes them
//!   durable;
//! - [`SimStorage::crash`] is a power loss: every directory keeps only its
//!   durable entries and every file only its durable bytes, optionally plus a
//!   prefix of its unsynced tail torn at a 512-byte sector boundary.
//!
//! Faults are injected on purpose: [`SimStorage::fail_after_ops`] makes every
//! operation after the n-th fail (so a test can stop the engine at each step of
//! a protocol and then call `crash`), and [`SimStorage::fail_next_sync`] /
//! [`SimStorage::fail_next_write`] return one I/O error.
//!
//! Directories themselves are modelled as always durable (the engine creates
//! its data directory once, at start); only file names inside them are not.
//! Handles opened before a crash are dead afterwards: every call fails.
//! Everything is deterministic for a given seed; no clock, no OS threads.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Storage, StorageFile};

/// Size of the unit a torn write keeps or loses.
const SECTOR_BYTES: usize = 512;

/// Knobs for a simulated disk.
#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    /// Seed for the choices a crash makes (how much of an unsynced tail survives).
    pub seed: u64,
    /// If true, a crash keeps a random sector-aligned prefix of each file's
    /// unsynced tail (sometimes with its last data byte damaged, as a sector
    /// caught mid-write); if false it keeps exactly the durable bytes.
    pub torn_tails: bool,
    /// If true, each unsynced change to a directory entry (a create, a
    /// removal, either side of a rename) survives a crash or not on its
    /// own; if false a crash keeps exactly the synced entries.
    pub independent_names: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            seed: 1,
            torn_tails: true,
            independent_names: false,
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Inode {
    written: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Debug, Default, Clone)]
struct Dir {
    live: BTreeMap<String, u64>,
    durable: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct State {
    options: SimOptions,
    rng: u64,
    /// Bumped by every crash; handles from an older epoch are dead.
    epoch: u64,
    inodes: HashMap<u64, Inode>,
    dirs: BTreeMap<PathBuf, Dir>,
    inode_next: u64,
    ops: u64,
    fail_after_ops: Option<u64>,
    /// Armed crash point: once a rename to a name with this prefix
    /// succeeds, the disk stops after that many more operations (`None`:
    /// at the next directory sync, before it takes effect).
    stop_after_rename: Option<(String, Option<u64>)>,
    /// The disk stops at the next directory sync (armed by the above).
    stop_at_dir_sync: bool,
    /// An operation failed because the disk had stopped.
    stopped: bool,
    fail_next_sync: bool,
    fail_next_write: bool,
    syncs: u64,
}

/// A simulated disk shared by every handle cloned from it.
#[derive(Debug, Clone)]
pub struct SimStorage {
    state: Arc<Mutex<State>>,
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("simulated I/O error: {what}"))
}

fn split(path: &Path) -> io::Result<(PathBuf, String)> {
    let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    Ok((parent, name.to_owned()))
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl State {
    /// Counts one operation and fails it if the injected crash point passed.
    fn tick(&mut self) -> io::Result<()> {
        self.ops += 1;
        match self.fail_after_ops {
            Some(limit) if self.ops > limit => {
                self.stopped = true;
                Err(injected("disk stopped (crash point)"))
            }
            _ => Ok(()),
        }
    }

    fn dir_mut(&mut self, dir: &Path) -> io::Result<&mut Dir> {
        self.dirs.get_mut(dir).ok_or_else(|| not_found(dir))
    }

    fn lookup(&self, path: &Path) -> io::Result<u64> {
        let (parent, name) = split(path)?;
        self.dirs
            .get(&parent)
            .and_then(|d| d.live.get(&name))
            .copied()
            .ok_or_else(|| not_found(path))
    }
}

impl SimStorage {
    /// A new, empty disk.
    pub fn new(options: SimOptions) -> Self {
        SimStorage {
            state: Arc::new(Mutex::new(State {
                options,
                rng: options.seed,
                epoch: 0,
                inodes: HashMap::new(),
                dirs: BTreeMap::new(),
                inode_next: 1,
                ops: 0,
                fail_after_ops: None,
                stop_after_rename: None,
                stop_at_dir_sync: false,
                stopped: false,
                fail_next_sync: false,
                fail_next_write: false,
                syncs: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a test thread panicked while holding it; the
        // state is still a consistent value, so keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Power loss: keep only durable names and durable bytes (plus, with
    /// `torn_tails`, a sector-aligned prefix of each unsynced tail). Handles
    /// opened before are dead afterwards. Clears every injected fault.
    pub fn crash(&self) {
        let mut st = self.lock();
        let st = &mut *st;
        st.epoch += 1;
        st.fail_after_ops = None;
        st.stop_after_rename = None;
        st.stop_at_dir_sync = false;
        st.stopped = false;
        st.fail_next_sync = false;
        st.fail_next_write = false;
        let mut referenced = Vec::new();
        let independent = st.options.independent_names;
        for dir in st.dirs.values_mut() {
            let mut survived = dir.durable.clone();
            if independent {
                let names: Vec<String> =
                    dir.live.keys().chain(dir.durable.keys()).cloned().collect();
                for name in names {
                    let live = dir.live.get(&name).copied();
                    if live != dir.durable.get(&name).copied()
                        && splitmix64(&mut st.rng).is_multiple_of(2)
                    {
                        match live {
                            Some(id) => survived.insert(name, id),
                            None => survived.remove(&name),
                        };
                    }
                }
            }
            dir.live = survived.clone();
            dir.durable = survived;
            referenced.extend(dir.live.values().copied());
        }
        st.inodes.retain(|id, _| referenced.contains(id));
        let mut ids: Vec<u64> = st.inodes.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let keep_extra = if st.options.torn_tails {
                let roll = splitmix64(&mut st.rng);
                Some(roll)
            } else {
                None
            };
            let Some(inode) = st.inodes.get_mut(&id) else {
                continue;
            };
            let survived = match keep_extra {
                Some(roll) => torn(&inode.durable, &inode.written, roll),
                None => inode.durable.clone(),
            };
            inode.written = survived.clone();
            inode.durable = survived;
        }
    }

    /// Makes every operation after the next `n` fail, as if the machine
    /// stopped there. Follow with [`SimStorage::crash`].
    pub fn fail_after_ops(&self, n: u64) {
        let mut st = self.lock();
        st.fail_after_ops = Some(st.ops + n);
    }

    /// Arms a crash point at a dangerous moment: after the next rename to
    /// a name starting with `prefix` (say, a snapshot put into place), the
    /// disk stops after `n` more operations. See [`SimStorage::stopped`].
    pub fn stop_after_rename(&self, prefix: &str, n: u64) {
        self.lock().stop_after_rename = Some((prefix.to_owned(), Some(n)));
    }

    /// Arms a crash point: after the next rename to a name starting with
    /// `prefix`, the disk stops at the first directory sync (which fails
    /// and takes no effect), so whatever the rename and the operations
    /// after it changed in directories is still unsynced when the power
    /// goes. See [`SimStorage::stopped`].
    pub fn stop_at_dir_sync_after_rename(&self, prefix: &str) {
        self.lock().stop_after_rename = Some((prefix.to_owned(), None));
    }

    /// True once an operation failed because the disk had stopped (a
    /// crash point was reached): the machine should now lose power.
    pub fn stopped(&self) -> bool {
        self.lock().stopped
    }

    /// Drops every injected fault not yet triggered.
    pub fn clear_faults(&self) {
        let mut st = self.lock();
        st.fail_after_ops = None;
        st.stop_after_rename = None;
        st.stop_at_dir_sync = false;
        st.stopped = false;
        st.fail_next_sync = false;
        st.fail_next_write = false;
    }

    /// Operations counted so far (each trait call is one).
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// The next `sync_data` fails with an I/O error (and syncs nothing).
    pub fn fail_next_sync(&self) {
        self.lock().fail_next_sync = true;
    }

    /// The next `write_at` fails with an I/O error (and writes nothing).
    pub fn fail_next_write(&self) {
        self.lock().fail_next_write = true;
    }

    /// Number of successful `sync_data` calls so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// The written bytes of a file (for tests that damage files on purpose).
    pub fn file_bytes(&self, path: &Path) -> io::Result<Vec<u8>> {
        let st = self.lock();
        let id = st.lookup(path)?;
        Ok(st
            .inodes
            .get(&id)
            .map(|i| i.written.clone())
            .unwrap_or_default())
    }

    /// Replaces a file's bytes, written *and* durable (a test's "the disk now
    /// holds this").
    pub fn set_file_bytes(&self, path: &Path, bytes: Vec<u8>) -> io::Result<()> {
        let mut st = self.lock();
        let id = st.lookup(path)?;
        if let Some(inode) = st.inodes.get_mut(&id) {
            inode.durable = bytes.clone();
            inode.written = bytes;
        }
        Ok(())
    }
}

/// What a power loss leaves of a file whose durable bytes are `durable` and
/// whose written bytes are `written`: the durable bytes with a prefix of the
/// unsynced changes applied, cut at a sector boundary (`roll` picks how many
/// sectors). An unsynced shrink is either wholly lost or wholly kept.
fn torn(durable: &[u8], written: &[u8], roll: u64) -> Vec<u8> {
    let common = durable.len().min(written.len());
    let first_diff = (0..common)
        .find(|&i| durable[i] != written[i])
        .unwrap_or(common);
    if written.len() < durable.len() && first_diff == common {
        return if roll.is_multiple_of(2) {
            durable.to_vec()
        } else {
            written.to_vec()
        };
    }
    if first_diff == written.len() {
        return durable.to_vec();
    }
    let start = first_diff / SECTOR_BYTES * SECTOR_BYTES;
    // The cut is uniform over the sectors that hold data (a preallocated
    // run of zeros behind the records must not make losing them rare);
    // when every data sector survives, the zeros behind may too.
    let data_end = written[start..]
        .iter()
        .rposition(|b| *b != 0)
        .map_or(start, |i| start + i + 1);
    let data_sectors = (data_end - start).div_ceil(SECTOR_BYTES);
    let keep_sectors = (roll % (data_sectors as u64 + 1)) as usize;
    let end = if keep_sectors == data_sectors && (roll >> 32) % 2 == 1 {
        written.len()
    } else {
        (start + keep_sectors * SECTOR_BYTES).min(written.len())
    };
    let mut out = durable.to_vec();
    if out.len() < end {
        out.resize(end, 0);
    }
    out[start..end].copy_from_slice(&written[start..end]);
    // A sector caught mid-write: sometimes the last byte written is wrong
    // (a reader must notice by its checksum, and cut there).
    // Only a byte that was never synced may be damaged: the last non-zero
    // one the unsynced write put there.
    if keep_sectors > 0
        && (roll >> 40) % 2 == 1
        && let Some(i) = (first_diff.min(end)..end)
            .rev()
            .find(|&i| out[i] != 0 && durable.get(i) != Some(&out[i]))
    {
        let b = &mut out[i];
        *b = if *b == 0x5a { 0xa5 } else { *b ^ 0x5a };
    }
    out
}

struct SimFile {
    storage: SimStorage,
    inode: u64,
    epoch: u64,
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut State, u64) -> io::Result<T>) -> io::Result<T> {
        let mut st = self.storage.lock();
        if st.epoch != self.epoch {
            return Err(injected("handle from before a crash"));
        }
        st.tick()?;
        f(&mut st, self.inode)
    }
}

fn inode_mut(st: &mut State, id: u64) -> io::Result<&mut Inode> {
    st.inodes
        .get_mut(&id)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "inode gone"))
}

impl StorageFile for SimFile {
    fn len(&self) -> io::Result<u64> {
        self.with(|st, id| Ok(inode_mut(st, id)?.written.len() as u64))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with(|st, id| {
            let inode = inode_mut(st, id)?;
            let start = usize::try_from(offset).map_err(|_| injected("offset"))?;
            let end = start
                .checked_add(buf.len())
                .ok_or_else(|| injected("offset"))?;
            let src = inode
                .written
                .get(start..end)
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end"))?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.with(|st, id| {
            if std::mem::take(&mut st.fail_next_write) {
                return Err(injected("write failed"));
            }
            let inode = inode_mut(st, id)?;
            let start = usize::try_from(offset).map_err(|_| injected("offset"))?;
            let end = start + buf.len();
            if inode.written.len() < end {
                inode.written.resize(end, 0);
            }
            inode.written[start..end].copy_from_slice(buf);
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(|st, id| {
            if std::mem::take(&mut st.fail_next_sync) {
                return Err(injected("fdatasync failed"));
            }
            st.syncs += 1;
            let inode = inode_mut(st, id)?;
            inode.durable = inode.written.clone();
            Ok(())
        })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with(|st, id| {
            let len = usize::try_from(len).map_err(|_| injected("length"))?;
            inode_mut(st, id)?.written.resize(len, 0);
            Ok(())
        })
    }
}

impl Storage for SimStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.tick()?;
        for ancestor in dir.ancestors() {
            if ancestor.as_os_str().is_empty() {
                continue;
            }
            st.dirs.entry(ancestor.to_path_buf()).or_default();
        }
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut st = self.lock();
        st.tick()?;
        Ok(st.dir_mut(dir)?.live.keys().cloned().collect())
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let (parent, name) = split(path)?;
        let mut st = self.lock();
        st.tick()?;
        let id = match st.dir_mut(&parent)?.live.get(&name).copied() {
            Some(id) => {
                inode_mut(&mut st, id)?.written.clear();
                id
            }
            None => {
                let id = st.inode_next;
                st.inode_next += 1;
                st.inodes.insert(id, Inode::default());
                st.dir_mut(&parent)?.live.insert(name, id);
                id
            }
        };
        Ok(Box::new(SimFile {
            storage: self.clone(),
            inode: id,
            epoch: st.epoch,
        }))
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let mut st = self.lock();
        st.tick()?;
        let id = st.lookup(path)?;
        Ok(Box::new(SimFile {
            storage: self.clone(),
            inode: id,
            epoch: st.epoch,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from_dir, from_name) = split(from)?;
        let (to_dir, to_name) = split(to)?;
        let mut st = self.lock();
        st.tick()?;
        let id = st
            .dir_mut(&from_dir)?
            .live
            .remove(&from_name)
            .ok_or_else(|| not_found(from))?;
        if st
            .stop_after_rename
            .as_ref()
            .is_some_and(|(prefix, _)| to_name.starts_with(prefix.as_str()))
            && let Some((_, n)) = st.stop_after_rename.take()
        {
            match n {
                Some(n) => st.fail_after_ops = Some(st.ops + n),
                None => st.stop_at_dir_sync = true,
            }
        }
        st.dir_mut(&to_dir)?.live.insert(to_name, id);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let (parent, name) = split(path)?;
        let mut st = self.lock();
        st.tick()?;
        st.dir_mut(&parent)?
            .live
            .remove(&name)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock();
        if std::mem::take(&mut st.stop_at_dir_sync) {
            st.fail_after_ops = Some(st.ops);
        }
        st.tick()?;
        let d = st.dir_mut(dir)?;
        d.durable = d.live.clone();
        Ok(())
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
        let mut st = self.lock();
        st.tick()?;
        st.dir_mut(dir)?;
        Ok(Box::new(()))
    }
}
