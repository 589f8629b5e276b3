//! The crash-point harness (docs/DURABILITY.md): for every multi-step operation and each
//! of its crash points, the daemon dies at that point (SIGKILL to itself, armed by
//! NACRITHFS_CRASH_AT), the volume is mounted again, and every file must read back as its
//! old or its new content (byte-exact, again through the decompressor after `evict`),
//! nothing gives EIO, and `nacrithfs fsck` finds a clean volume. Every crash point in
//! src/ must have a case here (checked).
//!
//! Each case starts from a copy of one template volume made with the real model: files
//! dirty (queued), compressed with a clean copy, compressed and evicted, hard-linked, in
//! a subdirectory; the recovery and fsck cases add one open and unlinked.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::mount::*;

/// The template and the cases that exercise blob files: every blob a file of its own.
const OPTS: &str = "idle=3600,nopack";
/// The pack cases: small blobs go into packs (the default), one blob per file (the
/// compaction cases need blobs of their own to move).
const OPTS_PACK: &str = "idle=3600,nogroup";
/// The solid group cases: small files coded together (the default).
const OPTS_GROUP: &str = "idle=3600";

/// The template's files and their content.
fn contents() -> &'static BTreeMap<&'static str, Vec<u8>> {
    static C: OnceLock<BTreeMap<&'static str, Vec<u8>>> = OnceLock::new();
    C.get_or_init(|| {
        let text = common::english(4000);
        let mut m = BTreeMap::new();
        m.insert("clean.txt", text[0..300].to_vec());
        // Long enough for the LLM coder to beat zstd (the others are stored or zstd):
        // reading it back after a crash runs the model.
        m.insert("evicted.txt", text[300..1300].to_vec());
        m.insert("linked_a.txt", text[1300..1600].to_vec());
        m.insert("dir/linked_b.txt", text[1300..1600].to_vec());
        m.insert("dir/inner.txt", text[1600..1900].to_vec());
        m.insert("dirty.txt", text[1900..2200].to_vec());
        m
    })
}

/// The files the solid group cases write.
const GROUPED: [&str; 3] = ["g1.txt", "dir/g2.txt", "g3.txt"];

fn grouped_text(i: usize) -> Vec<u8> {
    common::english(12_000)[8000 + 900 * i..8700 + 900 * i].to_vec()
}

fn new_text() -> Vec<u8> {
    common::english(4000)[2200..2500].to_vec()
}

/// The template volume (made once per run): everything compressed by the real model,
/// evicted, `clean.txt` read back (a clean copy again), then `dirty.txt` written.
fn template() -> &'static Path {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("nacrith-crash-template-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("template dir");
        let (backing, mnt) = new_volume(&dir);
        let d = Daemon::start(&backing, &mnt, OPTS);
        let c = contents();
        fs::create_dir(mnt.join("dir")).expect("mkdir");
        for name in ["clean.txt", "evicted.txt", "linked_a.txt", "dir/inner.txt"] {
            fs::write(mnt.join(name), &c[name]).expect("write");
        }
        fs::hard_link(mnt.join("linked_a.txt"), mnt.join("dir/linked_b.txt")).expect("link");
        admin("flush", &mnt);
        assert!(
            status_field(&mnt, "symbols_coded") > 0,
            "the model coded nothing in the template"
        );
        for name in ["clean.txt", "evicted.txt", "linked_a.txt", "dir/inner.txt"] {
            assert_eq!(
                xattr(&mnt.join(name), "user.nacrith.state"),
                "compressed",
                "{name}"
            );
        }
        admin("evict", &mnt);
        assert_eq!(
            fs::read(mnt.join("clean.txt")).expect("decode"),
            c["clean.txt"]
        );
        fs::write(mnt.join("dirty.txt"), &c["dirty.txt"]).expect("write");
        d.unmount();
        let (code, text) = fsck(&[], &backing);
        assert_eq!(code, 0, "the template is not clean:\n{text}");
        backing
    })
}

/// What a path may hold after the crash: any of these (None: absent).
type Allowed = BTreeMap<String, Vec<Option<Vec<u8>>>>;

/// Every template file as it was, and nothing else.
fn unchanged() -> Allowed {
    contents()
        .iter()
        .map(|(k, v)| (k.to_string(), vec![Some(v.clone())]))
        .collect()
}

fn allow(a: &mut Allowed, path: &str, options: Vec<Option<Vec<u8>>>) {
    a.insert(path.to_string(), options);
}

fn old(path: &str) -> Option<Vec<u8>> {
    Some(contents()[path].clone())
}

struct Case {
    op: &'static str,
    point: &'static str,
    /// Runs against the mount; errors (the daemon dies under it) are expected.
    run: fn(&Path),
    allowed: fn() -> Allowed,
    when: When,
    /// What else must hold on the remounted volume (beyond file contents).
    verify: fn(&Path, &str),
    /// Mount options of the crashing daemon.
    opts: &'static str,
}

