//! Mounting and unmounting. As root the mount is made here, with the type
//! `fuse.nacrithfs` (what /proc/mounts, findmnt and fstab expect); otherwise through
//! fusermount3 with the same subtype.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use fuser::{Config, MountOption, Session, SessionACL};

use super::fuse::NacrithFs;
use super::options::FsOptions;

/// FUSE request threads: enough that slow requests (fsyncs, large writes the backing
/// filesystem throttles) do not hold up lookups and reads of cached files. Measured by
/// scripts/bench-stall: with 4, eight writers pushed stat(2) to 1.3 ms median and 555 ms
/// worst; with 16, 27 µs and 0.2 ms (README).
const FUSE_THREADS: usize = 16;

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

pub fn mount(
    fs: NacrithFs,
    fsname: &str,
    mountpoint: &Path,
    opts: &FsOptions,
) -> io::Result<Session<NacrithFs>> {
    let acl = if opts.allow_other {
        SessionACL::All
    } else if opts.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    let mut config = Config::default();
    config.acl = acl;
    config.n_threads = Some(FUSE_THREADS);
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        let mut mo = vec![
            MountOption::FSName(fsname.to_string()),
            MountOption::Subtype("nacrithfs".into()),
            MountOption::DefaultPermissions,
        ];
        if opts.read_only {
            mo.push(MountOption::RO);
        }
        mo.extend(opts.kernel.iter().map(|k| MountOption::CUSTOM(k.clone())));
        config.mount_options = mo;
        return Session::new(fs, mountpoint, &config);
    }
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| io::Error::new(e.kind(), format!("/dev/fuse: {e}")))?;
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    // Permission checks are the kernel's: without default_permissions a FUSE
    // filesystem must do them itself, and this one does not.
    let mut data = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions",
        dev.as_raw_fd()
    );
    if opts.allow_other || opts.allow_root {
        data.push_str(",allow_other");
    }
    let mut flags: libc::c_ulong = 0;
    let has = |k: &str| opts.kernel.iter().any(|o| o == k);
    if !has("suid") {
        flags |= libc::MS_NOSUID;
    }
    if !has("dev") {
        flags |= libc::MS_NODEV;
    }
    for (name, flag) in [
        ("noexec", libc::MS_NOEXEC),
        ("noatime", libc::MS_NOATIME),
        ("nodiratime", libc::MS_NODIRATIME),
        ("dirsync", libc::MS_DIRSYNC),
        ("sync", libc::MS_SYNCHRONOUS),
    ] {
        if has(name) {
            flags |= flag;
        }
    }
    if opts.read_only {
        flags |= libc::MS_RDONLY;
    }
    let src = cstr(fsname.as_bytes())?;
    let target = cstr(mountpoint.as_os_str().as_bytes())?;
    let fstype = cstr(b"fuse.nacrithfs")?;
    let data = cstr(data.as_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Session::from_fd(fs, dev.into(), acl, config).inspect_err(|_| unmount(mountpoint))
}

/// Unmount; if busy, detach lazily (the daemon exits when the last user lets go).
pub fn unmount(mountpoint: &Path) {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        let r = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(mountpoint)
            .status();
        if !r.is_ok_and(|s| s.success()) {
            log::error!("fusermount3 -u {} failed", mountpoint.display());
        }
        return;
    }
    let Ok(target) = cstr(mountpoint.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
        let e = io::Error::last_os_error();
        log::warn!("unmount {}: {e}; detaching lazily", mountpoint.display());
        // SAFETY: as above.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// `mount -o remount,ro|rw MOUNTPOINT` (mount(8) hands it to this helper): change a live
/// nacrithfs mount in place, as root. Read-only: the daemon is told to pause (no
/// compression commits, evictions or deletions; everything pending committed and the
/// index flushed), then the kernel makes the mount read-only. Read-write (refused for a
/// daemon started `-o ro`): the kernel, then the daemon resumes. Flags the mount has
/// (nosuid, nodev, ...) are kept; flags given with the remount are added; other options
/// (idle=, cache_size=, ...) are not changed by a remount (mount(8) passes fstab's).
pub fn remount(mountpoint: &Path, opts: &FsOptions) -> Result<(), String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|e| e.to_string())?;
    let wanted = mountpoint.as_os_str().as_bytes();
    let is_ours = mounts.lines().any(|l| {
        let mut f = l.split(' ');
        let (_, at, fstype) = (f.next(), f.next(), f.next());
        at.map(unescape_mount_path).as_deref() == Some(wanted) && fstype == Some("fuse.nacrithfs")
    });
    if !is_ours {
        return Err(format!(
            "{} is not a nacrithfs mount: nothing to remount",
            mountpoint.display()
        ));
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("remount needs root (mount(2) with MS_REMOUNT)".into());
    }
    let path = cstr(wanted).map_err(|e| e.to_string())?;
    let s =
        crate::store::statvfs(mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let mut flags: libc::c_ulong = libc::MS_REMOUNT;
    for (st, ms) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
        (libc::ST_SYNCHRONOUS, libc::MS_SYNCHRONOUS),
        (libc::ST_MANDLOCK, libc::MS_MANDLOCK),
    ] {
        if s.f_flag & st != 0 {
            flags |= ms;
        }
    }
    for (name, ms) in [
        ("nosuid", libc::MS_NOSUID),
        ("nodev", libc::MS_NODEV),
        ("noexec", libc::MS_NOEXEC),
        ("noatime", libc::MS_NOATIME),
        ("nodiratime", libc::MS_NODIRATIME),
    ] {
        if opts.kernel.iter().any(|k| k == name) {
            flags |= ms;
        }
    }
    let kernel = |flags: libc::c_ulong| -> Result<(), String> {
        // SAFETY: a valid NUL-terminated target; the other pointers may be null for a
        // remount.
        let r = unsafe {
            libc::mount(
                std::ptr::null(),
                path.as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(format!(
                "remount of {}: {}",
                mountpoint.display(),
                io::Error::last_os_error()
            ));
        }
        Ok(())
    };
    if opts.read_only {
        crate::admin::control(mountpoint, "pause")?;
        if let Err(e) = kernel(flags | libc::MS_RDONLY) {
            // Still writable: let the daemon carry on.
            let _ = crate::admin::control(mountpoint, "resume");
            return Err(e);
        }
    } else {
        // A daemon started with `-o ro` serves a private copy of the index: what it
        // accepted read-write would be lost at unmount. Asked first (status is readable
        // on a read-only mount; the daemon refuses `resume` as well).
        if crate::admin::Status::read(mountpoint)?.get("read_only") != 0 {
            return Err(format!(
                "{} was mounted with -o ro and stays read-only: unmount it and mount it read-write",
                mountpoint.display()
            ));
        }
        kernel(flags)?;
        if let Err(e) = crate::admin::control(mountpoint, "resume") {
            let _ = kernel(flags | libc::MS_RDONLY);
            return Err(e);
        }
    }
    Ok(())
}

/// A path as /proc/mounts writes it: space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}
