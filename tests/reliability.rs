//! Reliability on real mounts with the real model: the committed format fixture, fsck on
//! a deliberately broken backing directory, corrupt and truncated blobs, a missing model,
//! a full backing disk, kill -9 rounds, and concurrent stress. Longer versions of the last
//! two run from scripts/crash-test and scripts/stress.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mount::*;
use nacrithfs::store::{Store, Txn};

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
}

/// (path, sha256) from the fixture's manifest, written by scripts/make-format-fixture.
fn fixture_manifest(name: &str) -> Vec<(String, String)> {
    let path = format!(
        "{}/tests/fixtures/{name}.sha256",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(h, p)| (p.trim_start_matches("./").to_string(), h.to_string()))
        .collect()
}

fn sha256(path: &Path) -> Result<String, String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn check_manifest(mnt: &Path, manifest: &[(String, String)], skip: &[&str]) {
    for (name, hash) in manifest {
        if skip.contains(&name.as_str()) {
            continue;
        }
        let got = sha256(&mnt.join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"));
        assert_eq!(&got, hash, "{name}: content differs from the manifest");
    }
}

/// A fresh copy of the format fixture at DIR/backing; returns (backing, mnt).
///
/// The fixture's queue holds dirty.txt with the wall-clock due time it was given when the
/// fixture was made (an hour later). So that tests do not depend on today's date, the
/// copy's queue entries are moved far into the future; a mount then caps them at its own
/// `idle`, and dirty.txt stays dirty until a test flushes it.
fn fixture_copy(dir: &Path) -> (PathBuf, PathBuf) {
    fixture_copy_of(dir, "format-v1")
}

/// The same for the fixture of format `version`. Opening it moves its index to format 3.
fn fixture_copy_of(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let backing = dir.join("backing");
    copy_tree(&fixture_dir(name), &backing);
    make_private(&backing);
    let store = Store::open_existing(&backing).expect("open the fixture copy");
    let mut txn = Txn::default();
    let queue = store.queue().expect("fixture queue");
    assert!(!queue.is_empty(), "the fixture has a queued dirty file");
    for (ino, _) in queue {
        txn.enqueue(ino, u64::MAX / 2);
    }
    store.commit(txn, true).expect("requeue");
    drop(store);
    (backing, dir.join("mnt"))
}

fn read_err(path: &Path) -> std::io::Error {
    match fs::read(path) {
        Ok(d) => panic!(
            "{} read {} bytes; expected an error",
            path.display(),
            d.len()
        ),
        Err(e) => e,
    }
}

/// The fixtures of formats 1 and 2 (sled indexes), 3 (fjall, layout 5: packed blobs
/// with compact headers v2 beside a blob file), 4 (as 3, files in subdirectories of
/// 4096 inode numbers made on first use) and 4 at index layout 7 (inode records v2,
/// compact headers v3, 16-byte content hints, up entries; with a packed slot two files
/// share and a renamed directory), and 4 at index layout 8 (the same files, four of them
/// members of one solid group, one copy sharing a member's range): a read-only mount
/// reads them as they are and
/// changes nothing; the first read-write open moves a sled index to fjall (format 3,
/// flat for format 1), after which fsck --deep decodes every blob and a mount
/// reads every file byte-exact, with its xattrs, links, modes and states.
#[test]
fn format_fixtures_mount_and_read_byte_exact() {
    let _llm = common::llm_lock();
    for (name, version) in [
        ("format-v1", 1),
        ("format-v2", 2),
        ("format-v3", 3),
        ("format-v4", 4),
        ("format-v4-layout7", 4),
        ("format-v4-layout8", 4),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifest = fixture_manifest(name);
        // The fixtures made since layout 7 add an equal copy and a renamed directory.
        let newer = name.starts_with("format-v4-layout");
        let groups = name == "format-v4-layout8";
        assert_eq!(manifest.len(), if newer { 10 } else { 8 }, "{name}");

        let untouched = dir.path().join("untouched");
        copy_tree(&fixture_dir(name), &untouched);
        make_private(&untouched);
        let before = tree_listing(&untouched);
        let ro_mnt = dir.path().join("ro-mnt");
        let d = Daemon::start(&untouched, &ro_mnt, "ro,idle=3600");
        check_manifest(&ro_mnt, &manifest, &[]);
        d.unmount();
        assert_eq!(
            tree_listing(&untouched),
            before,
            "{name}: the read-only mount changed the backing directory"
        );
        // A check (no --repair) finds the old volume clean and changes nothing in it
        // either: no move to the current format, no index rebuild (asked for always).
        let (status, out) = fsck_env(&[], &untouched, &[("NACRITHFS_INDEX_REBUILD", "always")]);
        assert_eq!(
            status.code(),
            Some(0),
            "{name}: fsck of the untouched fixture:\n{out}"
        );
        assert_eq!(
            tree_listing(&untouched),
            before,
            "{name}: a check-only fsck changed the backing directory"
        );

        let (backing, mnt) = fixture_copy_of(dir.path(), name);
        let marker = fs::read_to_string(backing.join("nacrithfs.format")).expect("marker");
        let expected = match version {
            1 => "nacrithfs 3 flat\n",
            4 => "nacrithfs 4\n",
            _ => "nacrithfs 3\n",
        };
        assert_eq!(marker, expected, "{name}: marker after the move");
        assert!(
            !backing.join("index").exists(),
            "{name}: the sled index is still there"
        );
        // fsck --deep decodes every blob, the LLM ones through the model.
        let (code, out) = fsck(&["--deep"], &backing);
        println!("{name}: {out}");
        assert_eq!(code, 0, "fsck of the untouched fixture:\n{out}");
        // (A group is decoded once for its members.)
        let (blobs, decoded) = match (newer, groups) {
            (_, true) => (8, 4),
            (true, _) => (8, 8),
            _ => (6, 6),
        };
        assert!(
            out.contains(&format!("{blobs} blobs checked ({decoded} decoded")),
            "{out}"
        );
        if groups {
            let store = nacrithfs::store::Store::open_existing(&backing).expect("open");
            let members = store
                .raw_entries()
                .expect("read the index")
                .iter()
                .filter(|(k, _)| k[0] == b'i')
                .filter_map(|(_, v)| nacrithfs::store::Inode::decode(v).ok())
                .filter(|i| i.blob.is_some_and(|b| b.member.is_some()))
                .count();
            assert_eq!(members, 5, "{name}: members of solid groups in the index");
        }

        let d = Daemon::start(&backing, &mnt, "idle=3600");
        check_manifest(&mnt, &manifest, &[]);
        assert_eq!(
            xattr(&mnt.join("books/en/gpl-head.txt"), "user.comment"),
            format!("format fixture v{version}")
        );
        assert_eq!(
            fs::read_link(mnt.join("link-to-head")).expect("readlink"),
            Path::new("books/en/gpl-head.txt")
        );
        assert_eq!(
            fs::metadata(mnt.join("data/random.bin"))
                .expect("stat")
                .nlink(),
            2
        );
        let zeros = fs::metadata(mnt.join("data/zeros.bin")).expect("stat");
        assert_eq!(zeros.permissions().mode() & 0o777, 0o640);
        assert!(fs::metadata(mnt.join("empty-dir")).expect("stat").is_dir());
        assert_eq!(xattr(&mnt.join("dirty.txt"), "user.nacrith.state"), "dirty");
        assert_eq!(
            xattr(&mnt.join("books/en/gpl-head.txt"), "user.nacrith.state"),
            "compressed"
        );
        if newer {
            assert!(
                out.contains("2 files share their blob with an equal file"),
                "{name}: the equal copy does not share the packed slot:\n{out}"
            );
            // (The renamed directory's up entry is checked by the fsck runs above; the
            // kernel answers `..` from its own cache, so a stat of it would not be.)
        }
        if version >= 3 {
            // The fixture's content hints (index layout 5: the whole BLAKE3, naming a
            // blob) were rewritten by the move to layout 6: copies of a packed file and
            // of one with a blob file share those blobs instead of being coded again.
            let shared = status_field(&mnt, "shared_files");
            for file in ["gpl-head.txt", "gpl-tail.txt"] {
                let data = fs::read(mnt.join("books/en").join(file)).expect("read");
                fs::write(mnt.join(format!("copy-of-{file}")), &data).expect("write copy");
            }
            admin("flush", &mnt);
            assert_eq!(
                status_field(&mnt, "shared_files"),
                shared + 2,
                "{name}: the copies were coded again, not shared"
            );
            admin("evict", &mnt);
            for file in ["gpl-head.txt", "gpl-tail.txt"] {
                assert!(
                    fs::read(mnt.join(format!("copy-of-{file}"))).expect("read copy")
                        == fs::read(mnt.join("books/en").join(file)).expect("read"),
                    "{name}: copy of {file}"
                );
            }
        }
        d.unmount();
    }
}

/// A read-only mount keeps a decoded file in a private temp file until unmount. Reading
/// it again (each open drops the kernel's page cache) must be served from that copy; a
/// read-ahead hint once restarted the decode, truncating the copy under a reader, which
/// then read an empty file (seen as a flaky `format_fixtures_mount_and_read_byte_exact`).
#[test]
fn read_only_mount_serves_repeated_reads_of_a_decoded_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("backing");
    copy_tree(&fixture_dir("format-v2"), &backing);
    make_private(&backing);
    let mnt = dir.path().join("mnt");
    let d = Daemon::start(&backing, &mnt, "ro,idle=3600");
    let manifest = fixture_manifest("format-v2");
    let hash = |name: &str| {
        manifest
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, h)| h.clone())
            .unwrap_or_else(|| panic!("{name} is not in the manifest"))
    };
    let name = "data/random.bin";
    assert_eq!(sha256(&mnt.join(name)).expect("sha256"), hash(name));
    let expected = fs::read(mnt.join(name)).expect("read");
    for round in 0..300 {
        for name in ["data/random.bin", "data/random-hardlink.bin"] {
            let got = fs::read(mnt.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                got == expected,
                "round {round}: {name} read {} bytes, not the {} decoded",
                got.len(),
                expected.len()
            );
        }
    }
    d.unmount();
}

