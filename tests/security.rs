//! Hostile input and a second user (issue 13, SEMANTICS.md "Security model"): what one
//! request, one user or one blob can do to the daemon and to the data of others.

mod common;

use std::fs;

use common::mount::*;
use common::random_bytes;

/// A panic inside a request handler answers that request with EIO, is logged with the
/// inode, and the mount goes on serving (fault injection: NACRITHFS_PANIC_IN).
#[test]
fn a_panic_in_a_request_handler_fails_that_request_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start_env(
        &backing,
        &mnt,
        "idle=3600",
        &[("NACRITHFS_PANIC_IN", "mkdir")],
    );
    fs::write(mnt.join("before.txt"), b"written before\n").expect("write");
    for _ in 0..3 {
        let e = fs::create_dir(mnt.join("sub")).expect_err("mkdir must fail");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    }
    // Everything else still works, in the same session.
    fs::write(mnt.join("after.txt"), b"written after\n").expect("write after the panics");
    assert_eq!(
        fs::read(mnt.join("before.txt")).expect("read"),
        b"written before\n"
    );
    let names: Vec<String> = fs::read_dir(&mnt)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"after.txt".to_string()), "{names:?}");
    // The EIO goes out while the panic unwinds, the log line right after: wait for it.
    let count = |log: &str| {
        log.lines()
            .filter(|l| l.contains("mkdir on inode 1 panicked"))
            .count()
    };
    let start = std::time::Instant::now();
    while count(&d.log_text()) < 3 && start.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let log = d.log_text();
    assert_eq!(count(&log), 3, "one log line per panicked request:\n{log}");
    d.unmount();
}

/// A panic in a compressor (fault injection right after the new blob's temp file is
/// written) leaves the file plaintext and readable, counts a failure, and leaves no temp
/// or blob file behind (they used to stay until the next unclean mount's recovery).
#[test]
fn a_panic_in_a_compression_leaves_the_file_plaintext_and_no_files_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start_env(
        &backing,
        &mnt,
        "idle=0",
        &[("NACRITHFS_PANIC_IN", "compress.after_blob_tmp")],
    );
    let data = b"A line of plain English text, coded by the model and then dropped.\n".repeat(8);
    write_synced(&mnt.join("a.txt"), &data);
    let panicked = |log: &str| log.contains("panicked; it stays uncompressed");
    let start = std::time::Instant::now();
    while !panicked(&d.log_text()) && start.elapsed() < std::time::Duration::from_secs(300) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let log = d.log_text();
    assert!(panicked(&log), "no compression panicked in 300 s:\n{log}");
    assert!(log.contains("fault injection"), "{log}");
    assert_eq!(fs::read(mnt.join("a.txt")).expect("read"), data);
    assert!(status_field(&mnt, "failures") >= 1);
    assert_eq!(status_field(&mnt, "compressed"), 0);
    assert_eq!(status_field(&mnt, "dirty"), 1);
    let left = files_under(&backing, "blobs");
    assert!(left.is_empty(), "left behind: {left:?}");
    d.unmount();
    // Nothing for fsck to find either.
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
}

/// A panic while a coder worker creates its model context fails the job it was woken
/// for, and the worker tries again: it does not die and leave every later job (and the
/// reads and compressions waiting on them) unanswered for good.
#[test]
fn a_panic_creating_a_coder_context_fails_jobs_instead_of_hanging_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start_env(
        &backing,
        &mnt,
        "idle=0,workers=1",
        &[("NACRITHFS_PANIC_IN", "pool.context")],
    );
    let failures_reach = |n: u64| {
        let start = std::time::Instant::now();
        while status_field(&mnt, "failures") < n
            && start.elapsed() < std::time::Duration::from_secs(120)
        {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        status_field(&mnt, "failures")
    };
    let a = b"Plain English text for the model, whose context cannot be made.\n".repeat(8);
    write_synced(&mnt.join("a.txt"), &a);
    assert!(failures_reach(1) >= 1, "{}", d.log_text());
    // The worker is still there: the next file's compression fails too, in its turn.
    let b = b"Another text, written after the first compression failed.\n".repeat(8);
    write_synced(&mnt.join("b.txt"), &b);
    assert!(failures_reach(2) >= 2, "{}", d.log_text());
    let log = d.log_text();
    assert!(log.contains("fault injection"), "{log}");
    assert!(log.contains("creating a coder context panicked"), "{log}");
    assert_eq!(fs::read(mnt.join("a.txt")).expect("read a"), a);
    assert_eq!(fs::read(mnt.join("b.txt")).expect("read b"), b);
    assert_eq!(status_field(&mnt, "compressed"), 0);
    d.unmount();
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
}

