//! The fixes that came with the durability protocol (docs/DURABILITY.md), on real mounts:
//! readdir offsets that survive concurrent creates and unlinks, read-only mounts that
//! write nothing, O_APPEND handles whose mmap write-back lands where the pages are.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use common::mount::*;

/// `ls` of a directory that changes under it: every entry that exists throughout is
/// returned exactly once (offsets are cookies, not positions).
#[test]
fn readdir_with_concurrent_creates_and_unlinks_returns_each_stable_entry_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let big = mnt.join("big");
    fs::create_dir(&big).expect("mkdir");
    let stable: BTreeSet<String> = (0..3000).map(|i| format!("stable-{i:05}")).collect();
    let victims: Vec<String> = (0..600).map(|i| format!("victim-{i:05}")).collect();
    for n in stable.iter().chain(victims.iter()) {
        fs::File::create(big.join(n)).expect("create");
    }
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    let mut created = 0;
    let mut removed = 0;
    // std's ReadDir reads in getdents batches; change the directory between entries.
    for (i, e) in fs::read_dir(&big).expect("read_dir").enumerate() {
        let name = e.expect("entry").file_name().to_string_lossy().into_owned();
        *seen.entry(name).or_default() += 1;
        if i % 50 == 0 {
            for _ in 0..5 {
                if removed < victims.len() {
                    fs::remove_file(big.join(&victims[removed])).expect("unlink");
                    removed += 1;
                }
                fs::File::create(big.join(format!("new-{created:05}"))).expect("create");
                created += 1;
            }
        }
    }
    for n in &stable {
        assert_eq!(
            seen.get(n).copied().unwrap_or(0),
            1,
            "{n} existed throughout and was returned {} times",
            seen.get(n).copied().unwrap_or(0)
        );
    }
    assert!(
        seen.values().all(|&c| c == 1),
        "an entry was returned twice"
    );
    assert!(
        removed > 100 && created > 100,
        "the directory did not change enough"
    );
    d.unmount();
}

/// Every file of a tree with its content hash and mode (the index's files included).
fn snapshot(root: &Path) -> BTreeMap<String, (u32, blake3::Hash)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in fs::read_dir(&p).expect("read_dir").flatten() {
            let path = e.path();
            let meta = fs::symlink_metadata(&path).expect("stat");
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            if meta.is_dir() {
                stack.push(path);
                out.insert(rel, (meta.permissions().mode(), blake3::hash(b"")));
            } else {
                let data = fs::read(&path).expect("read");
                out.insert(rel, (meta.permissions().mode(), blake3::hash(&data)));
            }
        }
    }
    out
}