fn nothing_more(_: &Path, _: &str) {}

#[derive(PartialEq)]
enum When {
    /// While `run` works on the mount.
    Running,
    /// During the mount itself (recovery points): prepared by `run` on a normal mount
    /// killed with -9.
    AtMount,
    /// During `nacrithfs fsck --repair` on the volume `run` left (killed with -9).
    InFsckRepair,
    /// During `nacrithfs recode --to cpu --force-backend` on the volume `run` left
    /// (cleanly unmounted), its LLM blobs' backend tags forged to another CPU level.
    InRecode,
    /// During the mount of the template turned back into format 2 (its index in sled),
    /// which moves the index to fjall first.
    InMigration,
    /// During `nacrithfs compact` on a mount of the volume `run` left (cleanly
    /// unmounted: its packs sealed).
    InCompaction,
    /// During the first mount of an empty backing directory (its initialization).
    AtInit,
}

/// Turn a format-4 volume into the format-2 volume it would have been: the same keys
/// in a sled index at `index/`, the files moved from the subdirectories of 4096 inode
/// numbers to those of the inode number's low byte, the marker "nacrithfs 2". With
/// `layout_6`, its index as layout 6 had it too: parent entries ('p': directory and
/// name) in place of up entries ('u': directory and cookie).
fn to_format_2(backing: &Path, layout_6: bool) {
    for top in ["blobs", "cache"] {
        let dirs: Vec<PathBuf> = fs::read_dir(backing.join(top))
            .expect("list")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.is_dir())
            .collect();
        for dir in dirs {
            for f in fs::read_dir(&dir).expect("list") {
                let f = f.expect("entry").path();
                let name = f.file_name().expect("name").to_string_lossy().into_owned();
                let ino: u64 = name
                    .split(['-', '.'])
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("{}: no inode number", f.display()));
                let to = backing.join(top).join(format!("{:02x}", ino % 256));
                fs::create_dir_all(&to).expect("mkdir");
                fs::rename(&f, to.join(&name)).expect("move");
            }
            if fs::read_dir(&dir).expect("list").next().is_none() {
                fs::remove_dir(&dir).expect("rmdir");
            }
        }
    }
    let mut entries = {
        let store = nacrithfs::store::Store::open_existing(backing).expect("open the copy");
        store.raw_entries().expect("read the index")
    };
    if layout_6 {
        let cookies: BTreeMap<Vec<u8>, Vec<u8>> = entries
            .iter()
            .filter(|(k, _)| k[0] == b'c')
            .cloned()
            .collect();
        let mut ups = 0;
        for (k, v) in entries.iter_mut() {
            if k[0] == b'u' {
                let (parent, cookie) = nacrithfs::store::record::decode_up(v).expect("an up entry");
                let mut ck = vec![b'c'];
                ck.extend_from_slice(&parent.to_be_bytes());
                ck.extend_from_slice(&cookie.to_be_bytes());
                let entry = &cookies[&ck];
                let (_, _, name) =
                    nacrithfs::store::record::decode_cookie(entry).expect("a cookie entry");
                k[0] = b'p';
                let mut old = parent.to_le_bytes().to_vec();
                old.extend_from_slice(name);
                *v = old;
                ups += 1;
            } else if k == b"mlayout" {
                *v = 6u64.to_le_bytes().to_vec();
            }
        }
        assert!(ups >= 5, "{ups} up entries in the template");
    }
    fs::remove_dir_all(backing.join("index.fjall")).expect("remove index.fjall");
    let db = sled::open(backing.join("index")).expect("create a sled index");
    for (k, v) in entries {
        db.insert(k, v).expect("sled insert");
    }
    db.flush().expect("sled flush");
    drop(db);
    fs::write(backing.join("nacrithfs.format"), "nacrithfs 2\n").expect("marker");
}

fn append_new(mnt: &Path, name: &str) {
    if let Ok(mut f) = OpenOptions::new().append(true).open(mnt.join(name)) {
        let _ = f.write_all(&new_text());
    }
}