/// A fresh volume whose parent (a 0700 temp directory) other users may traverse, so
/// that `nobody` can reach the mount point.
fn volume_other_users_can_reach(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    new_volume(dir)
}

/// Run `args` as the unprivileged user `nobody`; (exit code, stdout+stderr).
fn as_nobody(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(args)
        .output()
        .expect("run setpriv (util-linux)");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `flush` and `evict` are for root and the user who mounted; `status` is for anyone
/// who can read the root. A world-writable root does not change that.
#[test]
fn only_root_and_the_mounter_control_the_daemon() {
    use std::os::unix::fs::PermissionsExt;
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = volume_other_users_can_reach(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600,allow_other");
    fs::set_permissions(&mnt, fs::Permissions::from_mode(0o1777)).expect("chmod 1777");
    fs::write(mnt.join("f.txt"), b"some text\n").expect("write");
    let m = mnt.to_string_lossy().into_owned();
    for cmd in ["evict", "flush"] {
        let (code, text) = as_nobody(&[BIN, cmd, &m]);
        assert_ne!(code, 0, "nobody could {cmd}: {text}");
        assert!(
            text.contains("only root and the user who mounted it"),
            "{cmd} as nobody: {text}"
        );
        // The raw interface says EPERM.
        let (code, text) = as_nobody(&["setfattr", "-n", "user.nacrith.control", "-v", cmd, &m]);
        assert_ne!(code, 0, "{text}");
        assert!(text.contains("Operation not permitted"), "{text}");
    }
    let (code, text) = as_nobody(&[BIN, "status", &m]);
    assert_eq!(code, 0, "status as nobody: {text}");
    assert!(text.contains("files"), "{text}");
    // The census of blobs per backend reads every blob header: not for anyone.
    let (code, text) = as_nobody(&[BIN, "status", &m, "--backends"]);
    assert_ne!(code, 0, "nobody counted blobs per backend: {text}");
    assert!(
        text.contains("only root and the user who mounted may"),
        "{text}"
    );
    // Root still can.
    admin("flush", &mnt);
    let out = std::process::Command::new(BIN)
        .args(["status", &m, "--backends"])
        .output()
        .expect("status --backends");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("blobs per backend"),
        "{text}"
    );
    assert_eq!(
        xattr(&mnt.join("f.txt"), "user.nacrith.state"),
        "compressed"
    );
    d.unmount();
}

fn mode_of(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).expect("stat").permissions().mode() & 0o7777
}