/// Every path under `dir` with its size and mtime, sorted.
fn tree_listing(dir: &Path) -> Vec<(PathBuf, u64, i64, i64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in fs::read_dir(&p).expect("read_dir").flatten() {
            let m = e.metadata().expect("metadata");
            if m.is_dir() {
                stack.push(e.path());
            }
            out.push((e.path(), m.len(), m.mtime(), m.mtime_nsec()));
        }
    }
    out.sort();
    out
}

/// Layout 1 did not fsync clean copies: after the upgrade, the first recovery checks
/// each against its blob (size, BLAKE3) and decodes the blob instead of serving a copy
/// a power cut left short or zero-filled.
#[test]
fn clean_copies_of_an_older_layout_are_checked_against_their_blobs() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = fixture_copy(dir.path());
    // Inode 7 is books/en/gpl-tail.txt, compressed with a clean copy: zero-fill it at
    // its size, as a power cut can.
    let plain = backing.join("cache/7");
    let len = fs::metadata(&plain).expect("clean copy").len();
    fs::write(&plain, vec![0u8; len as usize]).expect("zero-fill");
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let manifest = fixture_manifest("format-v1");
    check_manifest(&mnt, &manifest, &[]);
    let log = d.log_text();
    assert!(
        log.contains(
            "inode 7: its clean copy was never synced and does not match the blob's BLAKE3"
        ),
        "{log}"
    );
    assert!(log.contains("1 distrusted"), "{log}");
    d.unmount();
    // Checked once: the next mount trusts what it installed.
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    check_manifest(&mnt, &manifest, &[]);
    assert!(!d.log_text().contains("distrusted"), "{}", d.log_text());
    d.unmount();
}

/// The same check when the blob itself cannot be read (here: gone): the clean copy may
/// be the only readable content, so it is kept and served, and the log names fsck (it
/// used to be distrusted like a bad copy, and then swept away with the file's data).
#[test]
fn a_clean_copy_whose_blob_is_unreadable_is_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = fixture_copy(dir.path());
    // Inode 7 is books/en/gpl-tail.txt, compressed with a clean copy.
    fs::remove_file(backing.join("blobs/7-2.nc06")).expect("remove the blob");
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let log = d.log_text();
    assert!(
        log.contains("inode 7: its blob") && log.contains("its clean copy is kept, unchecked"),
        "{log}"
    );
    let want: Vec<_> = fixture_manifest("format-v1")
        .into_iter()
        .filter(|(p, _)| p == "books/en/gpl-tail.txt")
        .collect();
    assert_eq!(want.len(), 1, "the manifest names books/en/gpl-tail.txt");
    check_manifest(&mnt, &want, &[]);
    d.unmount();
    let copy = cache_file(&backing, 7);
    assert!(copy.exists(), "the clean copy {} was swept", copy.display());
}