fn cases() -> Vec<Case> {
    fn appended(path: &str) -> Option<Vec<u8>> {
        let mut v = contents()[path].clone();
        v.extend_from_slice(&new_text());
        Some(v)
    }
    fn created() -> Allowed {
        let mut a = unchanged();
        allow(
            &mut a,
            "new.txt",
            vec![None, Some(vec![]), Some(new_text())],
        );
        a
    }
    fn appended_clean() -> Allowed {
        let mut a = unchanged();
        allow(
            &mut a,
            "clean.txt",
            vec![old("clean.txt"), appended("clean.txt")],
        );
        a
    }
    fn rewritten_evicted() -> Allowed {
        let mut a = unchanged();
        allow(
            &mut a,
            "evicted.txt",
            vec![old("evicted.txt"), Some(vec![]), Some(new_text())],
        );
        a
    }
    fn appended_dirty() -> Allowed {
        let mut a = unchanged();
        allow(&mut a, "dirty.txt", vec![appended("dirty.txt")]);
        a
    }
    fn half_appended_dirty() -> Allowed {
        let mut a = unchanged();
        let mut v = contents()["dirty.txt"].clone();
        v.extend_from_slice(&new_text()[..new_text().len() / 2]);
        allow(&mut a, "dirty.txt", vec![Some(v)]);
        a
    }
    fn fallocated() -> Allowed {
        let mut a = unchanged();
        let mut grown = contents()["clean.txt"].clone();
        grown.resize(grown.len() + 4096, 0);
        allow(&mut a, "clean.txt", vec![old("clean.txt"), Some(grown)]);
        a
    }
    fn linked() -> Allowed {
        let mut a = unchanged();
        allow(&mut a, "new_link.txt", vec![None, old("clean.txt")]);
        a
    }
    fn unlinked() -> Allowed {
        let mut a = unchanged();
        allow(&mut a, "evicted.txt", vec![None, old("evicted.txt")]);
        a
    }
    fn renamed() -> Allowed {
        // Either the rename happened or it did not; never half.
        let mut a = unchanged();
        allow(&mut a, "dirty.txt", vec![None, old("dirty.txt")]);
        allow(
            &mut a,
            "clean.txt",
            vec![old("dirty.txt"), old("clean.txt")],
        );
        a
    }
    fn released() -> Allowed {
        let mut a = unchanged();
        allow(&mut a, "dir/inner.txt", vec![None, old("dir/inner.txt")]);
        a
    }
    fn recovering() -> Allowed {
        let mut a = unchanged();
        allow(&mut a, "dir/inner.txt", vec![None, old("dir/inner.txt")]);
        allow(
            &mut a,
            "clean.txt",
            vec![old("clean.txt"), appended("clean.txt")],
        );
        a
    }

    fn create(mnt: &Path) {
        let _ = fs::write(mnt.join("new.txt"), new_text());
    }
    fn write_clean(mnt: &Path) {
        append_new(mnt, "clean.txt");
    }
    /// Two writes to a dirty file through one handle, a group commit apart: the second
    /// write commits nothing (its size waits in memory), and the crash loses neither.
    fn write_dirty(mnt: &Path) {
        if let Ok(mut f) = OpenOptions::new().append(true).open(mnt.join("dirty.txt")) {
            let text = new_text();
            let (a, b) = text.split_at(text.len() / 2);
            let _ = f.write_all(a);
            std::thread::sleep(Duration::from_millis(2500));
            let _ = f.write_all(b);
            std::thread::sleep(Duration::from_millis(2500));
        }
    }
    fn rewrite_evicted(mnt: &Path) {
        let _ = fs::write(mnt.join("evicted.txt"), new_text());
    }
    fn fallocate(mnt: &Path) {
        if let Ok(f) = OpenOptions::new().write(true).open(mnt.join("clean.txt")) {
            use std::os::fd::AsRawFd;
            let len = contents()["clean.txt"].len() as i64;
            // SAFETY: a valid fd.
            unsafe { libc::fallocate(f.as_raw_fd(), 0, len, 4096) };
        }
    }
    /// An access ACL with a named entry: the ACL and the mode's group bits (its mask)
    /// change in one batch.
    fn set_acl(mnt: &Path) {
        let _ = Command::new("setfacl")
            .args(["-m", "u:nobody:rwx,m::rwx"])
            .arg(mnt.join("clean.txt"))
            .status();
    }
    /// Before: no ACL, the template's mode; after: the ACL, with the mode's group bits
    /// its mask (rwx). Never one without the other.
    fn acl_and_mode_agree(mnt: &Path, when: &str) {
        let path = mnt.join("clean.txt");
        let out = Command::new("getfacl")
            .args(["-cp", "--absolute-names"])
            .arg(&path)
            .output()
            .expect("getfacl (Debian package acl)");
        let acl = String::from_utf8_lossy(&out.stdout).to_string();
        let mode = fs::metadata(&path).expect("stat").mode() & 0o777;
        // The template's files are 0644 (group r--).
        if acl.contains("user:nobody:rwx") {
            assert_eq!(
                mode & 0o070,
                0o070,
                "{when}: the ACL is set, the mode is {mode:o}:\n{acl}"
            );
        } else {
            assert_eq!(
                mode, 0o644,
                "{when}: no ACL, yet the mode is {mode:o}:\n{acl}"
            );
        }
    }
    fn link(mnt: &Path) {
        let _ = fs::hard_link(mnt.join("clean.txt"), mnt.join("new_link.txt"));
    }
    fn unlink(mnt: &Path) {
        let _ = fs::remove_file(mnt.join("evicted.txt"));
        // The reaper runs within a second of an unlink.
        std::thread::sleep(Duration::from_secs(3));
    }
    fn rename(mnt: &Path) {
        let _ = fs::rename(mnt.join("dirty.txt"), mnt.join("clean.txt"));
    }
    fn release(mnt: &Path) {
        let f = File::open(mnt.join("dir/inner.txt"));
        let _ = fs::remove_file(mnt.join("dir/inner.txt"));
        drop(f);
        std::thread::sleep(Duration::from_secs(3));
    }
    fn evict(mnt: &Path) {
        let _ = admin_raw("evict", mnt);
    }
    fn read_evicted(mnt: &Path) {
        let _ = fs::read(mnt.join("evicted.txt"));
    }
    fn flush(mnt: &Path) {
        let _ = admin_raw("flush", mnt);
    }
    /// A clean unmount: the daemon dies in its stop, before the clean-stop record.
    fn unmount(mnt: &Path) {
        let _ = Command::new("umount").arg(mnt).status();
    }
    /// A file equal to one already compressed: the flush makes it a second name of that
    /// file's blob instead of coding it.
    fn flush_a_copy(mnt: &Path) {
        let _ = fs::write(mnt.join("copy.txt"), &contents()["clean.txt"]);
        let _ = admin_raw("flush", mnt);
    }
    fn copied() -> Allowed {
        let mut a = unchanged();
        allow(&mut a, "copy.txt", vec![old("clean.txt")]);
        a
    }
    /// Leaves work for recovery: an orphan (unlinked while open), an appended clean
    /// copy, then kill -9.
    fn needs_recovery(mnt: &Path) {
        let f = File::open(mnt.join("dir/inner.txt")).expect("open");
        fs::remove_file(mnt.join("dir/inner.txt")).expect("unlink");
        append_new(mnt, "clean.txt");
        std::mem::forget(f);
    }

    /// A second file equal to evicted.txt (sharing its blob): recode codes the group
    /// once and links the other.
    fn equal_copy(mnt: &Path) {
        fs::write(mnt.join("evicted_copy.txt"), &contents()["evicted.txt"]).expect("write");
        admin("flush", mnt);
        assert_eq!(
            xattr(&mnt.join("evicted_copy.txt"), "user.nacrith.state"),
            "compressed"
        );
    }
    fn with_copy() -> Allowed {
        let mut a = unchanged();
        allow(&mut a, "evicted_copy.txt", vec![old("evicted.txt")]);
        a
    }
    // `opts`: with "nopack", recode writes blob files (`--nopack`; equal files then
    // get hard links), else it packs the new blobs.
    let r = |point, opts| Case {
        op: "recode",
        point,
        run: equal_copy,
        allowed: with_copy,
        when: When::InRecode,
        verify: nothing_more,
        opts,
    };

    // At the mount after a kill -9 that left work for recovery.
    let m = |op, point| Case {
        op,
        point,
        run: needs_recovery,
        allowed: recovering,
        when: When::AtMount,
        verify: nothing_more,
        opts: OPTS,
    };
    let c = |op, point, run: fn(&Path), allowed: fn() -> Allowed| Case {
        op,
        point,
        run,
        allowed,
        when: When::Running,
        verify: nothing_more,
        opts: OPTS,
    };
    /// Three texts long enough for the model, packed together (one profile, one
    /// pack), then two of them deleted: the pack, sealed at the unmount, is mostly dead
    /// bytes, and p3.txt's blob is moved by the compaction.
    fn packed_then_deleted(mnt: &Path) {
        let text = common::english(8000);
        for (i, name) in ["p1.txt", "p2.txt", "p3.txt"].iter().enumerate() {
            fs::write(mnt.join(name), &text[4000 + 1200 * i..5200 + 1200 * i]).expect("write");
        }
        admin("flush", mnt);
        assert!(status_field(mnt, "packs") >= 1, "nothing was packed");
        for name in ["p1.txt", "p2.txt"] {
            fs::remove_file(mnt.join(name)).expect("rm");
        }
    }
    /// Three small files written and flushed: with dirty.txt, coded as one solid group.
    fn write_group(mnt: &Path) {
        for (i, name) in GROUPED.iter().enumerate() {
            let _ = fs::write(mnt.join(name), grouped_text(i));
        }
        let _ = admin_raw("flush", mnt);
    }
    fn grouped() -> Allowed {
        let mut a = unchanged();
        for (i, name) in GROUPED.iter().enumerate() {
            allow(&mut a, name, vec![Some(grouped_text(i))]);
        }
        a
    }
    let g = |point| Case {
        op: "compress a solid group",
        point,
        run: write_group,
        allowed: grouped,
        when: When::Running,
        verify: nothing_more,
        opts: OPTS_GROUP,
    };
    fn with_p3() -> Allowed {
        let mut a = unchanged();
        let text = common::english(8000);
        allow(&mut a, "p3.txt", vec![Some(text[6400..7600].to_vec())]);
        a
    }
    let p = |point, run: fn(&Path)| Case {
        op: "pack a blob",
        point,
        run,
        allowed: unchanged,
        when: When::Running,
        verify: nothing_more,
        opts: OPTS_PACK,
    };
    let k = |point| Case {
        op: "compact packs",
        point,
        run: packed_then_deleted,
        allowed: with_p3,
        when: When::InCompaction,
        verify: nothing_more,
        opts: OPTS_PACK,
    };
    vec![
        g("group.after_pack"),
        g("group.after_commit"),
        p("pack.after_tmp", flush),
        p("pack.after_create", flush),
        p("pack.after_append", flush),
        k("compact.after_copy"),
        k("compact.after_commit"),
        k("compact.after_bury"),
        c("create", "shard.after_mkdir", create, created),
        c("create", "create.after_cache_file", create, created),
        c("create", "create.after_index", create, created),
        c(
            "write to a clean copy",
            "write.after_dirty_mark",
            write_clean,
            appended_clean,
        ),
        c(
            "write to a clean copy",
            "write.after_data",
            write_clean,
            appended_clean,
        ),
        c(
            "write to a dirty file (no index write)",
            "write.after_data:2",
            write_dirty,
            appended_dirty,
        ),
        c(
            "write to a dirty file (no index write)",
            "group_commit.after_index",
            write_dirty,
            half_appended_dirty,
        ),
        c(
            "O_TRUNC of an evicted file",
            "truncate.after_dirty_mark",
            rewrite_evicted,
            rewritten_evicted,
        ),
        c(
            "O_TRUNC of an evicted file",
            "truncate.after_data",
            rewrite_evicted,
            rewritten_evicted,
        ),
        c(
            "fallocate a clean copy",
            "fallocate.after_dirty_mark",
            fallocate,
            fallocated,
        ),
        c("link", "link.after_index", link, linked),
        Case {
            op: "set an ACL",
            point: "xattr.after_index",
            run: set_acl,
            allowed: unchanged,
            when: When::Running,
            verify: acl_and_mode_agree,
            opts: OPTS,
        },
        c("unlink", "unlink.after_index", unlink, unlinked),
        c("unlink", "reap.after_flush", unlink, unlinked),
        c("unlink", "reap.after_delete", unlink, unlinked),
        c("rename over", "rename.after_index", rename, renamed),
        c(
            "close of an unlinked file",
            "release.after_index",
            release,
            released,
        ),
        c("unmount", "stop.after_syncfs", unmount, unchanged),
        c("unmount", "stop_rebuild.after_copy", unmount, unchanged),
        c("unmount", "stop_rebuild.after_exchange", unmount, unchanged),
        c("evict", "evict.after_index", evict, unchanged),
        c("evict", "evict.after_delete", evict, unchanged),
        c("decompress", "decode.after_rename", read_evicted, unchanged),
        c(
            "decompress",
            "decode.after_dir_sync",
            read_evicted,
            unchanged,
        ),
        c("decompress", "decode.after_index", read_evicted, unchanged),
        c("compress", "compress.after_blob_tmp", flush, unchanged),
        c("compress", "compress.after_blob_rename", flush, unchanged),
        c("compress", "compress.after_blob_dir_sync", flush, unchanged),
        c("compress", "compress.after_plain_sync", flush, unchanged),
        c("compress", "compress.after_commit", flush, unchanged),
        c("compress a copy", "dedup.after_link", flush_a_copy, copied),
        c(
            "compress a copy",
            "dedup.after_commit",
            flush_a_copy,
            copied,
        ),
        m("recovery", "recover.after_commit"),
        m("index rebuild", "index_rebuild.after_copy"),
        m("index rebuild", "index_rebuild.after_exchange"),
        m("recovery", "recover.after_sweep"),
        Case {
            op: "move to format 3",
            point: "migrate.after_copy",
            run: |_| {},
            allowed: unchanged,
            when: When::InMigration,
            verify: nothing_more,
            opts: OPTS,
        },
        Case {
            op: "move to format 3",
            point: "migrate.after_rename",
            run: |_| {},
            allowed: unchanged,
            when: When::InMigration,
            verify: nothing_more,
            opts: OPTS,
        },
        Case {
            op: "move to format 3",
            point: "migrate.after_marker",
            run: |_| {},
            allowed: unchanged,
            when: When::InMigration,
            verify: nothing_more,
            opts: OPTS,
        },
        Case {
            op: "move to layout 7",
            point: "layout7.after_batch",
            run: |_| {},
            allowed: unchanged,
            when: When::InMigration,
            verify: nothing_more,
            opts: OPTS,
        },
        Case {
            op: "first mount",
            point: "init.after_index",
            run: |_| {},
            allowed: unchanged,
            when: When::AtInit,
            verify: nothing_more,
            opts: OPTS,
        },
        Case {
            op: "fsck --repair",
            point: "fsck.after_commit",
            run: needs_recovery,
            allowed: recovering,
            when: When::InFsckRepair,
            verify: nothing_more,
            opts: OPTS,
        },
        Case {
            op: "fsck --repair",
            point: "fsck.after_graves",
            run: needs_recovery,
            allowed: recovering,
            when: When::InFsckRepair,
            verify: nothing_more,
            opts: OPTS,
        },
        r("recode.after_blob", OPTS_PACK),
        r("recode.after_commit", OPTS_PACK),
        r("recode.after_unlink", OPTS_PACK),
        r("recode.after_link", OPTS),
        // The second file's switch: the first is done.
        r("recode.after_commit:2", OPTS_PACK),
    ]
}