/// The backing directory holds every file's plaintext: another user cannot read it,
/// whatever the mount says; a backing directory others could tamper with is refused.
#[test]
fn the_backing_directory_is_private_and_checked() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = volume_other_users_can_reach(dir.path());
    assert_eq!(mode_of(&backing), 0o755);
    fs::create_dir(&mnt).expect("mkdir mnt");
    // Daemonized (no -f): its log goes to the backing directory.
    let out = std::process::Command::new(BIN)
        .arg(&backing)
        .arg(&mnt)
        .args(["-o", "idle=3600,allow_other"])
        .output()
        .expect("run nacrithfs");
    assert!(out.status.success(), "{out:?}");
    fs::set_permissions(&mnt, fs::Permissions::from_mode(0o1777)).expect("chmod");
    fs::write(mnt.join("secret.txt"), b"the archive's bytes\n").expect("write");
    fs::set_permissions(mnt.join("secret.txt"), fs::Permissions::from_mode(0o644)).expect("chmod");
    assert_eq!(mode_of(&backing), 0o700, "tightened at mount");
    for d in ["blobs", "cache", "index.fjall"] {
        assert_eq!(mode_of(&backing.join(d)), 0o700, "{d}");
    }
    let log = backing.join("nacrithfs.log");
    assert_eq!(mode_of(&log), 0o600, "the log names paths");
    let logged = fs::read_to_string(&log).expect("log");
    assert!(logged.contains("made private"), "{logged}");
    let ino = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(mnt.join("secret.txt")).expect("stat").ino()
    };
    let plain = cache_file(&backing, ino);
    assert_eq!(mode_of(&plain), 0o600);
    // The mount says everyone may read the file; the backing directory says no one else.
    let (code, text) = as_nobody(&["cat", &mnt.join("secret.txt").to_string_lossy()]);
    assert_eq!((code, text.as_str()), (0, "the archive's bytes\n"));
    let (code, text) = as_nobody(&["cat", &plain.to_string_lossy()]);
    assert_ne!(
        code, 0,
        "nobody read the plaintext through the backing directory"
    );
    assert!(text.contains("Permission denied"), "{text}");
    let (code, text) = as_nobody(&["ls", &backing.to_string_lossy()]);
    assert_ne!(code, 0, "{text}");
    let status = std::process::Command::new("umount")
        .arg(&mnt)
        .status()
        .expect("umount");
    assert!(status.success());
    // Wait for the daemon to let go of the index.
    let start = std::time::Instant::now();
    while fsck(&[], &backing).1.contains("in use") {
        assert!(start.elapsed() < std::time::Duration::from_secs(30));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (code, text) = fsck(&[], &backing);
    assert_eq!(code, 0, "{text}");

    // fsck reports a directory others can enter; --repair closes it.
    fs::set_permissions(backing.join("cache"), fs::Permissions::from_mode(0o755)).expect("chmod");
    let (code, text) = fsck(&[], &backing);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("loose-mode"), "{text}");
    let (code, text) = fsck(&["--repair"], &backing);
    assert_eq!(code, 1, "{text}");
    assert_eq!(mode_of(&backing.join("cache")), 0o700);

    // Refused: writable by others; owned by another user; under a directory anyone can
    // write to (no sticky bit). Each with a message that says why.
    let refused = |backing: &std::path::Path, why: &str| {
        let m = dir.path().join("mnt-refused");
        let _ = fs::create_dir(&m);
        let out = std::process::Command::new(BIN)
            .arg(backing)
            .arg(&m)
            .arg("-f")
            .output()
            .expect("run nacrithfs");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{why}: mounted");
        assert!(
            err.contains("backing directory refused") && err.contains(why),
            "{why}: {err}"
        );
    };
    fs::set_permissions(&backing, fs::Permissions::from_mode(0o777)).expect("chmod");
    refused(&backing, "writable by group or others");
    fs::set_permissions(&backing, fs::Permissions::from_mode(0o700)).expect("chmod");
    std::os::unix::fs::chown(&backing, Some(65534), Some(65534)).expect("chown");
    refused(&backing, "owned by uid 65534");
    std::os::unix::fs::chown(&backing, Some(0), Some(0)).expect("chown");
    let open_parent = dir.path().join("open");
    fs::create_dir(&open_parent).expect("mkdir");
    fs::set_permissions(&open_parent, fs::Permissions::from_mode(0o777)).expect("chmod");
    let inner = open_parent.join("backing");
    fs::create_dir(&inner).expect("mkdir");
    refused(&inner, "without the sticky bit");
}

/// A write or fallocate by someone other than root drops setuid (and setgid with group
/// execute), through write-only and read-write handles alike, as on ext4 (a setuid
/// file's write-only handle is a page-cache one, so that the kernel's cached mode drops
/// them too). Root's own writes keep them.
#[test]
fn writes_by_other_users_drop_setuid_and_setgid() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = volume_other_users_can_reach(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600,allow_other,suid");
    let setid = |name: &str| {
        let p = mnt.join(name);
        fs::write(&p, b"#!/bin/sh\necho hi\n").expect("write");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o6777)).expect("chmod 6777");
        assert_eq!(mode_of(&p), 0o6777);
        p.to_string_lossy().into_owned()
    };
    let cases: [(&str, &[&str]); 4] = [
        // dd opens O_WRONLY (a direct-I/O handle, but for setuid and setgid files)
        (
            "direct.sh",
            &[
                "dd",
                "if=/dev/zero",
                "bs=1",
                "count=1",
                "conv=notrunc",
                "status=none",
            ],
        ),
        // O_RDWR: through the page cache
        (
            "cached.sh",
            &[
                "dd",
                "if=/dev/zero",
                "bs=1",
                "count=1",
                "conv=notrunc",
                "status=none",
                "oflag=sync",
            ],
        ),
        ("falloc.sh", &["fallocate", "-l", "65536"]),
        // truncate(2): the kernel asks for the mode change (no KILLPRIV_V2 here)
        ("trunc.sh", &["truncate", "-s", "3"]),
    ];
    for (name, cmd) in cases {
        let path = setid(name);
        let mut args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        if cmd[0] == "dd" {
            args.push(format!("of={path}"));
            if name == "cached.sh" {
                // dd has no O_RDWR flag; a shell's <> opens read-write.
                args = vec!["sh".into(), "-c".into(), format!("printf x 1<>{path}")];
            }
        } else {
            args.push(path.clone());
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, text) = as_nobody(&argv);
        assert_eq!(code, 0, "{name}: {argv:?}: {text}");
        assert_eq!(
            mode_of(std::path::Path::new(&path)),
            0o777,
            "{name}: setuid/setgid survived a write by another user"
        );
    }
    // chown clears them even for root, as on ext4.
    let p = setid("chown.sh");
    std::os::unix::fs::chown(&p, Some(65534), None).expect("chown");
    assert_eq!(
        mode_of(std::path::Path::new(&p)),
        0o777,
        "chown kept setuid/setgid"
    );
    // setgid without group execute is a mandatory-locking mark, not a privilege: kept.
    let p = mnt.join("nox.sh");
    fs::write(&p, b"x").expect("write");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o6766)).expect("chmod");
    let (code, text) = as_nobody(&["sh", "-c", &format!("printf y >> {}", p.display())]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(mode_of(&p), 0o2766);
    // Root keeps them.
    let p = setid("root.sh");
    fs::OpenOptions::new()
        .append(true)
        .open(&p)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"# more\n"))
        .expect("append as root");
    assert_eq!(mode_of(std::path::Path::new(&p)), 0o6777);
    d.unmount();
}

