//! Namespace operations: lookup, create, link, unlink, rename, readdir.

use super::*;
use crate::fs::acl;

impl Core {
    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        // The kernel asks for "." and ".." only to turn a file handle back into a dentry
        // (open_by_handle_at, knfsd; FUSE_EXPORT_SUPPORT): "." of any inode by its
        // number, ".." of a directory. Inode numbers are persistent and never reused, so
        // a handle stays valid across remounts for as long as its file exists.
        if name == b"." {
            return self.getattr(parent);
        }
        if name == b".." {
            return self.parent_dir(parent);
        }
        self.dir(parent)?;
        if let Ok(a) = self.lookup_once(parent, name)? {
            return Ok(a);
        }
        // The entry named an inode gone by the time it was read: a rename over the name
        // or an unlink committed between the two reads, made without the lock (a
        // reader may even see a batch half applied). Under the lock no commit is in
        // progress, so a dangling entry then is real damage.
        let _st = self.lock();
        match self.lookup_once(parent, name)? {
            Ok(a) => Ok(a),
            Err(ino) => {
                log::error!(
                    "directory {parent}: entry {:?} points to missing inode {ino}; run `nacrithfs fsck`",
                    String::from_utf8_lossy(name)
                );
                Err(libc::EIO)
            }
        }
    }

    /// One read of `name` in `parent` and of its inode: Err(ino) if the entry names an
    /// inode that is not there.
    fn lookup_once(&self, parent: u64, name: &[u8]) -> FsResult<Result<Attr, u64>> {
        let (ino, _) = self
            .store
            .lookup(parent, name)
            .map_err(store_err)?
            .ok_or(libc::ENOENT)?;
        match self.get(ino) {
            Ok(inode) => Ok(Ok(Attr { ino, inode })),
            Err(libc::ENOENT) => Ok(Err(ino)),
            Err(e) => Err(e),
        }
    }

    /// The directory holding directory `ino` (the root's is itself), from its parent
    /// entry, checked against that directory's entries.
    fn parent_dir(&self, ino: u64) -> FsResult<Attr> {
        if self.dir(ino)?.nlink == 0 {
            return Err(libc::ENOENT);
        }
        if ino == ROOT_INO {
            return self.getattr(ROOT_INO);
        }
        if let Some((parent, _, Kind::Dir)) = self.store.parent_of(ino).map_err(store_err)? {
            return self.getattr(parent);
        }
        // Read again under the lock: a rename of the directory commits its new up entry
        // and readdir cookie in one batch, which a read without the lock may see half
        // applied.
        let _st = self.lock();
        if self.dir(ino)?.nlink == 0 {
            return Err(libc::ENOENT);
        }
        match self.store.parent_of(ino).map_err(store_err)? {
            Some((parent, _, Kind::Dir)) => self.getattr(parent),
            // A directory has one name, and its up entry is written with it.
            _ => {
                log::error!(
                    "directory {ino}: its up entry is missing or stale; run `nacrithfs fsck`"
                );
                Err(libc::ESTALE)
            }
        }
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        Ok(Attr {
            ino,
            inode: self.get(ino)?,
        })
    }

    /// Create a node of any kind in `parent`. For regular files the empty plaintext file
    /// is created first, so the index never points at a cache file that does not exist.
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
        uid: u32,
        gid: u32,
        target: Option<&[u8]>,
    ) -> FsResult<Attr> {
        Self::check_name(name)?;
        let kind = if target.is_some() {
            Kind::Symlink
        } else {
            Kind::from_mode(mode).ok_or(libc::EINVAL)?
        };
        // New names count against the reserve too (see `setxattr`).
        self.check_space(META_SPACE + target.map_or(0, |t| t.len() as u64))?;
        let _st = self.lock();
        let mut pdir = self.dir(parent)?;
        if pdir.nlink == 0 {
            return Err(libc::ENOENT);
        }
        if self
            .store
            .lookup(parent, name)
            .map_err(store_err)?
            .is_some()
        {
            return Err(libc::EEXIST);
        }
        let now = SystemTime::now();
        // The parent's default ACL, if any, replaces the umask (`fs::acl`).
        let inherited = match kind {
            Kind::Symlink => None,
            _ => self.stored_acl(parent, acl::DEFAULT)?,
        };
        let mut access = None;
        let mut perm = match &inherited {
            Some(default) => {
                let mut a = default.clone();
                let perm = a.create_masq((mode & 0o7777) as u16);
                access = Some(a).filter(|a| !a.is_minimal());
                perm
            }
            None => (mode & 0o7777 & !umask) as u16,
        };
        if kind == Kind::Symlink {
            perm = 0o777;
        }
        let mut gid = gid;
        if pdir.perm & libc::S_ISGID as u16 != 0 {
            gid = pdir.gid;
            if kind == Kind::Dir {
                perm |= libc::S_ISGID as u16;
            }
        }
        let mut inode = Inode::new(kind, perm, uid, gid, now);
        inode.rdev = rdev;
        if let Some(t) = target {
            inode.target = t.to_vec();
            inode.size = t.len() as u64;
        }
        let mut txn = Txn::default();
        let ino = self.store.alloc_ino(&mut txn);
        if kind == Kind::File {
            // Not synced: until the file is fsynced, a missing cache file of a dirty
            // inode reads as empty (docs/DURABILITY.md, "create").
            self.store.make_file_dir(false, ino).map_err(io_err)?;
            // A new file, never a truncation: bytes already at this name (an inode
            // number handed out again after a power cut lost its create, and a sweep
            // that did not run) stay for recovery to place.
            let path = self.store.cache_path(ino);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    log::error!(
                        "create: {} is already there for new inode {ino}; left alone for `nacrithfs fsck --repair` (it moves unreferenced files to lost+found)",
                        path.display()
                    );
                    return Err(libc::EIO);
                }
                Err(e) => return Err(io_err(e)),
            }
            crate::crash::point("create.after_cache_file");
        }
        txn.put_inode(ino, &inode);
        if let Some(a) = access {
            txn.put_xattr(ino, acl::ACCESS, &a.to_bytes());
        }
        if let (Some(default), Kind::Dir) = (&inherited, kind) {
            txn.put_xattr(ino, acl::DEFAULT, &default.to_bytes());
        }
        // The name is new (looked up above, under the lock): the next cookie.
        self.store
            .put_name_with(&mut txn, parent, name, ino, kind, None);
        if kind == Kind::Dir {
            pdir.nlink += 1;
        }
        pdir.mtime = now;
        pdir.ctime = now;
        txn.put_inode(parent, &pdir);
        self.commit(txn, false)?;
        crate::crash::point("create.after_index");
        Ok(Attr { ino, inode })
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let i = self.get(ino)?;
        if i.kind != Kind::Symlink {
            return Err(libc::EINVAL);
        }
        Ok(i.target)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> FsResult<Attr> {
        Self::check_name(newname)?;
        self.check_space(META_SPACE)?;
        let _st = self.lock();
        let mut inode = self.get(ino)?;
        if inode.kind == Kind::Dir {
            return Err(libc::EPERM);
        }
        let mut pdir = self.dir(newparent)?;
        if pdir.nlink == 0 {
            // Removed while open: nothing new goes in.
            return Err(libc::ENOENT);
        }
        if self
            .store
            .lookup(newparent, newname)
            .map_err(store_err)?
            .is_some()
        {
            return Err(libc::EEXIST);
        }
        if inode.nlink >= u32::MAX - 1 {
            return Err(libc::EMLINK);
        }
        let now = SystemTime::now();
        inode.nlink += 1;
        inode.ctime = now;
        pdir.mtime = now;
        pdir.ctime = now;
        let mut txn = Txn::default();
        txn.put_inode(ino, &inode);
        txn.put_inode(newparent, &pdir);
        self.store
            .put_name_with(&mut txn, newparent, newname, ino, inode.kind, None);
        self.commit(txn, false)?;
        crate::crash::point("link.after_index");
        Ok(Attr { ino, inode })
    }

    /// unlink (dir=false) or rmdir (dir=true).
    pub fn remove(&self, parent: u64, name: &[u8], dir: bool) -> FsResult<()> {
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        let mut st = self.lock();
        let mut pdir = self.dir(parent)?;
        let (ino, _, cookie) = self
            .store
            .lookup_full(parent, name)
            .map_err(store_err)?
            .ok_or(libc::ENOENT)?;
        let mut inode = self.get(ino)?;
        match (dir, inode.kind == Kind::Dir) {
            (false, true) => return Err(libc::EISDIR),
            (true, false) => return Err(libc::ENOTDIR),
            (true, true) if !self.store.dir_is_empty(ino).map_err(store_err)? => {
                return Err(libc::ENOTEMPTY)
            }
            _ => {}
        }
        let now = SystemTime::now();
        let mut txn = Txn::default();
        txn.del_dirent(parent, name, cookie);
        if dir {
            pdir.nlink = pdir.nlink.saturating_sub(1);
            inode.nlink = 0;
        } else {
            inode.nlink = inode.nlink.saturating_sub(1);
        }
        inode.ctime = now;
        pdir.mtime = now;
        pdir.ctime = now;
        txn.put_inode(parent, &pdir);
        let purge = self.drop_link(&mut st, &mut txn, ino, &inode)?;
        self.commit(txn, false)?;
        crate::crash::point("unlink.after_index");
        if purge {
            self.forget(&mut st, ino);
        }
        Ok(())
    }

    /// Record `inode` after it lost a link; delete it when nothing refers to it any more
    /// (its files go to the graveyard in `txn`). Returns whether it was deleted.
    pub(super) fn drop_link(
        &self,
        st: &mut State,
        txn: &mut Txn,
        ino: u64,
        inode: &Inode,
    ) -> FsResult<bool> {
        let open = st.live.get(&ino).is_some_and(|l| l.open > 0);
        if inode.nlink == 0 && !open {
            self.store
                .delete_inode(txn, ino, inode)
                .map_err(store_err)?;
            Ok(true)
        } else {
            txn.put_inode(ino, inode);
            Ok(false)
        }
    }

    /// A deleted inode leaves memory; its files are the reaper's (they are in the
    /// graveyard, deleted once the deletion is durable).
    pub(super) fn forget(&self, st: &mut State, ino: u64) {
        st.live.remove(&ino);
        st.clean.remove(ino);
        self.reap_soon();
    }

    /// Whether directory `anc` is `ino` or above it, by the up entries (O(depth)).
    fn is_ancestor(&self, anc: u64, mut ino: u64) -> FsResult<bool> {
        const MAX_DEPTH: usize = 1 << 16;
        for _ in 0..MAX_DEPTH {
            if ino == anc {
                return Ok(true);
            }
            if ino == ROOT_INO {
                return Ok(false);
            }
            match self.store.parent_of(ino).map_err(store_err)? {
                Some((p, _, Kind::Dir)) => ino = p,
                _ => {
                    log::error!(
                        "directory {ino}: its up entry is missing or stale; run `nacrithfs fsck`"
                    );
                    return Err(libc::EIO);
                }
            }
        }
        log::error!(
            "directory {ino}: more than {MAX_DEPTH} directories above it (a cycle?); run `nacrithfs fsck`"
        );
        Err(libc::EIO)
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        Self::check_name(newname)?;
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(libc::EINVAL);
        }
        let mut st = self.lock();
        let mut dirs: HashMap<u64, Inode> = HashMap::new();
        dirs.insert(parent, self.dir(parent)?);
        if newparent != parent {
            dirs.insert(newparent, self.dir(newparent)?);
        }
        if dirs.get(&newparent).is_some_and(|d| d.nlink == 0) {
            return Err(libc::ENOENT);
        }
        // Each name is read once: its entry and cookie serve the checks and the changes.
        let (src, src_kind, src_cookie) = self
            .store
            .lookup_full(parent, name)
            .map_err(store_err)?
            .ok_or(libc::ENOENT)?;
        let dst = self
            .store
            .lookup_full(newparent, newname)
            .map_err(store_err)?;
        // A directory never moves into itself or below itself (the kernel refuses that
        // first; the index would get a cycle cut off from the root).
        if parent != newparent {
            if src_kind == Kind::Dir && self.is_ancestor(src, newparent)? {
                return Err(libc::EINVAL);
            }
            if let Some((d, Kind::Dir, _)) = dst {
                if flags & libc::RENAME_EXCHANGE != 0 && self.is_ancestor(d, parent)? {
                    return Err(libc::EINVAL);
                }
            }
        }
        let now = SystemTime::now();
        let mut txn = Txn::default();
        let mut purge = None;
        if flags & libc::RENAME_EXCHANGE != 0 {
            let (dst, dst_kind, dst_cookie) = dst.ok_or(libc::ENOENT)?;
            if parent == newparent && name == newname {
                return Ok(());
            }
            // Both names exist throughout: each keeps its cookie.
            self.store
                .put_name_with(&mut txn, parent, name, dst, dst_kind, src_cookie);
            self.store
                .put_name_with(&mut txn, newparent, newname, src, src_kind, dst_cookie);
            if parent != newparent && (src_kind == Kind::Dir) != (dst_kind == Kind::Dir) {
                let (gain, lose) = if src_kind == Kind::Dir {
                    (newparent, parent)
                } else {
                    (parent, newparent)
                };
                if let Some(d) = dirs.get_mut(&gain) {
                    d.nlink += 1;
                }
                if let Some(d) = dirs.get_mut(&lose) {
                    d.nlink = d.nlink.saturating_sub(1);
                }
            }
            for ino in [src, dst] {
                let mut i = self.get(ino)?;
                i.ctime = now;
                txn.put_inode(ino, &i);
            }
        } else {
            let dst_cookie = dst.and_then(|(_, _, c)| c);
            if let Some((dst, dst_kind, _)) = dst {
                if flags & libc::RENAME_NOREPLACE != 0 {
                    return Err(libc::EEXIST);
                }
                if dst == src {
                    // Two links to one inode: POSIX says do nothing.
                    return Ok(());
                }
                match (src_kind == Kind::Dir, dst_kind == Kind::Dir) {
                    (true, false) => return Err(libc::ENOTDIR),
                    (false, true) => return Err(libc::EISDIR),
                    (true, true) if !self.store.dir_is_empty(dst).map_err(store_err)? => {
                        return Err(libc::ENOTEMPTY)
                    }
                    _ => {}
                }
                let mut d = self.get(dst)?;
                if dst_kind == Kind::Dir {
                    d.nlink = 0;
                    if let Some(p) = dirs.get_mut(&newparent) {
                        p.nlink = p.nlink.saturating_sub(1);
                    }
                } else {
                    d.nlink = d.nlink.saturating_sub(1);
                }
                d.ctime = now;
                if self.drop_link(&mut st, &mut txn, dst, &d)? {
                    purge = Some(dst);
                }
            }
            txn.del_dirent(parent, name, src_cookie);
            // A replaced name keeps its cookie; a new one gets the next.
            self.store
                .put_name_with(&mut txn, newparent, newname, src, src_kind, dst_cookie);
            if src_kind == Kind::Dir && parent != newparent {
                if let Some(p) = dirs.get_mut(&parent) {
                    p.nlink = p.nlink.saturating_sub(1);
                }
                if let Some(p) = dirs.get_mut(&newparent) {
                    p.nlink += 1;
                }
            }
            let mut s = self.get(src)?;
            s.ctime = now;
            txn.put_inode(src, &s);
        }
        for (ino, mut d) in dirs {
            d.mtime = now;
            d.ctime = now;
            txn.put_inode(ino, &d);
        }
        self.commit(txn, false)?;
        crate::crash::point("rename.after_index");
        if let Some(ino) = purge {
            self.forget(&mut st, ino);
        }
        Ok(())
    }

    /// Open a directory: a handle that keeps the directory's inode alive if it is removed
    /// (rmdir, or renamed over) while open, as a file's does: `fstat` on it still works,
    /// with `nlink` 0, until the last handle goes ([`Core::release`]).
    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        // Checked under the lock the handle is counted under (see `open`).
        let mut st = self.lock();
        self.dir(ino)?;
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(fh, Handle { ino, stream: false });
        st.live.entry(ino).or_default().open += 1;
        Ok(fh)
    }

    /// Directory listing after the entry whose offset is `offset`: (offset of the entry,
    /// ino, kind, name). An offset is the entry's cookie, fixed for the entry's life, so
    /// creates and unlinks between two calls neither skip nor repeat other entries.
    pub fn readdir(&self, ino: u64, offset: u64, max: usize) -> FsResult<Vec<DirEntry>> {
        if offset == 0 {
            // A listing from the start is an access of the directory.
            let _st = self.lock();
            let d = self.dir(ino)?;
            self.accessed(ino, &d, true);
        } else {
            self.dir(ino)?;
        }
        let mut out = Vec::new();
        // The kernel resolves ".." itself; its inode number here is not used.
        for (n, name) in [(1u64, &b"."[..]), (2, &b".."[..])] {
            if n > offset && out.len() < max {
                out.push((n, ino, Kind::Dir, name.to_vec()));
            }
        }
        let want = max.saturating_sub(out.len());
        if want > 0 {
            for e in self
                .store
                .list_after(ino, offset.max(2), want)
                .map_err(store_err)?
            {
                out.push((e.cookie, e.ino, e.kind, e.name));
            }
        }
        Ok(out)
    }
}