#[test]
fn fsck_finds_and_repairs_every_planted_defect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = fixture_copy(dir.path());
    let blobs = backing.join("blobs");
    // Inode numbers of the fixture (scripts/make-format-fixture): 6 gpl-head.txt (LLM,
    // evicted), 7 gpl-tail.txt (LLM, clean cached copy), 9 random.bin (+ hard link),
    // 10 zeros.bin (evicted), 11 empty.
    {
        let store = Store::open_existing(&backing).expect("open fixture");
        let lookup = |path: &[&str]| {
            let mut ino = 1;
            for p in path {
                ino = store
                    .lookup(ino, p.as_bytes())
                    .expect("lookup")
                    .unwrap_or_else(|| panic!("fixture has no {p}"))
                    .0;
            }
            ino
        };
        assert_eq!(lookup(&["books", "en", "gpl-tail.txt"]), 7);
        assert_eq!(lookup(&["data", "zeros.bin"]), 10);
        assert_eq!(lookup(&["empty"]), 11);
        // dangling dirent: a name for an inode that does not exist
        let mut txn = Txn::default();
        store
            .put_name(&mut txn, 1, b"ghost", 500, nacrithfs::store::Kind::File)
            .expect("plant");
        // orphan inode: /empty loses its only name
        let (_, _, cookie) = store
            .lookup_full(1, b"empty")
            .expect("lookup")
            .expect("/empty exists");
        txn.del_dirent(1, b"empty", cookie);
        // an entry whose kind is not its inode's (the symlink listed as a file; its
        // cookie key agrees with the entry, so only the entry is at fault)
        let link = lookup(&["link-to-head"]);
        store
            .put_name(
                &mut txn,
                1,
                b"link-to-head",
                link,
                nacrithfs::store::Kind::File,
            )
            .expect("plant");
        // wrong link count
        let mut random = store.get(9).expect("get").expect("inode 9");
        random.nlink = 5;
        txn.put_inode(9, &random);
        // and on gpl-tail.txt, whose blob is corrupted below: two fixes of one record
        let mut tail = store.get(7).expect("get").expect("inode 7");
        tail.nlink = 3;
        txn.put_inode(7, &tail);
        // queue entry and xattr of an inode that does not exist
        txn.enqueue(400, 1);
        txn.put_xattr(400, b"user.stale", b"x");
        // an access ACL the kernel could not read (a version 2 header, a ragged entry)
        txn.put_xattr(9, b"system.posix_acl_access", b"\x02\0\0\0\x01\0\x07");
        // graveyard entries left by a crash (not problems): a superseded blob of
        // random.bin and the plaintext of a deleted inode
        txn.bury_blob(9, &nacrithfs::store::BlobRef::file(3, 0));
        txn.bury_cache(300);
        store.commit(txn, true).expect("plant index defects");
        // an entry whose readdir cookie key is gone (readdir would skip it), and a
        // cookie key that names no entry
        let books = store
            .dirent_cookie(1, b"books")
            .expect("cookie")
            .expect("the fixture got cookies when opened read-write");
        store
            .raw_remove(&Store::cookie_key(1, books))
            .expect("plant");
        store
            .raw_insert(&Store::cookie_key(1, 1), b"nobody")
            .expect("plant");
        // a directory without its up entry (`..` of it would fail)
        store
            .raw_remove(&Store::up_key(lookup(&["data"])))
            .expect("plant");
    }
    fs::copy(blobs.join("9-4.nc06"), blobs.join("9-3.nc06")).expect("superseded blob");
    fs::write(backing.join("cache/300"), b"deleted plaintext").expect("deleted plaintext");
    // The plaintext directory open to everyone.
    fs::set_permissions(backing.join("cache"), fs::Permissions::from_mode(0o755)).expect("chmod");
    // orphan blob (also above the blob counter), orphan cache file, leftover temp file
    fs::copy(blobs.join("9-4.nc06"), blobs.join("99-999.nc06")).expect("orphan blob");
    fs::write(backing.join("cache/77"), b"nobody's plaintext").expect("orphan cache");
    fs::write(backing.join("cache/7.tmp"), b"half").expect("temp");
    // missing blob of an evicted file: its content is gone
    fs::remove_file(blobs.join("10-5.nc06")).expect("remove blob");
    // corrupt header of a blob whose clean plaintext copy is still cached
    let mut tail = fs::read(blobs.join("7-2.nc06")).expect("read blob");
    tail[20] ^= 0xff;
    fs::write(blobs.join("7-2.nc06"), &tail).expect("corrupt blob");

    let expected = [
        "dangling-dirent",
        "orphan-inode",
        "link-count",
        "stale-queue",
        "stale-xattr",
        "orphan-blob",
        "orphan-cache",
        "leftover-temp",
        "counter",
        "missing-blob",
        "bad-blob",
        "missing-cookie",
        "stale-cookie",
        "loose-mode",
        "stale-parent",
        "bad-acl",
        "dirent-kind",
        "stale-up",
    ];
    let (code, out) = fsck(&[], &backing);
    println!("{out}");
    assert_eq!(code, 4, "problems found and not repaired:\n{out}");
    for code in expected {
        assert!(
            out.lines().any(|l| l.starts_with(code)),
            "fsck did not report {code}:\n{out}"
        );
    }
    // (The dangling entry's cookie key is stale too, and so is the up entry it
    // planted for the missing inode.)
    assert!(out.contains("20 problems, 0 repaired"), "{out}");
    assert!(
        out.contains("2 deleted or superseded files await removal"),
        "{out}"
    );
    assert!(!out.contains("9-3.nc06 is not referenced"), "{out}");

    let (code, out) = fsck(&["--repair"], &backing);
    println!("{out}");
    // The content of zeros.bin is gone (its only copy was the deleted blob): reported,
    // never "repaired" by inventing data.
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("20 problems, 19 repaired"), "{out}");
    assert!(
        out.contains("2 deleted or superseded files were removed"),
        "{out}"
    );
    assert!(!blobs.join("9-3.nc06").exists());
    assert!(!backing.join("cache/300").exists());
    assert!(blobs.join("9-4.nc06").is_file(), "the blob in use is kept");
    assert_eq!(
        fs::metadata(backing.join("cache"))
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777,
        0o700
    );
    let lf = backing.join("lost+found");
    assert!(lf.join("blobs-99-999.nc06").is_file(), "orphan blob kept");
    assert!(lf.join("blobs-7-2.nc06").is_file(), "bad blob kept");
    assert_eq!(
        fs::read(lf.join("cache-77")).expect("orphan cache kept"),
        b"nobody's plaintext"
    );

    let (code, out) = fsck(&[], &backing);
    println!("{out}");
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("1 problems, 0 repaired"), "{out}");
    assert!(out.contains("missing-blob"), "{out}");

    let _llm = common::llm_lock();
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let manifest = fixture_manifest("format-v1");
    check_manifest(&mnt, &manifest, &["data/zeros.bin", "empty"]);
    assert_eq!(
        read_err(&mnt.join("data/zeros.bin")).raw_os_error(),
        Some(libc::EIO)
    );
    let rescued = fs::read_dir(mnt.join("lost+found"))
        .expect("/lost+found")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert_eq!(rescued, vec!["#11".to_string()]);
    assert_eq!(fs::read(mnt.join("lost+found/#11")).expect("read"), b"");
    assert!(!mnt.join("ghost").exists());
    let listed: Vec<String> = fs::read_dir(&mnt)
        .expect("readdir /")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        listed.contains(&"books".to_string()),
        "readdir lists the entry whose cookie fsck restored: {listed:?}"
    );
    // (The entry holds the directory open: asked and dropped at once.)
    let link_is_symlink = fs::read_dir(&mnt)
        .expect("readdir /")
        .map(|e| e.expect("entry"))
        .find(|e| e.file_name() == "link-to-head")
        .map(|e| e.file_type().expect("d_type").is_symlink());
    assert_eq!(
        link_is_symlink,
        Some(true),
        "readdir gives the kind fsck restored"
    );
    assert_eq!(
        fs::metadata(mnt.join("data/random.bin"))
            .expect("stat")
            .nlink(),
        2
    );
    // The tail's plaintext is the truth again and compresses anew (fsck queued it due
    // now, so it may already be under way, or even done: the reads above decode the
    // other files with the same model, and the scripts/test run of 2026-12-05 07:06
    // found it compressed here).
    let tail = mnt.join("books/en/gpl-tail.txt");
    let state = xattr(&tail, "user.nacrith.state");
    assert!(
        ["dirty", "compressing", "compressed"].contains(&state.as_str()),
        "{state}"
    );
    admin("flush", &mnt);
    assert_eq!(xattr(&tail, "user.nacrith.state"), "compressed");
    assert!(
        status_field(&mnt, "compressed_since_mount") >= 1,
        "the tail was not compressed anew: {}",
        xattr(&mnt, "user.nacrith.status")
    );
    admin("evict", &mnt);
    check_manifest(&mnt, &manifest, &["data/zeros.bin", "empty"]);
    d.unmount();
}

