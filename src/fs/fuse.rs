//! The FUSE adapter: kernel requests → [`Core`] calls → replies. Nothing here decides
//! semantics. Requests that need a compressed file's plaintext are answered later, from
//! the decompressor thread, so the FUSE threads never wait on the model.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::core::{Attr, Core, Opened};
use crate::store::Kind;

/// How long the kernel may cache a file's attributes: a second, since `st_blocks`
/// changes behind the kernel's back when the file is compressed or evicted.
const TTL: Duration = Duration::from_secs(1);
/// How long the kernel may trust a name it looked up (a dentry). Names change only
/// through this mount (a backing directory has one daemon, and nothing in it renames or
/// removes a name on its own), and the kernel updates its dentries for every change it
/// sends, so there is nothing to expire. With a second, each rename or unlink of a name
/// looked up more than a second before cost one more LOOKUP round trip: bench-meta's
/// rename at 10^5 files (bindfs's too, with libfuse's default of a second) was 1.3-1.5x
/// its cost at 10^4 only because its phases outlast the second. A file made by `create`
/// gets one TTL for both (fuser), the attributes' second.
const ENTRY_TTL: Duration = Duration::from_secs(3600);

pub struct NacrithFs {
    pub core: Arc<Core>,
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let i = &a.inode;
    FileAttr {
        ino: INodeNo(a.ino),
        size: if i.kind == Kind::Dir { 4096 } else { i.size },
        // What `du` shows: the blocks the stored form takes on the backing filesystem
        // (the blob once compressed, in whole blocks as the disk holds it).
        blocks: match i.kind {
            Kind::File => crate::store::tally::stored_disk(i).div_ceil(512),
            Kind::Dir => 8,
            _ => 0,
        },
        atime: i.atime,
        mtime: i.mtime,
        ctime: i.ctime,
        crtime: i.crtime,
        kind: file_type(i.kind),
        perm: i.perm,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> Option<SystemTime> {
    match t {
        TimeOrNow::SpecificTime(t) => Some(t),
        TimeOrNow::Now => None,
    }
}

fn fopen_flags(o: &Opened) -> FopenFlags {
    if o.direct_io {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}

fn reply_entry(reply: ReplyEntry, r: Result<Attr, i32>) {
    match r {
        Ok(a) => reply.entry_with_ttls(&TTL, &ENTRY_TTL, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), i32>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_xattr(reply: ReplyXattr, r: Result<Vec<u8>, i32>, size: u32) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}

/// The panic boundary of every request: a panic answers that request with EIO (the
/// reply's drop sends it), is logged with the inode, and the session goes on serving.
fn guarded(op: &str, ino: u64, f: impl FnOnce()) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::crash::panic_point(op);
        f()
    }));
    if let Err(p) = r {
        let why = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        log::error!("{op} on inode {ino} panicked ({why}); answered EIO, the mount goes on");
    }
}