/// 200 blobs with mutated headers (the header CRC recomputed, so the mutation reaches
/// the parser behind it): `nacrith decompress` and `nacrithfs fsck` answer each with an
/// error (or, for a harmless mutation, the right bytes), never a panic.
#[test]
fn mutated_headers_give_clear_errors_never_panics() {
    let _llm = common::llm_lock();
    let fixture = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/format-v1"
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("backing");
    copy_tree(fixture, &backing);
    make_private(&backing);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut refused, mut harmless) = (0, 0);
    // zeros.bin (zstd, no model needed) and gpl-tail.txt (LLM).
    for (blob_name, n, plain) in [("10-5.nc06", 150, None), ("7-2.nc06", 50, Some("cache/7"))] {
        let original = fs::read(fixture.join("blobs").join(blob_name)).expect("fixture blob");
        let header_len = u32::from_le_bytes(original[8..12].try_into().expect("4 bytes")) as usize;
        let expected = match plain {
            Some(p) => fs::read(fixture.join(p)).expect("plaintext"),
            None => vec![0u8; 20000],
        };
        for i in 0..n {
            let mut b = original.clone();
            let r = next();
            match r % 4 {
                // one byte, anywhere in the header behind the magic
                0 | 1 => {
                    let at = 4 + (next() as usize) % (header_len - 8);
                    b[at] = match next() % 4 {
                        0 => 0,
                        1 => 0xff,
                        2 => b[at] ^ 1,
                        _ => next() as u8,
                    };
                }
                // a huge or zero length at a field boundary past the fixed part
                2 => {
                    let at = 12 + (next() as usize) % (header_len - 24);
                    let v = if next() % 2 == 0 { u64::MAX } else { 0 };
                    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
                // the header length itself
                _ => {
                    let v = (next() % (header_len as u64 * 2)) as u32;
                    b[8..12].copy_from_slice(&v.to_le_bytes());
                }
            }
            let hl = (u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) as usize)
                .clamp(8, b.len());
            let crc = crc32fast::hash(&b[..hl - 4]);
            b[hl - 4..hl].copy_from_slice(&crc.to_le_bytes());

            let out = dir.path().join("out");
            let _ = fs::remove_file(&out);
            let input = dir.path().join("in.nc06");
            fs::write(&input, &b).expect("write");
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_nacrith"))
                .arg("decompress")
                .arg(&input)
                .arg("-o")
                .arg(&out)
                .output()
                .expect("run nacrith");
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            assert!(!err.contains("panicked"), "{blob_name} mutation {i}: {err}");
            if o.status.success() {
                assert_eq!(
                    fs::read(&out).expect("output"),
                    expected,
                    "{blob_name} mutation {i}"
                );
                harmless += 1;
            } else {
                assert_eq!(o.status.code(), Some(1), "{blob_name} mutation {i}: {err}");
                assert_eq!(
                    err.trim_end().lines().count(),
                    1,
                    "{blob_name} mutation {i}: {err}"
                );
                refused += 1;
            }
            // The same blob inside a volume: fsck reports it, never panics.
            fs::write(backing.join("blobs").join(blob_name), &b).expect("plant");
            let (code, text) = fsck(&[], &backing);
            assert!(
                code == 0 || code == 4,
                "{blob_name} mutation {i}: fsck exit {code}: {text}"
            );
            assert!(!text.contains("panicked"), "{text}");
        }
        fs::write(backing.join("blobs").join(blob_name), &original).expect("restore");
    }
    println!("200 mutated headers: {refused} refused with one line, {harmless} harmless");
    assert!(
        refused >= 150,
        "only {refused} of 200 mutations were refused"
    );
}

