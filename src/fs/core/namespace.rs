//! Namespace operations: lookup, create, link, unlink, rename, readdir.

use super::*;

impl Core {
    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        self.dir(parent)?;
        let (ino, _) = self
            .store
            .lookup(parent, name)
            .map_err(store_err)?
            .ok_or(libc::ENOENT)?;
        let inode = self.get(ino).map_err(|e| {
            if e == libc::ENOENT {
                log::error!(
                    "directory {parent}: entry {:?} points to missing inode {ino}; run `nacrithfs fsck`",
                    String::from_utf8_lossy(name)
                );
                libc::EIO
            } else {
                e
            }
        })?;
        Ok(Attr { ino, inode })
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
        let mut perm = (mode & 0o7777 & !umask) as u16;
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
            File::create(self.store.cache_path(ino)).map_err(io_err)?;
        }
        txn.put_inode(ino, &inode);
        txn.put_dirent(parent, name, ino, kind);
        if kind == Kind::Dir {
            pdir.nlink += 1;
        }
        pdir.mtime = now;
        pdir.ctime = now;
        txn.put_inode(parent, &pdir);
        self.store.commit(txn, false).map_err(store_err)?;
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
        let _st = self.lock();
        let mut inode = self.get(ino)?;
        if inode.kind == Kind::Dir {
            return Err(libc::EPERM);
        }
        let mut pdir = self.dir(newparent)?;
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
        txn.put_dirent(newparent, newname, ino, inode.kind);
        self.store.commit(txn, false).map_err(store_err)?;
        Ok(Attr { ino, inode })
    }

    /// unlink (dir=false) or rmdir (dir=true).
    pub fn remove(&self, parent: u64, name: &[u8], dir: bool) -> FsResult<()> {
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        let mut st = self.lock();
        let mut pdir = self.dir(parent)?;
        let (ino, _) = self
            .store
            .lookup(parent, name)
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
        txn.del_dirent(parent, name);
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
        self.store.commit(txn, false).map_err(store_err)?;
        if purge {
            self.remove_files(&mut st, ino, &inode);
        }
        Ok(())
    }

    /// Record `inode` after it lost a link; delete it when nothing refers to it any more.
    /// Returns whether its files must be removed once `txn` commits.
    pub(super) fn drop_link(
        &self,
        st: &mut State,
        txn: &mut Txn,
        ino: u64,
        inode: &Inode,
    ) -> FsResult<bool> {
        let open = st.live.get(&ino).is_some_and(|l| l.open > 0);
        if inode.nlink == 0 && !open {
            self.store.delete_inode(txn, ino).map_err(store_err)?;
            Ok(true)
        } else {
            txn.put_inode(ino, inode);
            Ok(false)
        }
    }

    pub(super) fn remove_files(&self, st: &mut State, ino: u64, inode: &Inode) {
        st.live.remove(&ino);
        st.clean.remove(&ino);
        if inode.kind != Kind::File {
            return;
        }
        let _ = std::fs::remove_file(self.store.cache_path(ino));
        if let Some(b) = inode.blob {
            let _ = std::fs::remove_file(self.store.blob_path(ino, b.seq));
        }
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
        dirs.insert(newparent, self.dir(newparent)?);
        let (src, src_kind) = self
            .store
            .lookup(parent, name)
            .map_err(store_err)?
            .ok_or(libc::ENOENT)?;
        let dst = self.store.lookup(newparent, newname).map_err(store_err)?;
        let now = SystemTime::now();
        let mut txn = Txn::default();
        let mut purge = None;
        if flags & libc::RENAME_EXCHANGE != 0 {
            let (dst, dst_kind) = dst.ok_or(libc::ENOENT)?;
            if parent == newparent && name == newname {
                return Ok(());
            }
            txn.put_dirent(parent, name, dst, dst_kind);
            txn.put_dirent(newparent, newname, src, src_kind);
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
            if let Some((dst, dst_kind)) = dst {
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
                    purge = Some((dst, d));
                }
            }
            txn.del_dirent(parent, name);
            txn.put_dirent(newparent, newname, src, src_kind);
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
        self.store.commit(txn, false).map_err(store_err)?;
        if let Some((ino, inode)) = purge {
            self.remove_files(&mut st, ino, &inode);
        }
        Ok(())
    }

    /// Directory listing after `offset` entries: (offset of next, ino, kind, name).
    pub fn readdir(&self, ino: u64, offset: u64, max: usize) -> FsResult<Vec<DirEntry>> {
        self.dir(ino)?;
        let mut out = Vec::new();
        let mut n = 0u64;
        // The kernel resolves ".." itself; its inode number here is not used.
        for (name, child) in [(&b"."[..], ino), (&b".."[..], ino)] {
            n += 1;
            if n > offset {
                out.push((n, child, Kind::Dir, name.to_vec()));
            }
        }
        // Offsets are positions in name order; skip the first ones without decoding.
        let skip = offset.saturating_sub(2) as usize;
        let entries = self.store.list_dir(ino, skip + max).map_err(store_err)?;
        for (i, (name, child, kind)) in entries.into_iter().enumerate().skip(skip) {
            out.push((3 + i as u64, child, kind, name));
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }
}
