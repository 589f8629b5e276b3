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

/// FUSE request threads: enough that a slow request (an fsync, a large write) does not
/// hold up lookups and reads of cached files.
const FUSE_THREADS: usize = 4;

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
