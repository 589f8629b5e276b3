//! Mounting the real daemon in tests: a foreground `nacrithfs` per mount, admin commands,
//! xattrs, durable writes.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_nacrithfs");

/// A fresh volume under `dir`: an empty backing directory (created) and the mountpoint
/// path (the daemon creates it).
pub fn new_volume(dir: &Path) -> (PathBuf, PathBuf) {
    let (backing, mnt) = (dir.join("backing"), dir.join("mnt"));
    fs::create_dir(&backing).expect("backing");
    (backing, mnt)
}

pub fn is_mounted(mnt: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let needle = format!(" {} fuse.nacrithfs ", mnt.display());
    mounts.contains(&needle)
}

/// A daemon serving BACKING at MNT in the foreground (so the test owns its pid).
pub struct Daemon {
    pub child: Child,
    pub mnt: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(backing: &Path, mnt: &Path, opts: &str) -> Daemon {
        Daemon::start_env(backing, mnt, opts, &[])
    }

    /// The same, with extra environment for the daemon (fault-injection hooks).
    pub fn start_env(backing: &Path, mnt: &Path, opts: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(backing, mnt, opts, |c| {
            c.envs(env.iter().copied());
        })
    }

    /// The same, with the command prepared further by `prep` before it is spawned.
    pub fn start_with(
        backing: &Path,
        mnt: &Path,
        opts: &str,
        prep: impl FnOnce(&mut Command),
    ) -> Daemon {
        fs::create_dir_all(mnt).expect("create mount point");
        let log = backing.with_extension("daemon.log");
        let logf = File::create(&log).expect("daemon log");
        let mut cmd = Command::new(BIN);
        cmd.arg(backing)
            .arg(mnt)
            .arg("-f")
            .args(["-o", opts])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        prep(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let mut d = Daemon {
            child,
            mnt: mnt.to_path_buf(),
            log,
        };
        let start = Instant::now();
        while !is_mounted(mnt) {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!(
                    "nacrithfs exited ({status}) before mounting:\n{}",
                    fs::read_to_string(&d.log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "not mounted after 60 s:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_exit(&mut self, why: &str) {
        let start = Instant::now();
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "daemon did not exit after {why}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn unmount(mut self) {
        let out = Command::new("umount")
            .arg(&self.mnt)
            .output()
            .expect("umount");
        assert!(
            out.status.success(),
            "umount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_exit("umount");
        assert!(!is_mounted(&self.mnt));
    }

    /// kill -9, then clear the dead mount the way an admin would.
    pub fn kill9(mut self) {
        // A daemon that died at a crash point is already reaped: its pid is not ours.
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        }
        let _ = self.child.wait();
        let out = Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .output()
            .expect("umount -l");
        assert!(
            out.status.success(),
            "umount -l: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn xattr(path: &Path, name: &str) -> String {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path");
    let n = CString::new(name).expect("name");
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid strings and buffer.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(
        r >= 0,
        "getxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    buf.truncate(r as usize);
    String::from_utf8(buf).expect("utf-8 xattr")
}

/// setxattr(2) of `name` on `path`, its error as the kernel gave it.
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path");
    let n = CString::new(name).expect("name");
    // SAFETY: valid NUL-terminated strings and a value of the stated length.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// listxattr(2) of `path`: the names.
pub fn list_xattrs(path: &Path) -> Vec<String> {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path");
    let mut buf = vec![0u8; 65536];
    // SAFETY: a valid string and buffer.
    let r = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(
        r >= 0,
        "listxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    buf.truncate(r as usize);
    buf.split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

pub fn admin(cmd: &str, mnt: &Path) -> Output {
    let out = Command::new(BIN)
        .arg(cmd)
        .arg(mnt)
        .output()
        .expect("run nacrithfs");
    assert!(
        out.status.success(),
        "nacrithfs {cmd} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn write_synced(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync file");
    drop(f);
    File::open(path.parent().expect("parent"))
        .and_then(|d| d.sync_all())
        .expect("fsync dir");
}

/// Run an admin command without asserting success.
pub fn admin_raw(cmd: &str, mnt: &Path) -> Output {
    Command::new(BIN)
        .arg(cmd)
        .arg(mnt)
        .output()
        .expect("run nacrithfs")
}

/// A status field of a mount, from `user.nacrith.status` on its root.
pub fn status_field(mnt: &Path, key: &str) -> u64 {
    let s = xattr(mnt, "user.nacrith.status");
    s.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("status has no {key}:\n{s}")) as u64
}

/// Copy a directory tree (the committed fixtures are never mounted in place).
pub fn copy_tree(from: &Path, to: &Path) {
    let out = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .expect("cp");
    assert!(
        out.status.success(),
        "cp -a {} {}: {}",
        from.display(),
        to.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The backing directory and its directories 0700, as a mount makes them (git keeps the
/// committed fixture's directories 0755).
pub fn make_private(backing: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for d in ["", "blobs", "cache", "index", "index.fjall"] {
        if backing.join(d).exists() {
            fs::set_permissions(backing.join(d), fs::Permissions::from_mode(0o700)).expect("chmod");
        }
    }
}

/// `nacrithfs fsck BACKING ARGS...`: (exit code, stdout and stderr).
pub fn fsck(args: &[&str], backing: &Path) -> (i32, String) {
    let (status, text) = fsck_env(args, backing, &[]);
    (status.code().unwrap_or(-1), text)
}

/// The same with extra environment (fault injection); the whole exit status, so a
/// death by signal shows.
pub fn fsck_env(
    args: &[&str],
    backing: &Path,
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String) {
    offline("fsck", args, backing, env)
}

/// `nacrithfs CMD BACKING ARGS...` (an offline command: fsck, recode) with extra
/// environment: (exit status, stdout and stderr).
pub fn offline(
    cmd: &str,
    args: &[&str],
    backing: &Path,
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String) {
    let out = Command::new(BIN)
        .arg(cmd)
        .arg(backing)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run nacrithfs {cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

/// Where the daemon keeps inode `ino`'s plaintext, as the volume's format says:
/// `cache/<ino / 4096, 6 hex digits>/<ino>` (format 4), `cache/<xx>/<ino>` (formats 2
/// and 3, `<xx>` the low byte in hex), or `cache/<ino>` (format 1, "3 flat").
pub fn cache_file(backing: &Path, ino: u64) -> PathBuf {
    let format = fs::read_to_string(backing.join("nacrithfs.format")).unwrap_or_default();
    let cache = backing.join("cache");
    match format.trim() {
        "nacrithfs 4" => cache.join(format!("{:06x}", ino >> 12)),
        "nacrithfs 3" | "nacrithfs 2" => cache.join(format!("{:02x}", ino % 256)),
        _ => cache,
    }
    .join(ino.to_string())
}

/// Every file under `blobs/` or `cache/` (`top`), in either layout.
pub fn files_under(backing: &Path, top: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![backing.join(top)];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.expect("entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Make every LLM blob under `backing` look coded on another backend: `from` in its
/// header's backend tag becomes `to` (same length, so the blob's size, which the index
/// records, is unchanged), written in place (hard links of one blob see it once).
/// Returns the blob files changed (distinct inodes).
pub fn forge_backend(backing: &Path, from: &str, to: &str) -> usize {
    use nacrithfs::codec::container::Header;
    use nacrithfs::codec::source::FileSource;
    use std::os::unix::fs::{FileExt, MetadataExt};
    assert_eq!(from.len(), to.len(), "a forged tag keeps its length");
    let mut seen = std::collections::HashSet::new();
    for path in files_under(backing, "blobs") {
        let src = FileSource::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (mut header, len) =
            Header::read_from(&src).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if !header.has_llm_segments() || !header.backend_tag.contains(from) {
            continue;
        }
        header.backend_tag = header.backend_tag.replace(from, to);
        let bytes = header.to_bytes();
        assert_eq!(
            bytes.len(),
            len,
            "{}: the header changed length",
            path.display()
        );
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open blob");
        f.write_all_at(&bytes, 0).expect("write header");
        f.sync_all().expect("fsync blob");
        seen.insert(f.metadata().expect("stat").ino());
    }
    seen.len()
}

/// Backend tags of the LLM blobs under `backing`, one per distinct blob file.
pub fn blob_backends(backing: &Path) -> Vec<String> {
    use nacrithfs::codec::container::Header;
    use nacrithfs::codec::source::FileSource;
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut tags = Vec::new();
    for path in files_under(backing, "blobs") {
        let src = FileSource::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let ino = src.file().metadata().expect("stat").ino();
        let (header, _) =
            Header::read_from(&src).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if header.has_llm_segments() && seen.insert(ino) {
            tags.push(header.backend_tag);
        }
    }
    tags.sort();
    tags
}

/// `nacrithfs recode BACKING ARGS...` with extra environment.
pub fn recode_env(
    args: &[&str],
    backing: &Path,
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String) {
    offline("recode", args, backing, env)
}

pub fn recode(args: &[&str], backing: &Path) -> (i32, String) {
    let (status, text) = recode_env(args, backing, &[]);
    (status.code().unwrap_or(-1), text)
}