/// The foreign CPU level recode cases forge into blob headers.
fn foreign_level() -> &'static str {
    if nacrithfs::model::llama::cpu_level() == "x86-64-v4" {
        "x86-64-v3"
    } else {
        "x86-64-v4"
    }
}

/// Mount with the crash point armed; expect the daemon to die of it.
fn run_to_crash(backing: &Path, mnt: &Path, case: &Case) {
    let mut env = vec![("NACRITHFS_CRASH_AT", case.point)];
    if case.point.starts_with("index_rebuild.") || case.point.starts_with("stop_rebuild.") {
        // The template's journal is small: rebuild whatever the rule says.
        env.push(("NACRITHFS_INDEX_REBUILD", "always"));
    }
    let log = backing.with_extension("daemon.log");
    let mut raw = None;
    let mut daemon = None;
    if case.when == When::InFsckRepair {
        let d = Daemon::start(backing, mnt, OPTS);
        (case.run)(mnt);
        d.kill9();
        if is_mounted(mnt) {
            let _ = Command::new("umount").arg("-l").arg(mnt).status();
        }
        let (status, text) = fsck_env(&["--repair"], backing, &env);
        assert_killed_at(case, "fsck", status, &text);
        // Run again to the end: what the crash left is repairable.
        let (code, text) = fsck(&["--repair"], backing);
        assert!(
            code <= 1,
            "{}: fsck --repair after its own crash at {} left problems:\n{text}",
            case.op,
            case.point
        );
        return;
    }
    if case.when == When::InRecode {
        // Blob files (whose tags can be forged) on the way in.
        let d = Daemon::start(backing, mnt, OPTS);
        (case.run)(mnt);
        d.unmount();
        let level = nacrithfs::model::llama::cpu_level();
        assert!(forge_backend(backing, &level, foreign_level()) >= 1);
        let mut args = vec!["--to", "cpu", "--force-backend"];
        if case.opts.contains("nopack") {
            args.push("--nopack");
        }
        let (status, text) = recode_env(&args, backing, &env);
        assert_killed_at(case, "recode", status, &text);
        // A rerun finishes the job: every file's blob is this backend's (the old blobs
        // left in the graveyard go at the next mount).
        let (status, text) = recode_env(&args, backing, &[]);
        assert_eq!(
            status.code(),
            Some(0),
            "recode after its crash at {}:\n{text}",
            case.point
        );
        // What a dry run counts: every file's blob is this backend's.
        let (_, census) = recode_env(&["--to", "cpu", "--dry-run"], backing, &[]);
        let table = census
            .split("blobs per backend, before:")
            .nth(1)
            .and_then(|t| t.split("dry run:").next())
            .unwrap_or_else(|| panic!("no census in the dry run:\n{census}"));
        assert!(
            table.contains(&level) && !table.contains(foreign_level()),
            "{}: {text}\n{census}",
            case.point
        );
        return;
    }
    if case.when == When::InCompaction {
        let d = Daemon::start(backing, mnt, case.opts);
        (case.run)(mnt);
        d.unmount();
        let d = Daemon::start_env(backing, mnt, case.opts, &env);
        compact_now(mnt);
        daemon = Some(d);
    } else if case.when == When::AtMount || case.when == When::InMigration {
        // Prepare the mess on a normal mount, kill -9 (or turn the volume back into
        // format 2), then mount with the point armed: the daemon dies during recovery
        // (or the move to format 3), before it mounts.
        if case.when == When::AtMount {
            let d = Daemon::start(backing, mnt, OPTS);
            (case.run)(mnt);
            d.kill9();
        } else {
            to_format_2(backing, case.point.starts_with("layout7."));
        }
        raw = Some(
            Command::new(BIN)
                .arg(backing)
                .arg(mnt)
                .arg("-f")
                .args(["-o", OPTS])
                .envs(env)
                .stderr(File::create(&log).expect("log"))
                .spawn()
                .expect("start nacrithfs"),
        );
    } else if case.when != When::InCompaction {
        let d = Daemon::start_env(backing, mnt, case.opts, &env);
        (case.run)(mnt);
        daemon = Some(d);
    }
    let start = Instant::now();
    let status = loop {
        let child = match (&mut raw, &mut daemon) {
            (Some(c), _) => c,
            (None, Some(d)) => &mut d.child,
            (None, None) => unreachable!("one of the two is set"),
        };
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{}: the daemon did not reach crash point {} within 120 s:\n{}",
            case.op,
            case.point,
            fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(daemon);
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert_killed_at(case, "the daemon", status, &text);
    if is_mounted(mnt) {
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
    }
}

fn compact_now(mnt: &Path) {
    let _ = admin_raw("compact", mnt);
}

/// `who` died of SIGKILL at the case's crash point (`text`: what it printed).
fn assert_killed_at(case: &Case, who: &str, status: std::process::ExitStatus, text: &str) {
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{}: {who} ended with {status}, not at crash point {}:\n{text}",
        case.op,
        case.point
    );
    // `name:N` arms the N-th pass of point `name`.
    let name = case.point.split(':').next().unwrap_or(case.point);
    assert!(
        text.contains(&format!("crash point {name} reached")),
        "{}: killed, but not by crash point {}:\n{text}",
        case.op,
        case.point
    );
}