/// Flip a byte or cut a blob of the fixture; reading that file gives EIO and one log line
/// naming it, the others read fine, the daemon stays up.
#[test]
fn corrupt_and_truncated_blobs_give_eio_and_one_log_line() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = fixture_copy(dir.path());
    let blobs = backing.join("blobs");
    // gpl-head.txt: LLM payload, last byte flipped (found by the chunk checksum after
    // decoding); zeros.bin: zstd blob cut short; random.bin: a payload byte flipped.
    let p = blobs.join("6-1.nc06");
    let mut b = fs::read(&p).expect("read");
    let last = b.len() - 1;
    b[last] ^= 0x5a;
    fs::write(&p, &b).expect("write");
    let p = blobs.join("10-5.nc06");
    let b = fs::read(&p).expect("read");
    fs::write(&p, &b[..b.len() - 10]).expect("truncate");
    let p = blobs.join("9-4.nc06");
    let mut b = fs::read(&p).expect("read");
    let mid = b.len() - 100;
    b[mid] ^= 1;
    fs::write(&p, &b).expect("write");

    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let bad = ["books/en/gpl-head.txt", "data/zeros.bin", "data/random.bin"];
    for name in bad {
        for _ in 0..3 {
            let e = read_err(&mnt.join(name));
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name}: {e}");
        }
    }
    let manifest = fixture_manifest("format-v1");
    check_manifest(
        &mnt,
        &manifest,
        &[bad[0], bad[1], bad[2], "data/random-hardlink.bin"],
    );
    // Still serving: writes and a new compression work.
    fs::write(mnt.join("after.txt"), b"the daemon is still up").expect("write");
    admin("flush", &mnt);
    let log = d.log_text();
    // One line per bad blob, naming the file (random.bin may be named by its hard link).
    for blob in ["6-1.nc06", "10-5.nc06", "9-4.nc06"] {
        let lines: Vec<_> = log
            .lines()
            .filter(|l| l.contains("ERROR") && l.contains("cannot read /") && l.contains(blob))
            .collect();
        assert_eq!(lines.len(), 1, "{blob}: expected one log line, got:\n{log}");
    }
    assert!(
        log.contains("cannot read /books/en/gpl-head.txt: "),
        "{log}"
    );
    assert!(log.contains("cannot read /data/zeros.bin: "), "{log}");
    println!(
        "{}",
        log.lines()
            .filter(|l| l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    d.unmount();
}

#[test]
fn missing_or_broken_model_at_runtime_keeps_files_plaintext_and_serving() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = fixture_copy(dir.path());
    let real = nacrithfs::model::find_model(None)
        .unwrap_or_else(|e| panic!("this test needs the real model: {e}"));
    let model = common::model_copy(dir.path());

    // The model is checked at mount, loaded on first use; it disappears in between.
    let d = Daemon::start(
        &backing,
        &mnt,
        &format!("idle=3600,model={}", model.display()),
    );
    fs::remove_file(&model).expect("remove model");
    let head = mnt.join("books/en/gpl-head.txt");
    assert_eq!(read_err(&head).raw_os_error(), Some(libc::EIO));
    // Blobs without LLM segments need no model.
    let manifest = fixture_manifest("format-v1");
    check_manifest(
        &mnt,
        &manifest,
        &[
            "books/en/gpl-head.txt",
            "books/en/gpl-tail.txt", // cached: readable, but keep the LLM ones apart
            "data/hybrid.dat",
        ],
    );
    let new = mnt.join("new.txt");
    let text = common::english(300);
    fs::write(&new, &text).expect("write");
    let out = admin_raw("flush", &mnt);
    assert!(!out.status.success(), "flush must report the failure");
    println!("{}", String::from_utf8_lossy(&out.stderr));
    for f in [&new, &mnt.join("dirty.txt")] {
        assert_eq!(xattr(f, "user.nacrith.state"), "dirty");
    }
    assert_eq!(fs::read(&new).expect("read"), text);

    // Present but not a GGUF: the same.
    fs::write(&model, b"this is not a model").expect("garbage model");
    assert!(!admin_raw("flush", &mnt).status.success());
    assert_eq!(xattr(&new, "user.nacrith.state"), "dirty");
    let log = d.log_text();
    println!(
        "{}",
        log.lines()
            .filter(|l| l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        log.contains("compressing /new.txt: the model is unavailable"),
        "{log}"
    );
    assert!(log.contains("cannot read /books/en/gpl-head.txt"), "{log}");

    // The model comes back: everything works without a remount.
    fs::copy(&real, &model).expect("restore model");
    check_manifest(&mnt, &manifest, &[]);
    admin("flush", &mnt);
    assert_eq!(xattr(&new, "user.nacrith.state"), "compressed");
    admin("evict", &mnt);
    assert_eq!(fs::read(&new).expect("read"), text);
    check_manifest(&mnt, &manifest, &[]);
    d.unmount();
}

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(path).expect("mkdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("mount tmpfs");
        assert!(
            out.status.success(),
            "this test needs a small tmpfs (as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Write 64 KiB blocks to `path` until the disk is full; returns (bytes written, error).
fn fill(path: &Path) -> (u64, std::io::Error) {
    fill_with(path, 64 << 10)
}

/// `fill` in writes of `block` bytes.
fn fill_with(path: &Path, block: usize) -> (u64, std::io::Error) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let block = common::random_bytes(block, 99);
    let mut n = 0u64;
    loop {
        if let Err(e) = f.write_all(&block).and_then(|_| f.sync_data()) {
            return (n, e);
        }
        n += block.len() as u64;
        assert!(n < 1 << 30, "the disk never filled");
    }
}

#[test]
fn full_backing_disk_gives_enospc_and_loses_nothing() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let small = dir.path().join("small");
    let _tmpfs = Tmpfs::mount(&small, "12m");
    let (backing, mnt) = fixture_copy(&small);
    let mnt = dir.path().join(mnt.file_name().expect("name"));
    let d = Daemon::start(&backing, &mnt, "idle=3600,reserve=3M");
    let manifest = fixture_manifest("format-v1");

    // statfs says what writes can use: the backing filesystem's free space less the
    // reserve (a program that fills "free" space gets no early ENOSPC).
    let avail = |p: &Path| {
        let s = nix_statvfs(p);
        s.f_bavail * s.f_frsize
    };
    let (through, beside) = (avail(&mnt), avail(&small));
    // (The two calls are not atomic: a log line or index write may fall between them.)
    assert!(
        through.abs_diff(beside.saturating_sub(3 << 20)) <= 64 << 10,
        "statfs through the mount: {through} bytes available; the disk: {beside}"
    );

    // Writes through the mount stop at the reserve with ENOSPC.
    File::create(mnt.join("fill-tail")).expect("create fill-tail");
    let (written, e) = fill(&mnt.join("fill"));
    println!("wrote {written} bytes through the mount, then: {e}");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    assert!(written > 4 << 20, "only {written} bytes fit");
    // So do new names and xattrs: index bytes are disk bytes too, and an index that
    // cannot write its journal stops the daemon. (First the last KiBs, so that less
    // than a new name's 4 KiB is left above the reserve; that file was made before.)
    let (tail, e) = fill_with(&mnt.join("fill-tail"), 1024);
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    println!("and {tail} bytes more in 1 KiB writes");
    let enospc = |what: &str, r: std::io::Result<()>| match r {
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
        other => panic!("{what} at the reserve: {other:?}, expected ENOSPC"),
    };
    enospc("create", File::create(mnt.join("one-more")).map(|_| ()));
    enospc("mkdir", fs::create_dir(mnt.join("one-more-dir")));
    enospc(
        "symlink",
        std::os::unix::fs::symlink("target", mnt.join("one-more-link")),
    );
    enospc(
        "link",
        fs::hard_link(mnt.join("fill"), mnt.join("fill-link")),
    );
    enospc(
        "setxattr",
        set_xattr(&mnt.join("fill"), "user.big", &[7u8; 60000]),
    );
    check_manifest(&mnt, &manifest, &[]);

    // Now fill the disk itself, from outside: a compression cannot write its blob.
    let (outside, e) = fill(&small.join("outside"));
    println!("then {outside} more bytes beside the backing directory: {e}");
    let out = admin_raw("flush", &mnt);
    assert!(
        !out.status.success(),
        "flush on a full disk must fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(xattr(&mnt.join("dirty.txt"), "user.nacrith.state"), "dirty");
    check_manifest(&mnt, &manifest, &[]);
    let log = d.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("compressing /dirty.txt") && l.contains("No space left")),
        "{log}"
    );

    // Space comes back: the same mount compresses and everything reads back.
    fs::remove_file(small.join("outside")).expect("rm");
    fs::remove_file(mnt.join("fill")).expect("rm");
    fs::remove_file(mnt.join("fill-tail")).expect("rm");
    admin("flush", &mnt);
    assert_eq!(
        xattr(&mnt.join("dirty.txt"), "user.nacrith.state"),
        "compressed"
    );
    admin("evict", &mnt);
    check_manifest(&mnt, &manifest, &[]);
    d.unmount();
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    check_manifest(&mnt, &manifest, &[]);
    d.unmount();
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
}

