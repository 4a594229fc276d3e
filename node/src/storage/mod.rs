//! The one narrow seam between the engine and the disk.
//!
//! Every byte the engine reads or writes goes through [`Storage`] and
//! [`StorageFile`]. There are two implementations:
//! - [`FsStorage`]: real files, real `fdatasync`, real directory `fsync`;
//! - [`SimStorage`]: an in-memory disk that keeps *written* and *durable*
//!   apart (per file and per directory entry), so a simulated crash keeps only
//!   what a power loss would keep.
//!
//! This module does not know about records, segments or snapshots; it moves
//! bytes. It also does not retry anything: an error is reported as-is and the
//! caller decides (the engine treats a failed write or sync as fatal).
//!
//! # Contract (checked by `node/tests/storage_contract.rs` against both)
//! - `write_at` hands bytes to the OS: they survive a process crash, not a
//!   power loss. `sync_data` returns only when every byte written to the file
//!   before it is durable. A file's *name* (creation, rename, removal) is
//!   durable only after `sync_dir` of its directory returned.
//! - `read_at` reads exactly `buf.len()` bytes or fails with
//!   `UnexpectedEof`; it sees every byte written so far, durable or not.
//! - `set_len` changes the length now; it is durable after `sync_data`.
//! - A handle keeps reading its file after the name is removed (POSIX
//!   unlink semantics): a snapshot being sent outlives its cleanup. A crash
//!   ends every handle.
//! - An error means the operation may have happened partly or not at all.

mod fs;
mod sim;

use std::any::Any;
use std::io;
use std::path::Path;

pub use fs::FsStorage;
pub use sim::{SimOptions, SimStorage};

/// An open file: positional reads and writes, so a flusher can write and sync
/// while other threads keep appending to the in-memory log buffer.
#[allow(clippy::len_without_is_empty)] // a file's emptiness is never asked
pub trait StorageFile: Send + Sync {
    /// Current length in bytes (written, not necessarily durable).
    fn len(&self) -> io::Result<u64>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`: everything written to this file so far becomes durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// A directory tree of files. Paths are plain `Path`s; implementations decide
/// what they mean.
pub trait Storage: Send + Sync {
    /// Creates `dir` and its parents if missing (durability of the new
    /// directory entries is the caller's concern: see `sync_dir`).
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The names of the regular files in `dir`, sorted.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates a new empty file (truncating one that exists), read-write.
    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>>;
    /// Opens an existing file read-write.
    fn open(&self, path: &Path) -> io::Result<Box<dyn StorageFile>>;
    /// Renames `from` to `to`, replacing `to`. Durable after `sync_dir`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file. Durable after `sync_dir`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// `fsync` of the directory: creations, renames and removals in it so far
    /// become durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on the directory so two processes never open
    /// one data directory. The lock lasts as long as the returned guard.
    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn Any + Send + Sync>>;

    /// Reads a whole file.
    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let file = self.open(path)?;
        let len = usize::try_from(file.len()?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large"))?;
        let mut buf = vec![0u8; len];
        file.read_at(&mut buf, 0)?;
        Ok(buf)
    }
}

impl std::fmt::Debug for dyn StorageFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageFile")
    }
}