/// Every path reads back as one of its allowed contents, and nothing gives an error.
fn check(mnt: &Path, allowed: &Allowed, when: &str, case: &Case) {
    for (path, options) in allowed {
        let got = match fs::read(mnt.join(path)) {
            Ok(d) => Some(d),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => panic!("{} / {}: {path} gives {e} {when}", case.op, case.point),
        };
        assert!(
            options.contains(&got),
            "{} / {}: {path} {when} holds {:?} ({} bytes), which is neither its old nor its new content",
            case.op,
            case.point,
            got.as_ref().map(|g| String::from_utf8_lossy(&g[..g.len().min(60)]).into_owned()),
            got.as_ref().map_or(0, |g| g.len())
        );
    }
}

/// Hard links agree: linked_a.txt and dir/linked_b.txt are one inode.
fn check_links(mnt: &Path) {
    let a = fs::metadata(mnt.join("linked_a.txt")).expect("linked_a");
    let b = fs::metadata(mnt.join("dir/linked_b.txt")).expect("linked_b");
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
}

/// A first mount killed during its initialization (before the format marker): the next
/// mount begins it again and serves; nothing is refused as "not a backing directory".
fn run_init_case(case: &Case, dir: &Path) {
    let backing = dir.join("backing");
    let mnt = dir.join("mnt");
    fs::create_dir_all(&backing).expect("backing");
    fs::create_dir_all(&mnt).expect("mnt");
    let log = dir.join("daemon.log");
    let status = Command::new(BIN)
        .arg(&backing)
        .arg(&mnt)
        .arg("-f")
        .args(["-o", OPTS])
        .env("NACRITHFS_CRASH_AT", case.point)
        .stderr(File::create(&log).expect("log"))
        .status()
        .expect("run nacrithfs");
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert_killed_at(case, "the daemon", status, &text);
    assert!(
        !backing.join("nacrithfs.format").exists(),
        "the marker was written before {}",
        case.point
    );
    if is_mounted(&mnt) {
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    }
    let d = Daemon::start(&backing, &mnt, OPTS);
    write_synced(&mnt.join("first.txt"), b"the first file\n");
    d.unmount();
    let d = Daemon::start(&backing, &mnt, OPTS);
    assert_eq!(
        fs::read(mnt.join("first.txt")).expect("read"),
        b"the first file\n"
    );
    d.unmount();
    let (code, text) = fsck(&[], &backing);
    assert_eq!(code, 0, "{}: fsck:\n{text}", case.point);
}