/// `n` small files f0, f1, ...: "file i" repeated i + 1 times.
fn numbered_files(n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            (
                format!("f{i}"),
                format!("file {i}\n").repeat(i + 1).into_bytes(),
            )
        })
        .collect()
}

/// A clean stop leaves a small volume's index without the journal of its session
/// (rebuilt after the stop, docs/DURABILITY.md "Index rebuild"): cold storage spends its
/// life unmounted, and fjall's journal of a few dozen files' history used to stay, more
/// than their packed blobs. The clean stop survives the rebuild (the next mount trusts
/// it), every file reads back, fsck is clean.
#[test]
fn a_clean_stop_leaves_a_small_index_without_its_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let files = numbered_files(60);
    for (name, data) in &files {
        fs::write(mnt.join(name), data).expect("write");
    }
    // Some history for the journal: every third file removed again.
    let (removed, files): (Vec<_>, Vec<_>) =
        files.into_iter().enumerate().partition(|(i, _)| i % 3 == 0);
    for (_, (name, _)) in &removed {
        fs::remove_file(mnt.join(name)).expect("rm");
    }
    let log = d.log.clone();
    d.unmount();
    let text = fs::read_to_string(&log).expect("daemon log");
    assert!(text.contains("index: rebuilt after the stop ("), "{text}");
    let journal: u64 = fs::read_dir(backing.join("index.fjall"))
        .expect("index.fjall")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .map(|p| fs::metadata(&p).expect("stat").blocks() * 512)
        .sum();
    assert!(journal <= 8192, "{journal} bytes of journal after the stop");
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    for (_, (name, data)) in &files {
        let got = fs::read(mnt.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(&got == data, "{name} reads back different bytes");
    }
    for (_, (name, _)) in &removed {
        assert!(!mnt.join(name).exists(), "{name} came back");
    }
    assert!(
        d.log_text().contains("the last stop was clean"),
        "{}",
        d.log_text()
    );
    d.unmount();
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
}

/// An index rebuild (docs/DURABILITY.md) only saves space: with no room for the copy (the
/// disk full, or out of inodes half-way through the copy) the volume mounts with its old
/// index and serves every file; once there is room, the rebuild happens.
#[test]
fn an_index_rebuild_without_room_keeps_the_old_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = dir.path().join("small");
    let _tmpfs = Tmpfs::mount(&small, "16m");
    let backing = small.join("backing");
    fs::create_dir(&backing).expect("mkdir backing");
    let mnt = dir.path().join("mnt");
    // The journal kept at this stop (not rebuilt after it), for the mounts below.
    let d = Daemon::start_env(
        &backing,
        &mnt,
        "idle=3600",
        &[("NACRITHFS_INDEX_REBUILD", "never")],
    );
    let files = numbered_files(50);
    for (name, data) in &files {
        fs::write(mnt.join(name), data).expect("write");
    }
    d.unmount();
    let always = [("NACRITHFS_INDEX_REBUILD", "always")];
    let serves_all = |when: &str| {
        for (name, data) in &files {
            let got = fs::read(mnt.join(name)).unwrap_or_else(|e| panic!("{when}: {name}: {e}"));
            assert!(&got == data, "{when}: {name} reads back different bytes");
        }
    };

    // No free block: the rebuild is not tried.
    let (_, e) = fill(&small.join("fill"));
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    let d = Daemon::start_env(&backing, &mnt, "idle=3600", &always);
    serves_all("on a full disk");
    let log = d.log_text();
    d.unmount();
    assert!(
        log.contains("index: not rebuilt") && log.contains("less free space"),
        "{log}"
    );
    fs::remove_file(small.join("fill")).expect("rm fill");

    // Free blocks but (almost) no inodes: the copy fails part of the way and is removed.
    let used = {
        let s = nix_statvfs(&small);
        s.f_files - s.f_ffree
    };
    let remount = |opts: String| {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&small)
            .output()
            .expect("mount -o remount");
        assert!(
            out.status.success(),
            "remounting the tmpfs with {opts}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    remount(format!("nr_inodes={}", used + 2));
    let d = Daemon::start_env(&backing, &mnt, "idle=3600", &always);
    serves_all("out of inodes");
    let log = d.log_text();
    d.unmount();
    assert!(
        log.contains("index: not rebuilt (") && log.contains("No space left"),
        "{log}"
    );
    assert!(
        !backing.join("index.fjall.tmp").exists(),
        "the failed copy was left behind"
    );

    // Room again: rebuilt, and the volume is whole.
    remount("nr_inodes=100000".into());
    let d = Daemon::start_env(&backing, &mnt, "idle=3600", &always);
    serves_all("after the rebuild");
    let log = d.log_text();
    d.unmount();
    assert!(log.contains("index: rebuilt ("), "{log}");
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
}

fn nix_statvfs(p: &Path) -> libc::statvfs {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path");
    // SAFETY: zeroed statvfs is a valid out-parameter; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::statvfs(c.as_ptr(), &mut s) },
        0,
        "statvfs {}",
        p.display()
    );
    s
}

