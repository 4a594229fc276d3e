//! The `Storage` contract, run against both implementations (real files in a
//! temporary directory, and the simulated disk), plus the simulated disk's
//! crash semantics: only durable names and bytes survive a power loss.

// Tests unwrap: a failed unwrap is a test failure with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use kv_node::storage::{FsStorage, SimOptions, SimStorage, Storage};

fn contract(storage: &dyn Storage, dir: &Path) {
    storage.create_dir_all(dir).unwrap();
    assert_eq!(storage.list_dir(dir).unwrap(), Vec::<String>::new());

    let a = dir.join("a");
    let f = storage.create(&a).unwrap();
    f.write_at(b"hello", 0).unwrap();
    f.write_at(b"world", 10).unwrap();
    assert_eq!(
        f.len().unwrap(),
        15,
        "writing past the end extends with zeros"
    );
    let mut buf = [0u8; 15];
    f.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"hello\0\0\0\0\0world");
    let mut past = [0u8; 4];
    let err = f.read_at(&mut past, 13).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    f.sync_data().unwrap();
    f.set_len(5).unwrap();
    assert_eq!(f.len().unwrap(), 5);
    drop(f);

    assert_eq!(storage.read_file(&a).unwrap(), b"hello");
    let again = storage.open(&a).unwrap();
    again.write_at(b"J", 0).unwrap();
    assert_eq!(storage.read_file(&a).unwrap(), b"Jello");

    // create truncates an existing file.
    storage.create(&a).unwrap().write_at(b"x", 0).unwrap();
    assert_eq!(storage.read_file(&a).unwrap(), b"x");

    let b = dir.join("b");
    storage.rename(&a, &b).unwrap();
    assert_eq!(storage.list_dir(dir).unwrap(), vec!["b".to_owned()]);
    assert_eq!(
        storage.open(&a).err().map(|e| e.kind()),
        Some(std::io::ErrorKind::NotFound)
    );
    storage.create(&dir.join("c")).unwrap();
    assert_eq!(
        storage.list_dir(dir).unwrap(),
        vec!["b".to_owned(), "c".to_owned()]
    );
    storage.remove_file(&b).unwrap();
    storage.sync_dir(dir).unwrap();
    assert_eq!(storage.list_dir(dir).unwrap(), vec!["c".to_owned()]);
    assert!(storage.remove_file(&b).is_err());

    let _guard = storage.lock_dir(dir).unwrap();
}

#[test]
fn real_files_keep_the_contract() {
    let tmp = tempfile::tempdir().unwrap();
    contract(&FsStorage, &tmp.path().join("data"));
}

#[test]
fn the_simulated_disk_keeps_the_contract() {
    contract(
        &SimStorage::new(SimOptions::default()),
        Path::new("/sim/data"),
    );
}

#[test]
fn real_directory_lock_is_exclusive() {
    let tmp = tempfile::tempdir().unwrap();
    let guard = FsStorage.lock_dir(tmp.path()).unwrap();
    let second = FsStorage.lock_dir(tmp.path());
    assert_eq!(
        second.err().map(|e| e.kind()),
        Some(std::io::ErrorKind::WouldBlock)
    );
    drop(guard);
    assert!(FsStorage.lock_dir(tmp.path()).is_ok());
}

fn exact() -> SimStorage {
    SimStorage::new(SimOptions {
        seed: 7,
        torn_tails: false,
        independent_names: false,
    })
}

fn path(name: &str) -> PathBuf {
    Path::new("/d").join(name)
}

#[test]
fn crash_keeps_only_durable_bytes() {
    let s = exact();
    s.create_dir_all(Path::new("/d")).unwrap();
    let f = s.create(&path("f")).unwrap();
    s.sync_dir(Path::new("/d")).unwrap();
    f.write_at(b"synced", 0).unwrap();
    f.sync_data().unwrap();
    f.write_at(b"-lost", 6).unwrap();
    s.crash();
    assert_eq!(s.read_file(&path("f")).unwrap(), b"synced");
    assert!(
        f.write_at(b"x", 0).is_err(),
        "handles from before a crash are dead"
    );
}

#[test]
fn a_new_file_needs_a_directory_sync() {
    let s = exact();
    s.create_dir_all(Path::new("/d")).unwrap();
    let f = s.create(&path("new")).unwrap();
    f.write_at(b"data", 0).unwrap();
    f.sync_data().unwrap();
    s.crash();
    assert!(
        s.open(&path("new")).is_err(),
        "the name was never made durable"
    );
}

#[test]
fn rename_and_remove_need_a_directory_sync() {
    let s = exact();
    s.create_dir_all(Path::new("/d")).unwrap();
    let f = s.create(&path("tmp")).unwrap();
    f.write_at(b"v1", 0).unwrap();
    f.sync_data().unwrap();
    s.sync_dir(Path::new("/d")).unwrap();
    s.rename(&path("tmp"), &path("final")).unwrap();
    s.crash();
    assert_eq!(s.list_dir(Path::new("/d")).unwrap(), vec!["tmp".to_owned()]);

    s.rename(&path("tmp"), &path("final")).unwrap();
    s.sync_dir(Path::new("/d")).unwrap();
    s.remove_file(&path("final")).unwrap();
    s.crash();
    assert_eq!(
        s.read_file(&path("final")).unwrap(),
        b"v1",
        "unsynced removal undone"
    );
}