fn run_case(case: &Case, dir: &Path) {
    if case.when == When::AtInit {
        return run_init_case(case, dir);
    }
    let backing = dir.join("backing");
    copy_tree(template(), &backing);
    let mnt = dir.join("mnt");
    fs::create_dir_all(&mnt).expect("mnt");
    run_to_crash(&backing, &mnt, case);

    let allowed = (case.allowed)();
    let d = Daemon::start(&backing, &mnt, OPTS);
    check(&mnt, &allowed, "after the crash", case);
    check_links(&mnt);
    (case.verify)(
        &mnt,
        &format!("{} / {} after the crash", case.op, case.point),
    );
    // Everything compressed (a crash during a flush leaves files due at once), then
    // evicted: the fresh mount reads every file through the decompressor.
    admin("flush", &mnt);
    admin("evict", &mnt);
    let mut log = d.log_text();
    d.unmount();
    // A fresh mount, so that no page of the kernel's cache answers: every compressed
    // file is read through the decompressor.
    let d = Daemon::start(&backing, &mnt, OPTS);
    // One path per compressed inode (an empty file's blob has no region to decode).
    let mut compressed: BTreeMap<u64, &String> = BTreeMap::new();
    for p in allowed.keys() {
        if let Ok(m) = fs::metadata(mnt.join(p)) {
            if m.len() > 0 && xattr(&mnt.join(p), "user.nacrith.state") == "compressed" {
                compressed.entry(m.ino()).or_insert(p);
            }
        }
    }
    // Each read on its own, so that a file served without its decoder is named (once
    // more after an evict if it was: a member of a solid group gets its copy from the
    // decode of another).
    let mut not_decoded = Vec::new();
    for p in compressed.values() {
        let decoded = || {
            let before = status_field(&mnt, "regions_decoded");
            let _ = fs::read(mnt.join(p));
            status_field(&mnt, "regions_decoded") != before
        };
        let mut ok = decoded();
        if !ok {
            admin("evict", &mnt);
            ok = decoded();
        }
        if !ok {
            not_decoded.push(p.to_string());
        }
    }
    check(
        &mnt,
        &allowed,
        "after evict (through the decompressor)",
        case,
    );
    assert!(
        not_decoded.is_empty() && compressed.len() >= 2,
        "{} / {}: of {} compressed files, {not_decoded:?} read without decoding:\n{}\nthe mount before (flush, evict):\n{log}",
        case.op,
        case.point,
        compressed.len(),
        xattr(&mnt, "user.nacrith.status")
    );
    log.push_str(&d.log_text());
    d.unmount();
    assert!(
        !log.contains("ERROR"),
        "{} / {}: the remount logged errors:\n{log}",
        case.op,
        case.point
    );
    let (code, text) = fsck(&[], &backing);
    assert_eq!(
        code, 0,
        "{} / {}: fsck after the crash is not clean:\n{text}",
        case.op, case.point
    );
    if case.when == When::InMigration {
        let marker = fs::read_to_string(backing.join("nacrithfs.format")).expect("marker");
        assert_eq!(marker, "nacrithfs 3\n", "{}", case.point);
        for gone in ["index", "index.fjall.tmp"] {
            assert!(
                !backing.join(gone).exists(),
                "{}: {gone} is still there after the move",
                case.point
            );
        }
    }
}