fn env_number(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What the writer did: an operation on `name` began (its content is uncertain until the
/// matching Done), or it finished durably with this full content.
enum Event {
    Begin(String),
    Done(String, Vec<u8>),
}

/// Where the writer works: a directory that exists only on the volume, so that once the
/// dead mount is lazily unmounted, the writer's next create fails instead of landing in
/// the empty mount point underneath (and being counted as fsynced to the volume).
const WRITER_DIR: &str = "w";

/// Writes files durably until told to stop or until the mount dies under it.
fn crash_writer(
    mnt: PathBuf,
    known: BTreeMap<String, Vec<u8>>,
    seed: u64,
    stop: Arc<AtomicBool>,
    tx: std::sync::mpsc::Sender<Event>,
) {
    let text = common::english(30_000);
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut known = known;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) && n < 40 {
        n += 1;
        let r = next();
        let existing: Vec<String> = known.keys().cloned().collect();
        let (name, content, append) = match r % 4 {
            // new text, and new binary, files
            0 | 1 => {
                let name = format!(
                    "{WRITER_DIR}/r{seed:x}-{n}.{}",
                    if r % 4 == 0 { "txt" } else { "bin" }
                );
                let data = if r % 4 == 0 {
                    let start = (next() % 25_000) as usize;
                    text[start..start + 200 + (next() % 700) as usize].to_vec()
                } else {
                    common::random_bytes(1000 + (next() % 30_000) as usize, next())
                };
                (name, data, None)
            }
            // rewrite an existing file
            2 if !existing.is_empty() => {
                let name = existing[(next() as usize) % existing.len()].clone();
                let data = common::random_bytes(500 + (next() % 5000) as usize, next());
                (name, data, None)
            }
            // append to an existing file
            _ if !existing.is_empty() => {
                let name = existing[(next() as usize) % existing.len()].clone();
                let extra = text[..100 + (next() % 300) as usize].to_vec();
                let mut all = known[&name].clone();
                all.extend_from_slice(&extra);
                (name, all, Some(extra))
            }
            _ => continue,
        };
        if tx.send(Event::Begin(name.clone())).is_err() {
            return;
        }
        let path = mnt.join(&name);
        let result = (|| -> std::io::Result<()> {
            let mut f = match &append {
                Some(_) => OpenOptions::new().append(true).open(&path)?,
                None => File::create(&path)?,
            };
            f.write_all(append.as_deref().unwrap_or(&content))?;
            f.sync_all()?;
            drop(f);
            fsync_dir(&mnt.join(WRITER_DIR))
        })();
        if result.is_err() {
            return; // the daemon is gone: this file stays uncertain
        }
        known.insert(name.clone(), content.clone());
        if tx.send(Event::Done(name, content)).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(30 + next() % 120));
    }
}

/// Every manifest file reads back with its size and hash; returns how many.
fn verify_manifest(mnt: &Path, manifest: &BTreeMap<String, Vec<u8>>, when: &str) -> usize {
    for (name, data) in manifest {
        let path = mnt.join(name);
        let size = fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{when}: {name} is gone: {e}"))
            .len();
        assert_eq!(size, data.len() as u64, "{when}: {name} has the wrong size");
        let got = fs::read(&path).unwrap_or_else(|e| panic!("{when}: reading {name}: {e}"));
        assert!(
            blake3::hash(&got) == blake3::hash(data),
            "{when}: {name} differs from what was fsynced"
        );
    }
    manifest.len()
}

/// Crash points a random round may arm: those the writer's operations (create, rewrite,
/// append, fsync) and the compressions and deletions they cause pass through.
const RANDOM_POINTS: &[&str] = &[
    "create.after_cache_file",
    "create.after_index",
    "write.after_data",
    "write.after_dirty_mark",
    "truncate.after_dirty_mark",
    "truncate.after_data",
    "compress.after_blob_tmp",
    "compress.after_blob_rename",
    "compress.after_plain_sync",
    "compress.after_commit",
    "reap.after_flush",
    "reap.after_delete",
];

/// A temporary directory kept (and named on stderr) if the test fails and keeping was
/// asked for.
struct KeepOnFailure(Option<tempfile::TempDir>, bool);

impl KeepOnFailure {
    fn path(&self) -> &Path {
        self.0
            .as_ref()
            .map_or(Path::new("/nonexistent"), |d| d.path())
    }
}

impl Drop for KeepOnFailure {
    fn drop(&mut self) {
        if self.1 && std::thread::panicking() {
            if let Some(d) = self.0.take() {
                eprintln!("kept for a post-mortem: {}", d.keep().display());
            }
        }
    }
}