impl Filesystem for NacrithFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Larger writes: fewer round trips on the plaintext path.
        let _ = config.set_max_write(1 << 20);
        // Direct I/O only with it (see `Opened::direct_io`); kernels before 6.6 lack it.
        let granted = config
            .add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
            .is_ok();
        if !granted {
            log::info!("this kernel lacks FUSE_DIRECT_IO_ALLOW_MMAP: every handle uses the page cache (slower writes; no stream_reads)");
        }
        self.core
            .direct_io_ok
            .store(granted, std::sync::atomic::Ordering::Relaxed);
        // POSIX ACLs: the kernel checks them (it asks for the xattrs) and no longer
        // applies the umask itself: a default ACL replaces it (`Core::mknod`).
        if self.core.opts.acl {
            let granted = config
                .add_capabilities(InitFlags::FUSE_DONT_MASK | InitFlags::FUSE_POSIX_ACL)
                .is_ok();
            if !granted {
                log::warn!("this kernel lacks FUSE_POSIX_ACL: no ACLs on this mount");
            }
            self.core
                .acl
                .store(granted, std::sync::atomic::Ordering::Relaxed);
        }
        // File handles (name_to_handle_at, NFS export): the kernel then looks inodes up
        // by number ("." and ".." lookups, see `Core::lookup`).
        if config
            .add_capabilities(InitFlags::FUSE_EXPORT_SUPPORT)
            .is_err()
        {
            log::info!("this kernel lacks FUSE_EXPORT_SUPPORT: no file handles (NFS export)");
        }
        Ok(())
    }

    /// No ioctls: ENOTTY, as ext4 answers one it does not know (fuser's default logs a
    /// warning per call, and every Python open(2) asks whether the file is a tty).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn destroy(&mut self) {
        // (Its result is the daemon's to act on, after the session: see serve.)
        let _ = self.core.shutdown();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guarded("lookup", parent.0, || {
            reply_entry(reply, self.core.lookup(parent.0, name.as_bytes()));
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        guarded("getattr", ino.0, || match self.core.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        guarded("setattr", ino.0, || {
            let core = self.core.clone();
            let attempt = {
                let core = self.core.clone();
                move || {
                    core.setattr(
                        ino.0,
                        mode,
                        uid,
                        gid,
                        size,
                        atime.map(time),
                        mtime.map(time),
                        ctime,
                    )
                }
            };
            let run = move |reply: ReplyAttr| match attempt() {
                Ok(a) => reply.attr(&TTL, &file_attr(&a)),
                // The plaintext went away meanwhile (a clean copy removed from under the
                // index, now marked evicted): once more, after decoding it again.
                Err(libc::ESTALE) => {
                    let again = attempt.clone();
                    core.with_plain(
                        ino.0,
                        Box::new(move |r| match r.and_then(|()| again()) {
                            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
                            Err(libc::ESTALE) => reply.error(Errno::EIO),
                            Err(e) => reply.error(errno(e)),
                        }),
                    );
                }
                Err(e) => reply.error(errno(e)),
            };
            if size.is_some_and(|s| s > 0) {
                // Truncating to a non-zero size needs the plaintext.
                self.core.with_plain(
                    ino.0,
                    Box::new(move |r| match r {
                        Ok(()) => run(reply),
                        Err(e) => reply.error(errno(e)),
                    }),
                );
            } else {
                run(reply);
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        guarded("readlink", ino.0, || match self.core.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        guarded("mknod", parent.0, || {
            let r = self.core.mknod(
                parent.0,
                name.as_bytes(),
                mode,
                umask,
                rdev,
                req.uid(),
                req.gid(),
                None,
            );
            reply_entry(reply, r);
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        guarded("mkdir", parent.0, || {
            let r = self.core.mknod(
                parent.0,
                name.as_bytes(),
                (mode & 0o7777) | libc::S_IFDIR,
                umask,
                0,
                req.uid(),
                req.gid(),
                None,
            );
            reply_entry(reply, r);
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("unlink", parent.0, || {
            reply_empty(reply, self.core.remove(parent.0, name.as_bytes(), false));
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("rmdir", parent.0, || {
            reply_empty(reply, self.core.remove(parent.0, name.as_bytes(), true));
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        guarded("symlink", parent.0, || {
            let r = self.core.mknod(
                parent.0,
                link_name.as_bytes(),
                libc::S_IFLNK | 0o777,
                0,
                0,
                req.uid(),
                req.gid(),
                Some(target.as_os_str().as_bytes()),
            );
            reply_entry(reply, r);
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        guarded("rename", parent.0, || {
            let r = self.core.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags.bits(),
            );
            reply_empty(reply, r);
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        guarded("link", ino.0, || {
            reply_entry(
                reply,
                self.core.link(ino.0, newparent.0, newname.as_bytes()),
            );
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guarded("open", ino.0, || match self.core.open(ino.0, flags.0) {
            Ok(o) => reply.opened(FileHandle(o.fh), fopen_flags(&o)),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        guarded("read", ino.0, || {
            // A short answer is right only for a read(2) on a streaming handle. The kernel
            // sends a lock owner with direct reads and never with page-cache reads, which an
            // mmap of that same handle makes; a short answer to those would mean the file
            // ends there. (tests/fs.rs maps a streaming handle to hold the kernel to this.)
            let short = lock_owner.is_some() && self.core.streams(fh.0);
            read_when_ready(self.core.clone(), ino.0, offset, size, short, reply, 3);
        });
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // Root stands for CAP_FSETID (the request does not carry capabilities).
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) || req.uid() != 0;
        guarded("write", ino.0, || {
            // Fast path: the plaintext is here (the common case), write without copying.
            match self.core.write(ino.0, fh.0, offset, data, kill) {
                Ok(n) => return reply.written(n),
                Err(libc::ESTALE) => {}
                Err(e) => return reply.error(errno(e)),
            }
            let core = self.core.clone();
            let data = data.to_vec();
            self.core.with_plain(
                ino.0,
                Box::new(move |r| {
                    match r.and_then(|()| core.write(ino.0, fh.0, offset, &data, kill)) {
                        Ok(n) => reply.written(n),
                        Err(libc::ESTALE) => reply.error(Errno::EIO),
                        Err(e) => reply.error(errno(e)),
                    }
                }),
            );
        });
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        guarded("flush", ino.0, || {
            reply_empty(reply, self.core.closed(ino.0));
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        guarded("release", 0, || {
            let writer = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
            reply_empty(reply, self.core.release(fh.0, writer));
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        guarded("fsync", ino.0, || {
            reply_empty(reply, self.core.fsync(ino.0, datasync));
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        guarded("opendir", ino.0, || match self.core.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        // The last handle of a directory removed while open deletes its inode.
        guarded("releasedir", 0, || {
            reply_empty(reply, self.core.release(fh.0, false))
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        // The reply buffer (the kernel's, usually 4 KiB: ~100 entries of short names)
        // is filled from the index a few entries at a time, so that no more entries are
        // read than are sent (each costs an index read).
        const CHUNK: usize = 48;
        guarded("readdir", ino.0, || {
            let mut offset = offset;
            loop {
                let entries = match self.core.readdir(ino.0, offset, CHUNK) {
                    Ok(e) => e,
                    Err(e) => return reply.error(errno(e)),
                };
                let n = entries.len();
                for (next, child, kind, name) in entries {
                    if reply.add(
                        INodeNo(child),
                        next,
                        file_type(kind),
                        OsStr::from_bytes(&name),
                    ) {
                        return reply.ok();
                    }
                    offset = next;
                }
                if n < CHUNK {
                    return reply.ok();
                }
            }
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        guarded("lseek", ino.0, || {
            match self.core.lseek(ino.0, offset, whence) {
                Ok(o) => reply.offset(o),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        guarded("fsyncdir", 0, || {
            reply_empty(reply, self.core.fsyncdir());
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        guarded("statfs", 0, || match self.core.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        guarded("setxattr", ino.0, || {
            reply_empty(
                reply,
                self.core
                    .setxattr(ino.0, name.as_bytes(), value, flags, caller(req)),
            );
        });
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        guarded("getxattr", ino.0, || {
            let name = name.as_bytes();
            if ino.0 == crate::store::ROOT_INO && name == crate::fs::core::XATTR_BACKENDS {
                return reply_xattr(reply, self.core.backends(caller(req)), size);
            }
            reply_xattr(reply, self.core.getxattr(ino.0, name), size);
        });
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guarded("listxattr", ino.0, || {
            // trusted.* names are listed to root only, as ext4 lists them to
            // CAP_SYS_ADMIN (a FUSE request does not carry capabilities).
            reply_xattr(reply, self.core.listxattr(ino.0, req.uid() == 0), size);
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("removexattr", ino.0, || {
            reply_empty(reply, self.core.removexattr(ino.0, name.as_bytes()));
        });
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        guarded("access", ino.0, || {
            // Permission checks are the kernel's (default_permissions is always on).
            reply_empty(reply, self.core.getattr(ino.0).map(|_| ()));
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        guarded("create", parent.0, || {
            let mode = (mode & 0o7777) | libc::S_IFREG;
            let r = self
                .core
                .mknod(
                    parent.0,
                    name.as_bytes(),
                    mode,
                    umask,
                    0,
                    req.uid(),
                    req.gid(),
                    None,
                )
                .and_then(|a| Ok((self.core.open(a.ino, flags)?, a)));
            match r {
                Ok((o, a)) => reply.created(
                    &TTL,
                    &file_attr(&a),
                    Generation(0),
                    FileHandle(o.fh),
                    fopen_flags(&o),
                ),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let kill = req.uid() != 0;
        guarded("fallocate", ino.0, || {
            let core = self.core.clone();
            self.core.with_plain(
                ino.0,
                Box::new(move |r| {
                    match r.and_then(|()| core.fallocate(ino.0, offset, length, mode, kill)) {
                        // The plaintext went away meanwhile (see setattr): once more.
                        Err(libc::ESTALE) => {
                            let c = core.clone();
                            core.with_plain(
                                ino.0,
                                Box::new(move |r| {
                                    let r = r.and_then(|()| {
                                        c.fallocate(ino.0, offset, length, mode, kill)
                                    });
                                    reply_empty(
                                        reply,
                                        r.map_err(
                                            |e| if e == libc::ESTALE { libc::EIO } else { e },
                                        ),
                                    )
                                }),
                            );
                        }
                        r => reply_empty(reply, r),
                    }
                }),
            );
        });
    }
}

/// Answer a read once its bytes are decoded: a compressed file is decoded only as far as
/// the read (and read-ahead) needs. If the bytes went away between the wake-up and the
/// read (the file was rewritten), ask again, a few times.
fn read_when_ready(
    core: Arc<Core>,
    ino: u64,
    offset: u64,
    size: u32,
    short: bool,
    reply: ReplyData,
    tries: u32,
) {
    // A short read waits for its first byte only.
    let wanted = if short { size.min(1) } else { size };
    let range = offset..offset.saturating_add(wanted as u64);
    let c = core.clone();
    core.with_range(
        ino,
        Some(range),
        Box::new(
            move |r| match r.and_then(|()| c.read(ino, offset, size, short)) {
                Ok(d) => reply.data(&d),
                Err(libc::ESTALE) if tries > 0 => {
                    read_when_ready(c, ino, offset, size, short, reply, tries - 1)
                }
                Err(libc::ESTALE) => reply.error(Errno::EIO),
                Err(e) => reply.error(errno(e)),
            },
        ),
    );
}

fn caller(req: &Request) -> crate::fs::core::Caller {
    crate::fs::core::Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}