/// Every crash point named in src/: string literals of the form `step.after_what`
/// (passed to `crash::point` directly or through `mark_dirty_first`).
fn points_in_source() -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
    while let Some(p) = stack.pop() {
        for e in fs::read_dir(&p).expect("read src").flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let text = fs::read_to_string(&path).expect("read source");
                for lit in text.split('"').skip(1).step_by(2) {
                    let is_point = lit.split_once(".after_").is_some_and(|(a, b)| {
                        !a.is_empty()
                            && !b.is_empty()
                            && lit
                                .chars()
                                .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
                    });
                    if is_point {
                        found.push(lit.to_string());
                    }
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn every_crash_point_of_every_operation_keeps_old_or_new_content() {
    let _llm = common::llm_lock();
    let cases = cases();
    let covered: Vec<&str> = cases.iter().map(|c| c.point).collect();
    let in_source = points_in_source();
    assert!(in_source.len() >= 20, "found only {in_source:?} in src/");
    let missing: Vec<&String> = in_source
        .iter()
        .filter(|p| !covered.contains(&p.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "crash points without a case: {missing:?}"
    );

    // For work on one operation: `CRASH_ONLY=migrate. cargo test --test crash` runs
    // the cases whose point contains that text (or one of several, comma-separated);
    // the coverage check above still runs.
    let only = std::env::var("CRASH_ONLY").unwrap_or_default();
    template();
    let root = tempfile::tempdir().expect("tempdir");
    let mut rows = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        if !only.split(',').any(|o| case.point.contains(o)) {
            continue;
        }
        let dir = root.path().join(format!("case{i}"));
        fs::create_dir_all(&dir).expect("case dir");
        let t = Instant::now();
        run_case(case, &dir);
        rows.push(format!(
            "{:<28} {:<30} passed  {:5.1} s",
            case.op,
            case.point,
            t.elapsed().as_secs_f64()
        ));
        let _ = fs::remove_dir_all(&dir);
    }
    println!("{:<28} {:<30} result", "operation", "crash point");
    for r in &rows {
        println!("{r}");
    }
    println!("{} crash points, all passed", rows.len());
    let _ = fs::remove_dir_all(template().parent().expect("template parent"));
}