/// Other users looping on `status` do not stall the mount: with eight readers hammering
/// it, file operations go on (a liveness check, not a timing: each must finish at all).
#[test]
fn status_readers_do_not_stall_the_mount() {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = volume_other_users_can_reach(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600,allow_other");
    fs::set_permissions(&mnt, fs::Permissions::from_mode(0o1777)).expect("chmod");
    for i in 0..2000 {
        fs::write(mnt.join(format!("f{i}")), b"x").expect("write");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (stop, reads, m) = (stop.clone(), reads.clone(), mnt.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // As nobody, through the CLI's interface: the xattr on the root.
                    let (code, text) = as_nobody(&[
                        "getfattr",
                        "--absolute-names",
                        "--only-values",
                        "-n",
                        "user.nacrith.status",
                        &m.to_string_lossy(),
                    ]);
                    assert_eq!(code, 0, "{text}");
                    assert!(text.contains("files=2"), "{text}");
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for i in 0..500 {
        fs::write(mnt.join(format!("g{i}")), b"y").expect("create while status is read");
    }
    assert_eq!(fs::read_dir(&mnt).expect("readdir").count(), 2500);
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader");
    }
    assert!(reads.load(Ordering::Relaxed) > 0);
    let status = xattr(&mnt, "user.nacrith.status");
    assert!(status.contains("files=2500\n"), "{status}");
    assert!(status.contains("dirty=2500\n"), "{status}");
    assert!(status.contains("logical_bytes=2500\n"), "{status}");
    d.unmount();
}

/// Peak resident memory of a process (VmHWM), in KiB.
fn peak_rss_kb(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc status")
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmHWM")
}

fn seek(f: &fs::File, offset: i64, whence: i32) -> i64 {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an fd we own; integer arguments only.
    unsafe { libc::lseek(f.as_raw_fd(), offset, whence) }
}

/// Piece `i` of the 2 GiB file: 8 MiB of binary records, a 64 KiB random block repeated
/// with the piece's number stamped in every 4 KiB (not text: on this CPU the model codes
/// a few KB a second, so a 2 GB text would take weeks; text streams through the same
/// windows).
fn record_piece(i: u64) -> Vec<u8> {
    let block = random_bytes(64 << 10, i / 16 + 1);
    let mut piece = block.repeat(128);
    for (k, rec) in piece.chunks_mut(4096).enumerate() {
        rec[..16].copy_from_slice(&[i.to_le_bytes(), (k as u64).to_le_bytes()].concat());
    }
    piece
}

/// Compression streams a window at a time: an 8 GB sparse file and a 2 GB file are
/// compressed (and read back) with the daemon's peak memory under 1 GiB. The sparse
/// file's holes cost nothing in its blob, SEEK_DATA/SEEK_HOLE find them before and after
/// it is decoded, and the decoded copy keeps them as holes.
#[test]
fn huge_files_compress_in_bounded_memory_and_holes_stay_holes() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    const GB8: u64 = 8 << 30;
    const PIECES: u64 = 256; // of 8 MiB: 2 GiB
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    // A clean-copy cache that holds the decoded 8 GB copy (its holes cost no disk).
    let d = Daemon::start(&backing, &mnt, "idle=3600,cache_size=16G");
    let f = fs::File::create(mnt.join("sparse")).expect("create");
    f.set_len(GB8).expect("truncate -s 8G");
    for (at, what) in [(0, &b"head"[..]), (3 << 30, b"middle"), (GB8 - 4, b"tail")] {
        f.write_all_at(what, at).expect("write");
    }
    drop(f);
    let mut big = fs::File::create(mnt.join("records")).expect("create");
    for i in 0..PIECES {
        std::io::Write::write_all(&mut big, &record_piece(i)).expect("write 2 GiB");
    }
    drop(big);
    admin("flush", &mnt);
    for name in ["sparse", "records"] {
        assert_eq!(
            xattr(&mnt.join(name), "user.nacrith.state"),
            "compressed",
            "{name}"
        );
    }
    let stored: u64 = xattr(&mnt.join("sparse"), "user.nacrith.stored_size")
        .parse()
        .expect("stored_size");
    assert!(
        stored < 64 << 10,
        "the 8 GB sparse file's blob is {stored} bytes"
    );
    admin("evict", &mnt);

    // Holes from the blob, before anything is decoded.
    let sparse = fs::File::open(mnt.join("sparse")).expect("open");
    assert_eq!(seek(&sparse, 0, libc::SEEK_HOLE), 4096);
    assert_eq!(seek(&sparse, 4096, libc::SEEK_DATA), 3 << 30);
    assert_eq!(
        seek(&sparse, (3 << 30) + 10, libc::SEEK_HOLE),
        (3 << 30) + 4096
    );
    assert_eq!(
        seek(&sparse, (3 << 30) + 4096, libc::SEEK_DATA),
        (GB8 - 4096) as i64
    );
    assert_eq!(seek(&sparse, GB8 as i64 - 4, libc::SEEK_HOLE), GB8 as i64);
    // Read back through decompression: the islands, and holes where the zeros were.
    let mut buf = [0u8; 6];
    for (at, what) in [(0, &b"head"[..]), (3 << 30, b"middle"), (GB8 - 4, b"tail")] {
        sparse
            .read_exact_at(&mut buf[..what.len()], at)
            .expect("read");
        assert_eq!(&buf[..what.len()], what);
    }
    sparse
        .read_exact_at(&mut buf, 1 << 30)
        .expect("read a hole");
    assert_eq!(buf, [0u8; 6]);
    let mut records = fs::File::open(mnt.join("records")).expect("open");
    let mut piece = vec![0u8; 8 << 20];
    for i in 0..PIECES {
        std::io::Read::read_exact(&mut records, &mut piece).expect("read 2 GiB");
        assert!(
            piece == record_piece(i),
            "piece {i} of the 2 GiB file differs"
        );
    }
    drop(records);
    // The decoded copy of the sparse file is sparse too: same holes, few blocks.
    let copy = cache_file(&backing, sparse.metadata().expect("stat").ino());
    let blocks = fs::metadata(&copy).expect("the decoded copy").blocks();
    assert!(
        blocks < 1024,
        "the decoded 8 GB copy has {blocks} blocks allocated"
    );
    assert_eq!(seek(&sparse, 4096, libc::SEEK_DATA), 3 << 30);
    drop(sparse);

    let rss_kb = peak_rss_kb(d.child.id());
    eprintln!("daemon peak RSS after 10 GB compressed and read back: {rss_kb} kB");
    assert!(rss_kb < 1 << 20, "peak RSS {rss_kb} kB, over 1 GiB");
    d.unmount();
}

/// `(exit code, output)` of a command run as root (setfacl, getfacl).
fn run(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {} (Debian package acl): {e}", args[0]));
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ok(args: &[&str]) -> String {
    let (code, out) = run(args);
    assert_eq!(code, 0, "{args:?}: {out}");
    out
}

/// POSIX ACLs, enforced by the kernel from what the daemon keeps: a named-user entry
/// grants `nobody` what the mode denies, and the mask, a chmod or removing the entry
/// takes it back; a default ACL is inherited (and replaces the umask); an ACL set by
/// someone outside the file's group clears setgid; all of it survives a remount; with
/// `noacl` there are none.
#[test]
fn posix_acls_grant_and_deny_a_second_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = volume_other_users_can_reach(dir.path());
    let mut d = Daemon::start(&backing, &mnt, "idle=3600,allow_other");
    fs::set_permissions(&mnt, fs::Permissions::from_mode(0o755)).expect("chmod root");
    let share = mnt.join("share");
    fs::create_dir(&share).expect("mkdir");
    fs::set_permissions(&share, fs::Permissions::from_mode(0o750)).expect("chmod");
    let s = share.to_string_lossy().to_string();
    let (code, _) = as_nobody(&["ls", &s]);
    assert_ne!(code, 0, "nobody listed a 0750 root-owned directory");

    // A named entry grants what the mode does not.
    ok(&["setfacl", "-m", "u:nobody:rx", &s]);
    let (code, text) = as_nobody(&["ls", &s]);
    assert_eq!(
        code, 0,
        "nobody, granted r-x by the ACL, cannot list: {text}"
    );
    assert_eq!(mode_of(&share), 0o750, "the mask is r-x: the group bits");
    let (code, _) = as_nobody(&["touch", &format!("{s}/by-nobody")]);
    assert_ne!(code, 0, "nobody created a file with r-x");

    // A default ACL: inherited by new files and directories, whatever the umask.
    ok(&["setfacl", "-d", "-m", "u:nobody:rw", &s]);
    // In a child: the umask is the whole test process's.
    ok(&[
        "sh",
        "-c",
        &format!("umask 077 && echo hello > {s}/f && mkdir {s}/sub"),
    ]);
    let f = share.join("f").to_string_lossy().to_string();
    let acl_f = ok(&["getfacl", "-cp", &f]);
    assert!(acl_f.contains("user:nobody:rw-"), "{acl_f}");
    assert_eq!(
        mode_of(&share.join("f")),
        0o660,
        "umask 077 applied over a default ACL"
    );
    let acl_sub = ok(&["getfacl", "-cp", &share.join("sub").to_string_lossy()]);
    assert!(acl_sub.contains("default:user:nobody:rw-"), "{acl_sub}");
    let (code, text) = as_nobody(&["sh", "-c", &format!("echo more >> {f} && cat {f}")]);
    assert_eq!(
        (code, text.as_str()),
        (0, "hello\nmore\n"),
        "nobody, granted rw-"
    );

    // chmod narrows the mask: the named entry stays, with no effect.
    fs::set_permissions(share.join("f"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let (code, _) = as_nobody(&["cat", &f]);
    assert_ne!(code, 0, "nobody read through a --- mask");
    let acl_f = ok(&["getfacl", "-cp", &f]);
    assert!(acl_f.contains("mask::---"), "{acl_f}");
    fs::set_permissions(share.join("f"), fs::Permissions::from_mode(0o640)).expect("chmod");
    let (code, text) = as_nobody(&["cat", &f]);
    assert_eq!(code, 0, "nobody, mask r-- again: {text}");
    // Removing the entry takes the grant back.
    ok(&["setfacl", "-x", "u:nobody", &f]);
    let (code, _) = as_nobody(&["cat", &f]);
    assert_ne!(code, 0, "nobody read after its entry was removed");

    // setgid goes when someone outside the file's group sets its ACL.
    let g = share.join("g");
    fs::write(&g, b"x").expect("create g");
    ok(&["chown", "nobody:root", &g.to_string_lossy()]);
    fs::set_permissions(&g, fs::Permissions::from_mode(0o2770)).expect("chmod g");
    assert_eq!(mode_of(&g), 0o2770);
    let (code, text) = as_nobody(&["setfacl", "-m", "u:root:r", &g.to_string_lossy()]);
    assert_eq!(code, 0, "the owner sets an ACL: {text}");
    assert_eq!(
        mode_of(&g) & 0o7000,
        0,
        "setgid kept after an ACL set by a non-member"
    );

    // Everything is in the index: a remount serves the same ACLs, enforced.
    let before = ok(&["getfacl", "-R", "-p", &s]);
    d.unmount();
    d = Daemon::start(&backing, &mnt, "idle=3600,allow_other");
    assert_eq!(
        ok(&["getfacl", "-R", "-p", &s]),
        before,
        "ACLs after a remount"
    );
    let (code, _) = as_nobody(&["ls", &s]);
    assert_eq!(code, 0, "nobody's r-x on the directory after a remount");
    let (code, _) = as_nobody(&["cat", &f]);
    assert_ne!(code, 0, "nobody's removed entry after a remount");
    d.unmount();

    // -o noacl: none set, none enforced (the mode alone decides).
    let d = Daemon::start(&backing, &mnt, "idle=3600,allow_other,noacl");
    let (code, text) = run(&["setfacl", "-m", "u:nobody:r", &f]);
    assert_ne!(code, 0, "setfacl under noacl: {text}");
    assert!(text.contains("Operation not supported"), "{text}");
    let (code, _) = as_nobody(&["ls", &s]);
    assert_ne!(code, 0, "an ACL enforced under noacl");
    d.unmount();
}

/// What one user's requests can make the daemon hold: an inode's xattrs fit one
/// listxattr and 1 MiB of values (ENOSPC beyond, as on ext4); the daemon's limit on open
/// files is raised from whatever soft limit it was started with to the hard one, so a
/// user holding many files open does not run it out of descriptors.
#[test]
fn one_users_xattrs_and_open_files_are_bounded() {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let mut hard = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill in.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) },
        0
    );
    assert!(hard.rlim_max > 2048, "hard limit {} too low", hard.rlim_max);
    let d = Daemon::start_with(&backing, &mnt, "idle=3600", |c| {
        // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
        unsafe {
            c.pre_exec(move || {
                let low = libc::rlimit {
                    rlim_cur: 256,
                    rlim_max: hard.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &low) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let limits = fs::read_to_string(format!("/proc/{}/limits", d.child.id())).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums[0], nums[1], "soft limit not raised: {line}");

    // 1,000 files held open (more than the 256 the daemon started with), each read.
    // SAFETY: raising this process's own soft limit to its hard one.
    unsafe {
        let mut mine = hard;
        mine.rlim_cur = hard.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &mine);
    }
    let mut open = Vec::new();
    for i in 0..1000 {
        let p = mnt.join(format!("f{i}"));
        fs::write(&p, format!("file {i}\n")).expect("write");
        let mut f = fs::File::open(&p).expect("open");
        let mut s = String::new();
        f.read_to_string(&mut s)
            .unwrap_or_else(|e| panic!("read of f{i} with {i} files open: {e}"));
        assert_eq!(s, format!("file {i}\n"));
        open.push(f);
    }
    drop(open);

    let f = mnt.join("x");
    fs::write(&f, b"x").expect("write");
    // Values: 16 of 64 KiB fit, a 17th does not; replacing one does.
    let big = vec![b'v'; 65536];
    for i in 0..16 {
        set_xattr(&f, &format!("user.v{i}"), &big).unwrap_or_else(|e| panic!("user.v{i}: {e}"));
    }
    let e = set_xattr(&f, "user.v16", &big).expect_err("a 17th 64 KiB value");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    set_xattr(&f, "user.v3", &big[..1000]).expect("replace a value");
    set_xattr(&f, "user.v16", &big[..60000]).expect("what the smaller value left");
    // Names: as many as one listxattr returns, then ENOSPC; all of them listed.
    let g = mnt.join("y");
    fs::write(&g, b"y").expect("write");
    let name = |i: usize| format!("user.{i:0>240}");
    let mut n = 0;
    let e = loop {
        match set_xattr(&g, &name(n), b"") {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 1000, "no limit on names");
    };
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    assert_eq!(n, 65536 / 246, "names that fit 64 KiB");
    assert_eq!(list_xattrs(&g).len(), n);
    // The file with them goes in one piece.
    fs::remove_file(&g).expect("unlink");
    d.unmount();
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
}

/// An open racing an unlink of the file's last name either fails (ENOENT) or gives a
/// handle that works until it is closed, never one that names a deleted inode.
#[test]
fn an_open_racing_the_last_unlink_gets_a_working_handle_or_enoent() {
    use std::io::{Read, Seek, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let stop = Arc::new(AtomicBool::new(false));
    let p = mnt.join("f");
    let churn = {
        let (stop, p) = (stop.clone(), p.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                fs::write(&p, b"data").expect("create");
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) => panic!("unlink: {e}"),
                }
            }
        })
    };
    let (mut opened, mut missing) = (0, 0);
    for _ in 0..3000 {
        match fs::OpenOptions::new().read(true).write(true).open(&p) {
            Ok(mut f) => {
                opened += 1;
                // The handle reads and writes, whatever happened to the name.
                f.write_all(b"more")
                    .expect("write through a handle of an unlinked file");
                f.rewind().expect("seek");
                let mut got = Vec::new();
                f.read_to_end(&mut got)
                    .expect("read through a handle of an unlinked file");
                // (Its creator may still be writing "data" into it, or truncating it.)
                assert!(got.len() <= 4, "{got:?}");
                f.metadata().expect("fstat");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing += 1,
            Err(e) => panic!("open: {e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().expect("churn");
    println!("{opened} opens got a handle, {missing} found no file");
    assert!(
        opened > 0 && missing > 0,
        "{opened} / {missing}: no race was run"
    );
    let log = d.log_text();
    assert!(!log.contains("ERROR"), "{log}");
    d.unmount();
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
}

/// `trusted.*` xattrs are listed to root only, as ext4 lists them to CAP_SYS_ADMIN; other
/// names to anyone who may read the file.
#[test]
fn trusted_xattr_names_are_listed_to_root_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = volume_other_users_can_reach(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600,allow_other");
    let f = mnt.join("f");
    fs::write(&f, b"x").expect("write");
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod");
    set_xattr(&f, "trusted.secret", b"1").expect("trusted.");
    set_xattr(&f, "user.public", b"2").expect("user.");
    let mut names = list_xattrs(&f);
    names.sort();
    assert_eq!(names, ["trusted.secret", "user.public"]);
    let (code, text) = as_nobody(&[
        "getfattr",
        "--absolute-names",
        "-d",
        "-m",
        "-",
        &f.to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("user.public"), "{text}");
    assert!(
        !text.contains("trusted"),
        "nobody sees trusted names: {text}"
    );
    d.unmount();
}