/// kill -9 at random moments (mid-write, queued, mid-compression, between a blob's
/// durable write and its index commit, right after a commit), remount, verify everything that was fsynced. NACRITHFS_CRASH_ROUNDS sets
/// the number of rounds (scripts/crash-test runs 20).
#[test]
fn crash_consistency_kill9_rounds() {
    let _llm = common::llm_lock();
    let rounds = env_number("NACRITHFS_CRASH_ROUNDS", 4);
    let dir = tempfile::tempdir().expect("tempdir");
    // NACRITHFS_CRASH_KEEP=1: the volume and the daemon's logs stay for a post-mortem.
    let dir = KeepOnFailure(
        Some(dir),
        std::env::var_os("NACRITHFS_CRASH_KEEP").is_some(),
    );
    let dir = dir.path();
    let (backing, mnt) = new_volume(dir);
    // Outside the mount: what the writer has fsynced (name, size, hash per line).
    let manifest_path = dir.join("manifest");
    let mut manifest: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut pending_total = 0;
    for round in 0..rounds {
        let mode = round % 5;
        // Mode 3 holds each blob between its durable write and its index commit; mode 4
        // arms one crash point of the protocol (docs/DURABILITY.md), the n-th time.
        let armed = format!(
            "{}:{}",
            RANDOM_POINTS[(round as usize / 5) % RANDOM_POINTS.len()],
            1 + (round * 7) % 5
        );
        let env: Vec<(&str, &str)> = match mode {
            3 => vec![("NACRITHFS_FAULT_PAUSE_BEFORE_COMMIT_MS", "3000")],
            4 => vec![("NACRITHFS_CRASH_AT", armed.as_str())],
            _ => vec![],
        };
        let mut d = Daemon::start_env(&backing, &mnt, "idle=0", &env);
        let verified = verify_manifest(&mnt, &manifest, &format!("round {round}"));
        if round == 0 {
            fs::create_dir(mnt.join(WRITER_DIR)).expect("mkdir on the volume");
            fsync_dir(&mnt).expect("fsync the root");
        }
        assert!(
            mnt.join(WRITER_DIR).is_dir(),
            "round {round}: the writer's directory is gone"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = {
            let (mnt, known, stop) = (mnt.clone(), manifest.clone(), stop.clone());
            let seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(round + 1);
            std::thread::spawn(move || crash_writer(mnt, known, seed, stop, tx))
        };
        let start = Instant::now();
        let committed_before = if mode == 4 {
            0
        } else {
            status_field(&mnt, "compressed_since_mount")
        };
        let delay = Duration::from_millis(300 + (round * 7919) % 2200);
        // Kill when the moment for this round's mode has come and work is pending; in
        // mode 4 the daemon dies by itself at its crash point (or is killed after 20 s if
        // the writer never got it there).
        let (queued, compressing) = loop {
            if mode == 4 {
                if matches!(d.child.try_wait(), Ok(Some(_)))
                    || start.elapsed() > Duration::from_secs(20)
                {
                    break (0, 0);
                }
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let (q, c) = (
                status_field(&mnt, "queued"),
                status_field(&mnt, "compressing"),
            );
            let moment = match mode {
                0 => start.elapsed() >= delay,
                1 => c > 0,
                2 => status_field(&mnt, "compressed_since_mount") > committed_before,
                _ => d.log_text().contains("pausing 3000 ms before committing"),
            };
            if moment && q + c > 0 {
                break (q, c);
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "round {round}: nothing pending to kill (queued {q}, compressing {c})"
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        d.kill9();
        stop.store(true, Ordering::Relaxed);
        let _ = writer.join();
        let mut uncertain = std::collections::BTreeSet::new();
        let mut written = 0;
        for e in rx.try_iter() {
            match e {
                Event::Begin(n) => {
                    uncertain.insert(n);
                }
                Event::Done(n, data) => {
                    uncertain.remove(&n);
                    manifest.insert(n, data);
                    written += 1;
                }
            }
        }
        // An operation cut by the kill was never fsynced: no promise about that file.
        for n in &uncertain {
            manifest.remove(n);
        }
        let mut lines = String::new();
        for (n, data) in &manifest {
            lines.push_str(&format!("{n} {} {}\n", data.len(), blake3::hash(data)));
        }
        fs::write(&manifest_path, lines).expect("manifest");
        pending_total += queued + compressing;
        let how = if mode == 4 {
            let hit = fs::read_to_string(backing.with_extension("daemon.log"))
                .unwrap_or_default()
                .contains("crash point");
            format!(
                "crash point {armed}{}",
                if hit { "" } else { " (not reached: kill -9)" }
            )
        } else {
            [
                "random moment",
                "mid-compression",
                "right after a blob commit",
                "mid-commit: blob written, index not yet",
            ][mode as usize]
                .to_string()
        };
        println!(
            "round {round}: {verified} files verified after remount; {written} durable writes, \
             killed ({how}) with {queued} queued and {compressing} compressing, {} cut mid-write",
            uncertain.len()
        );
    }
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let n = verify_manifest(&mnt, &manifest, "after the last kill");
    admin("flush", &mnt);
    admin("evict", &mnt);
    let after = verify_manifest(&mnt, &manifest, "after flush and evict (decompressed)");
    let compressed = manifest
        .keys()
        .filter(|name| xattr(&mnt.join(name), "user.nacrith.state") == "compressed")
        .count();
    d.unmount();
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "fsck after {rounds} kill -9 rounds:\n{out}");
    assert_eq!(compressed, manifest.len());
    println!(
        "{rounds} kill -9 rounds, each with work pending ({pending_total} files queued or compressing \
         at the kills, summed): {n} files verified \
         after the last remount, {after} verified again through decompression ({compressed} \
         compressed); fsck clean"
    );
}

/// One stress worker: random writes, appends, truncates, renames, deletes and reads on
/// its own files, checked against an in-memory reference after every step.
fn stress_worker(mnt: PathBuf, id: u64, deadline: Instant) -> BTreeMap<String, Vec<u8>> {
    let dir = mnt.join(format!("w{id}"));
    fs::create_dir(&dir).expect("worker dir");
    let text = common::english(20_000);
    let mut rng = (id + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n.max(1)
    };
    let mut reference: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut ops = 0u64;
    while Instant::now() < deadline {
        ops += 1;
        let name = format!("f{}", next(4));
        let path = dir.join(&name);
        let what = next(8);
        let ctx = format!("worker {id} op {ops} ({what}) on {name}");
        match (what, reference.contains_key(&name)) {
            (0 | 1, _) | (_, false) => {
                // (re)create: text or binary
                let data = if next(2) == 0 {
                    let s = next(15_000) as usize;
                    text[s..s + 1 + next(900) as usize].to_vec()
                } else {
                    common::random_bytes(1 + next(20_000) as usize, next(u64::MAX))
                };
                fs::write(&path, &data).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                reference.insert(name, data);
            }
            (2, true) => {
                // write at an offset (may extend, leaving a hole)
                let cur = reference.get_mut(&name).expect("ref");
                let off = next(cur.len() as u64 + 1000) as usize;
                let s = next(15_000) as usize;
                let data = &text[s..s + 1 + next(600) as usize];
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                std::os::unix::fs::FileExt::write_all_at(&f, data, off as u64)
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                if cur.len() < off + data.len() {
                    cur.resize(off + data.len(), 0);
                }
                cur[off..off + data.len()].copy_from_slice(data);
            }
            (3, true) => {
                let cur = reference.get_mut(&name).expect("ref");
                let extra = common::random_bytes(1 + next(4000) as usize, next(u64::MAX));
                let mut f = OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                f.write_all(&extra).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                cur.extend_from_slice(&extra);
            }
            (4, true) => {
                let cur = reference.get_mut(&name).expect("ref");
                let len = next(cur.len() as u64 * 2 + 1) as usize;
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(len as u64))
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                cur.resize(len, 0);
            }
            (5, true) => {
                // rename, possibly over another of our files
                let to = format!("f{}", next(4));
                fs::rename(&path, dir.join(&to)).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                let data = reference.remove(&name).expect("ref");
                reference.insert(to, data);
            }
            (6, true) if next(4) == 0 => {
                fs::remove_file(&path).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                reference.remove(&name);
            }
            _ => {
                let got = fs::read(&path).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert!(
                    got == reference[&name],
                    "{ctx}: read {} bytes that differ from the reference ({} bytes)",
                    got.len(),
                    reference[&name].len()
                );
            }
        }
        if next(10) == 0 {
            std::thread::sleep(Duration::from_millis(next(300)));
        }
    }
    println!("worker {id}: {ops} operations");
    reference
        .into_iter()
        .map(|(n, d)| (format!("w{id}/{n}"), d))
        .collect()
}

/// Concurrent writers, readers and renamers with compression, eviction and decompression
/// running underneath; zero errors, zero differences from the reference, before and
/// after a remount. NACRITHFS_STRESS_SECS sets the duration (scripts/stress runs longer).
#[test]
fn stress_concurrent_writers_readers_renamers() {
    let _llm = common::llm_lock();
    let secs = env_number("NACRITHFS_STRESS_SECS", 10);
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    // idle=0 compresses as soon as a file is closed; a tiny cache forces evictions, so
    // reads and writes keep decompressing what was just compressed.
    let d = Daemon::start(&backing, &mnt, "idle=0,cache_size=32K");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let workers: Vec<_> = (0..3)
        .map(|id| {
            let mnt = mnt.clone();
            std::thread::spawn(move || stress_worker(mnt, id, deadline))
        })
        .collect();
    // A reader of everyone's files: contents are in flux, but reads must not fail
    // (ENOENT from a concurrent rename or delete is fine).
    let reader = {
        let mnt = mnt.clone();
        std::thread::spawn(move || {
            let mut reads = 0;
            while Instant::now() < deadline {
                for w in 0..3 {
                    for f in 0..5 {
                        match fs::read(mnt.join(format!("w{w}/f{f}"))) {
                            Ok(_) => reads += 1,
                            Err(e) if e.kind() == ErrorKind::NotFound => {}
                            Err(e) => panic!("reader: w{w}/f{f}: {e}"),
                        }
                    }
                }
                let _ = control_evict(&mnt);
                std::thread::sleep(Duration::from_millis(200));
            }
            reads
        })
    };
    let mut reference = BTreeMap::new();
    for w in workers {
        match w.join() {
            Ok(r) => reference.extend(r),
            Err(p) => std::panic::resume_unwind(p),
        }
    }
    let reads = reader
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    let compressed = status_field(&mnt, "compressed_since_mount");
    let decompressed = status_field(&mnt, "decompressions");
    let superseded = status_field(&mnt, "superseded");
    let grouped = status_field(&mnt, "grouped_files");
    let check = |when: &str| {
        for (name, data) in &reference {
            let got = fs::read(mnt.join(name)).unwrap_or_else(|e| panic!("{when}: {name}: {e}"));
            assert!(got == *data, "{when}: {name} differs from the reference");
        }
    };
    check("after the stress");
    admin("flush", &mnt);
    admin("evict", &mnt);
    check("after flush and evict");
    for key in ["failures", "verify_failures", "decompress_failures"] {
        assert_eq!(status_field(&mnt, key), 0, "{key}:\n{}", d.log_text());
    }
    assert!(
        !d.log_text().contains("ERROR"),
        "errors logged:\n{}",
        d.log_text()
    );
    d.unmount();
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    check("after a remount");
    d.unmount();
    let (code, out) = fsck(&["--deep"], &backing);
    assert_eq!(code, 0, "{out}");
    println!(
        "{secs} s, 3 writers + 1 reader: {} files match the reference; {reads} concurrent reads; \
         {compressed} compressions committed ({grouped} files in solid groups), {superseded} \
         superseded, {decompressed} decompressions during the run; 0 errors; fsck --deep clean",
        reference.len()
    );
}

fn control_evict(mnt: &Path) -> std::io::Result<()> {
    let p = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).expect("path");
    let v = b"evict";
    // SAFETY: valid NUL-terminated strings and a value of the stated length.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            c"user.nacrith.control".as_ptr(),
            v.as_ptr().cast(),
            v.len(),
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Pack files in `packs/`.
fn status_of_packs(backing: &Path) -> usize {
    fs::read_dir(backing.join("packs"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
                .count()
        })
        .unwrap_or(0)
}

/// `nacrithfs recode`, CPU to CPU with a forced foreign tag: blobs that claim another
/// CPU level do not decode; recode refuses a mounted volume, says per backend what it
/// holds and what each blob needs, recodes from a clean copy without the foreign
/// backend, and with --force-backend decodes and recodes the rest; equal files keep
/// sharing one blob; a rerun has nothing to do; fsck and every read are clean.
#[test]
fn recode_moves_blobs_of_a_foreign_backend_to_this_one() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let text = common::english(6000);
    let files: BTreeMap<&str, Vec<u8>> = [
        ("a.txt", text[..1500].to_vec()),
        ("b.txt", text[..1500].to_vec()),
        ("c.txt", text[1500..2700].to_vec()),
        ("small.txt", text[2700..2800].to_vec()),
    ]
    .into_iter()
    .collect();
    let d = Daemon::start(&backing, &mnt, "idle=3600,nopack");
    for (name, data) in &files {
        fs::write(mnt.join(name), data).expect("write");
    }
    admin("flush", &mnt);
    admin("evict", &mnt);
    // c.txt decoded again: a clean copy, the plaintext without the foreign backend.
    assert_eq!(fs::read(mnt.join("c.txt")).expect("read c"), files["c.txt"]);
    d.unmount();
    let here = blob_backends(&backing);
    assert_eq!(
        here.len(),
        2,
        "a/b share one LLM blob, c.txt has one: {here:?}"
    );
    let level = nacrithfs::model::llama::cpu_level();
    let foreign = if level == "x86-64-v4" {
        "x86-64-v3"
    } else {
        "x86-64-v4"
    };
    assert_eq!(forge_backend(&backing, &level, foreign), 2);

    // A blob of a backend not here: EIO, and the log says what it needs.
    let d = Daemon::start(&backing, &mnt, "idle=3600,nopack");
    let e = read_err(&mnt.join("a.txt"));
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let log = d.log_text();
    assert!(
        log.contains(foreign) && log.contains("nacrithfs recode BACKING --to cpu|cuda"),
        "{log}"
    );
    // A mount counts blobs per backend on demand.
    let backends_line = |mnt: &Path, tag: &str| {
        let out = Command::new(BIN)
            .arg("status")
            .arg(mnt)
            .arg("--backends")
            .output()
            .expect("run nacrithfs status");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}");
        text.lines()
            .find(|l| l.contains(tag))
            .unwrap_or_else(|| panic!("status --backends has no line for {tag}:\n{text}"))
            .to_string()
    };
    let line = backends_line(&mnt, foreign);
    assert!(line.contains("2 blobs, 3 files"), "{line}");
    // Offline only.
    let (code, out) = recode(&["--to", "cpu"], &backing);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("unmount it first"), "{out}");
    d.unmount();

    let (code, out) = recode(&["--to", "cpu", "--dry-run"], &backing);
    println!("{out}");
    assert_eq!(code, 4, "{out}");
    let v4_line = out
        .lines()
        .find(|l| l.contains(foreign))
        .unwrap_or_else(|| panic!("no line for the foreign backend:\n{out}"));
    assert!(
        v4_line.contains("2 blobs") && v4_line.contains("3 files"),
        "{v4_line}"
    );
    assert!(out.contains("1 files would be recoded, 2 left"), "{out}");

    // Without --force-backend: c.txt from its clean copy; a/b left, saying why.
    let before: Vec<(PathBuf, Vec<u8>)> = files_under(&backing, "blobs")
        .into_iter()
        .map(|p| (p.clone(), fs::read(&p).expect("read blob")))
        .collect();
    let (code, out) = recode(&["--to", "cpu"], &backing);
    println!("{out}");
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains("recoded 1 files (1 from their clean copy"),
        "{out}"
    );
    assert!(
        out.contains("left as they are: 2 files")
            && out.contains("It needs a build for the recorded CPU level"),
        "{out}"
    );
    let after = files_under(&backing, "blobs");
    let untouched = before
        .iter()
        .filter(|(p, data)| fs::read(p).ok().as_ref() == Some(data))
        .count();
    assert_eq!(
        untouched,
        before.len() - 1,
        "only c.txt's blob was replaced"
    );
    // Its new blob went into a pack (recode packs small blobs, as a mount does).
    assert_eq!(after.len(), before.len() - 1, "{after:?}");
    assert_eq!(status_of_packs(&backing), 1);

    let (code, out) = recode(&["--to", "cpu", "--force-backend"], &backing);
    println!("{out}");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("recoded 1 files (0 from their clean copy, 0 stored with zstd")
            && out.contains("1 linked to an equal file's new blob"),
        "{out}"
    );
    // a/b's new blob is packed too, shared by reference: no LLM blob file is left (only
    // small.txt's zstd blob, which recode leaves alone; the census on the mount below
    // says 2 blobs for 3 files, all of this backend).
    let left = blob_backends(&backing);
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(files_under(&backing, "blobs").len(), 1);
    let (code, out) = recode(&["--to", "cpu"], &backing);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing to do"), "{out}");
    let (code, out) = fsck(&["--deep"], &backing);
    assert_eq!(code, 0, "{out}");

    let d = Daemon::start(&backing, &mnt, "idle=3600,nopack");
    for (name, data) in &files {
        assert_eq!(&fs::read(mnt.join(name)).expect("read"), data, "{name}");
    }
    assert!(status_field(&mnt, "regions_decoded") >= 1);
    let line = backends_line(&mnt, &format!("cpu {level};"));
    assert!(line.contains("2 blobs, 3 files"), "{line}");
    let log = d.log_text();
    d.unmount();
    assert!(!log.contains("ERROR"), "{log}");
}

/// fsck's exit codes are e2fsck's for what is not a check result too: a usage error is
/// 16 and a check that could not run (no such directory, no model for --deep) is 8,
/// never 1, which says "problems found, all repaired" to a script or a cron job.
#[test]
fn fsck_that_cannot_check_never_exits_with_all_repaired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    std::fs::write(mnt.join("a.txt"), b"kept\n").expect("write");
    d.unmount();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .arg("fsck")
            .args(args)
            .output()
            .expect("run nacrithfs fsck");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let b = backing.to_str().expect("utf-8 path");
    let missing = dir.path().join("no-such-dir");
    let missing = missing.to_str().expect("utf-8 path");
    for (args, code) in [
        (vec![], 16),
        (vec![b, "--bogus"], 16),
        (vec![b, "--model"], 16),
        (vec![b, b], 16),
        (vec![missing], 8),
        (vec![b, "--model", "/nonexistent/model.gguf"], 8),
    ] {
        let (got, err) = run(&args);
        assert_eq!(got, Some(code), "fsck {args:?}: {err}");
        assert!(err.starts_with("nacrithfs: fsck: "), "fsck {args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // And the volume itself checks clean.
    let (code, text) = fsck(&[], &backing);
    assert_eq!(code, 0, "{text}");
}