/// `-o ro` after an unclean stop: no recovery sweep, no migration, nothing written to
/// blobs/, cache/, index.fjall/ or lost+found/.
#[test]
fn a_read_only_mount_changes_nothing_in_the_backing_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    fs::create_dir(mnt.join("sub")).expect("mkdir");
    for i in 0..20 {
        write_synced(
            &mnt.join(format!("sub/f{i}")),
            format!("file {i}\n").as_bytes(),
        );
    }
    // Work for a recovery: an open, unlinked file and unsynced writes, then kill -9.
    let open = fs::File::open(mnt.join("sub/f0")).expect("open");
    fs::remove_file(mnt.join("sub/f0")).expect("unlink");
    fs::write(mnt.join("sub/f1"), b"rewritten, never synced\n").expect("write");
    d.kill9();
    drop(open);
    let before = snapshot(&backing);
    let d = Daemon::start(&backing, &mnt, "ro,idle=3600");
    let names: BTreeSet<String> = fs::read_dir(mnt.join("sub"))
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains("f2") && !names.contains("f0"), "{names:?}");
    assert_eq!(fs::read(mnt.join("sub/f2")).expect("read"), b"file 2\n");
    assert!(
        fs::write(mnt.join("sub/f3"), b"x").is_err(),
        "a read-only mount took a write"
    );
    d.unmount();
    let after = snapshot(&backing);
    let changed: Vec<&String> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(v))
        .map(|(k, _)| k)
        .chain(after.keys().filter(|k| !before.contains_key(*k)))
        .filter(|k| !k.ends_with(".daemon.log"))
        .collect();
    assert!(
        changed.is_empty(),
        "the read-only mount changed {changed:?}"
    );
    // The same volume on read-only media (a read-only bind mount): it mounts and reads.
    let view = dir.path().join("ro-view");
    fs::create_dir(&view).expect("view dir");
    let bind = RoBind::new(&backing, &view);
    let mnt2 = dir.path().join("mnt2");
    let d = Daemon::start(&view, &mnt2, "ro,idle=3600");
    let pid = d.child.id();
    assert_eq!(fs::read(mnt2.join("sub/f2")).expect("read"), b"file 2\n");
    // A read-write daemon cannot open the volume while the read-only one holds it.
    fs::create_dir(dir.path().join("mnt3")).expect("mnt3");
    let refused = std::process::Command::new(BIN)
        .arg(&backing)
        .arg(dir.path().join("mnt3"))
        .arg("-f")
        .output()
        .expect("run nacrithfs");
    assert!(
        !refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("in use"),
        "a read-write mount beside a read-only one: {refused:?}"
    );
    d.unmount();
    drop(bind);
    assert_eq!(
        snapshot(&backing),
        after,
        "the read-only media mount changed files"
    );
    let leftovers: Vec<_> = fs::read_dir(std::env::temp_dir())
        .expect("tmp")
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&format!("nacrithfs-ro-{pid}-"))
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "the read-only mount left its private directory: {leftovers:?}"
    );
    // A read-write mount then recovers as usual.
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    assert!(!mnt.join("sub/f0").exists());
    d.unmount();
}

/// A read-only bind mount of a directory, undone on drop.
struct RoBind(PathBuf);

impl RoBind {
    fn new(src: &Path, view: &Path) -> RoBind {
        let run = |args: &[&str]| {
            let st = std::process::Command::new("mount")
                .args(args)
                .status()
                .expect("run mount");
            assert!(st.success(), "mount {args:?} failed");
        };
        let (s, v) = (src.to_string_lossy(), view.to_string_lossy());
        run(&["--bind", &s, &v]);
        let bind = RoBind(view.to_path_buf());
        run(&["-o", "remount,bind,ro", &v]);
        bind
    }
}

impl Drop for RoBind {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Page-cache write-back through an `O_RDWR|O_APPEND` handle (a write to a shared
/// mapping) lands where the pages are, not at the end of the file.
#[test]
fn mmap_write_back_through_an_append_handle_lands_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let path = mnt.join("log.txt");
    fs::write(&path, vec![b'a'; 8192]).expect("write");
    let mut f = OpenOptions::new()
        .read(true)
        .append(true)
        .custom_flags(0)
        .open(&path)
        .expect("open O_RDWR|O_APPEND");
    use std::os::fd::AsRawFd;
    // SAFETY: a shared mapping of an open file, unmapped below; 8192 bytes exist.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        std::ptr::copy_nonoverlapping(b"HEAD".as_ptr(), p as *mut u8, 4);
        assert_eq!(libc::msync(p, 8192, libc::MS_SYNC), 0);
        libc::munmap(p, 8192);
    }
    // And an ordinary append through the same handle goes to the end.
    f.write_all(b"TAIL").expect("append");
    drop(f);
    d.unmount();
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let data = fs::read(&path).expect("read");
    assert_eq!(data.len(), 8196, "the write-back was appended");
    assert_eq!(&data[..4], b"HEAD");
    assert_eq!(&data[4..8192], &vec![b'a'; 8188][..]);
    assert_eq!(&data[8192..], b"TAIL");
    d.unmount();
}
