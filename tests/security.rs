//! Hostile input and a second user (issue 13, SEMANTICS.md "Security model"): what one
//! request, one user or one blob can do to the daemon and to the data of others.

mod common;

use std::fs;

use common::mount::*;

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
    let log = d.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("mkdir on inode 1 panicked"))
        .count();
    assert_eq!(lines, 3, "one log line per panicked request:\n{log}");
    d.unmount();
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
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let (backing, mnt) = new_volume(dir.path());
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
    // Root still can.
    admin("flush", &mnt);
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
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let (backing, mnt) = new_volume(dir.path());
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
    for d in ["blobs", "cache", "index"] {
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
    let plain = backing.join(format!("cache/{ino}"));
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