#[test]
fn torn_tails_keep_a_sector_aligned_prefix_of_unsynced_bytes() {
    let mut seen = std::collections::BTreeSet::new();
    let mut damaged = 0;
    for seed in 0..64 {
        let s = SimStorage::new(SimOptions {
            seed,
            torn_tails: true,
            independent_names: false,
        });
        s.create_dir_all(Path::new("/d")).unwrap();
        let f = s.create(&path("f")).unwrap();
        s.sync_dir(Path::new("/d")).unwrap();
        f.write_at(&[1u8; 100], 0).unwrap();
        f.sync_data().unwrap();
        let tail: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8 + 2).collect();
        f.write_at(&tail, 100).unwrap();
        s.crash();
        let got = s.read_file(&path("f")).unwrap();
        assert_eq!(&got[..100], &[1u8; 100], "durable bytes always survive");
        let kept = got.len() - 100;
        assert!(
            kept == 0 || kept == 2000 || (100 + kept).is_multiple_of(512),
            "kept {kept}"
        );
        // A prefix of what was written; a partial prefix may have its last
        // byte damaged (a sector caught mid-write).
        let differs: Vec<usize> = (0..kept).filter(|&i| got[100 + i] != tail[i]).collect();
        assert!(
            differs.is_empty() || differs == [kept - 1],
            "kept {kept}, differing at {differs:?}"
        );
        damaged += usize::from(!differs.is_empty());
        seen.insert(kept);
    }
    assert!(seen.len() > 2, "crashes keep different amounts: {seen:?}");
    assert!(damaged > 0, "some torn tails end in a damaged byte");
}

#[test]
fn injected_faults_fail_once_and_change_nothing() {
    let s = exact();
    s.create_dir_all(Path::new("/d")).unwrap();
    let f = s.create(&path("f")).unwrap();
    s.fail_next_write();
    assert!(f.write_at(b"x", 0).is_err());
    assert_eq!(f.len().unwrap(), 0);
    f.write_at(b"x", 0).unwrap();
    s.fail_next_sync();
    assert!(f.sync_data().is_err());
    s.sync_dir(Path::new("/d")).unwrap();
    s.crash();
    assert_eq!(
        s.read_file(&path("f")).unwrap(),
        b"",
        "the failed sync made nothing durable"
    );

    s.fail_after_ops(2);
    let g = s.open(&path("f")).unwrap();
    g.write_at(b"y", 0).unwrap();
    assert!(
        g.sync_data().is_err(),
        "operations past the crash point fail"
    );
}

#[test]
fn unsynced_names_survive_a_crash_each_on_its_own() {
    // With `independent_names`, a create and a removal that were never
    // synced each survive or vanish independently of the other.
    let mut outcomes = std::collections::BTreeSet::new();
    for seed in 0..64 {
        let s = SimStorage::new(SimOptions {
            seed,
            torn_tails: false,
            independent_names: true,
        });
        let dir = Path::new("/d");
        s.create_dir_all(dir).unwrap();
        s.create(&path("old")).unwrap();
        s.sync_dir(dir).unwrap();
        s.create(&path("new")).unwrap();
        s.remove_file(&path("old")).unwrap();
        s.crash();
        let names = s.list_dir(dir).unwrap();
        outcomes.insert((
            names.contains(&"old".to_owned()),
            names.contains(&"new".to_owned()),
        ));
    }
    assert_eq!(
        outcomes.len(),
        4,
        "all four combinations occur: {outcomes:?}"
    );
}

/// A file removed while open stays readable through the handle (a leader
/// sends a snapshot that newer snapshots' cleanup removes meanwhile).
fn removed_file_stays_readable(storage: &dyn Storage, dir: &Path) {
    storage.create_dir_all(dir).unwrap();
    let p = dir.join("removed");
    storage
        .create(&p)
        .unwrap()
        .write_at(b"still here", 0)
        .unwrap();
    let handle = storage.open(&p).unwrap();
    storage.remove_file(&p).unwrap();
    storage.sync_dir(dir).unwrap();
    assert!(
        !storage
            .list_dir(dir)
            .unwrap()
            .contains(&"removed".to_owned())
    );
    assert_eq!(handle.len().unwrap(), 10);
    let mut buf = [0u8; 10];
    handle.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"still here");
}

#[test]
fn a_removed_file_stays_readable_through_an_open_handle() {
    let real = tempfile::tempdir().unwrap();
    removed_file_stays_readable(&FsStorage, &real.path().join("d"));
    removed_file_stays_readable(&exact(), Path::new("/d"));
}
