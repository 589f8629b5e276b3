//! xattrs, the control channel on the root (`flush`, `evict`, `status`), log paths and
//! shutdown.

use super::*;
use crate::fs::acl;

impl Core {
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        let inode = self.get(ino)?;
        if name == XATTR_STATE && inode.kind == Kind::File {
            return Ok(self.file_state(ino, &inode)?.as_bytes().to_vec());
        }
        if name == XATTR_STORED && inode.kind == Kind::File {
            return Ok(stored_size(&inode).to_string().into_bytes());
        }
        if name == XATTR_STATUS && ino == ROOT_INO {
            return Ok(self.status()?.into_bytes());
        }
        self.check_xattr_name(name)?;
        self.store
            .xattr_get(ino, name)
            .map_err(store_err)?
            .ok_or(libc::ENODATA)
    }

    /// `user.nacrith.backends` on the root: blobs per backend, as
    /// [`crate::store::backends::to_text`] writes them. A census reads every blob's
    /// header (O(files), without the state lock), so it is for root and the user who
    /// mounted only, one at a time, and an answer serves for a few seconds (getxattr
    /// asks twice: the size, then the value).
    pub fn backends(&self, caller: Caller) -> FsResult<Vec<u8>> {
        // SAFETY: getuid cannot fail.
        let mounter = unsafe { libc::getuid() };
        if caller.uid != 0 && caller.uid != mounter {
            return Err(libc::EPERM);
        }
        let mut last = self.census.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, text)) = &*last {
            if at.elapsed() < Duration::from_secs(5) {
                return Ok(text.clone().into_bytes());
            }
        }
        let counts = crate::store::backends::census(&self.store, |_| {}).map_err(store_err)?;
        let text = crate::store::backends::to_text(&counts);
        *last = Some((Instant::now(), text.clone()));
        Ok(text.into_bytes())
    }

    /// `caller`: who asks (the control commands are only for root and the user who
    /// mounted; an ACL set by someone outside the file's group clears setgid).
    pub fn setxattr(
        &self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: i32,
        caller: Caller,
    ) -> FsResult<()> {
        if ino == ROOT_INO && name == XATTR_CONTROL {
            // The kernel checked write permission on the root only: with a 1777 root
            // that is everyone.
            // SAFETY: getuid cannot fail.
            let mounter = unsafe { libc::getuid() };
            if caller.uid != 0 && caller.uid != mounter {
                return Err(libc::EPERM);
            }
            return match value {
                b"flush" => self.request_flush(),
                b"evict" => self.evict_all().map(|_| ()),
                b"compact" => self.compact_packs().map(|_| ()),
                b"pause" => self.set_paused(true),
                // A daemon started read-only serves a private copy of the index: what
                // it accepted after a `remount,rw` would be lost at unmount.
                b"resume" if self.opts.read_only => Err(libc::EROFS),
                b"resume" => self.set_paused(false),
                _ => Err(libc::EINVAL),
            };
        }
        if name.starts_with(RESERVED_PREFIX) {
            return Err(libc::EPERM);
        }
        self.check_xattr_name(name)?;
        if name == acl::ACCESS || name == acl::DEFAULT {
            return self.set_acl(ino, name, value, caller);
        }
        if name.len() > 255 {
            return Err(libc::ERANGE);
        }
        if value.len() > 65536 {
            return Err(libc::E2BIG);
        }
        // Index bytes count against the reserve as cache bytes do: a full index
        // journal stops the daemon, so no user may fill the disk through xattrs.
        self.check_space((name.len() + value.len()) as u64 + META_SPACE)?;
        let _st = self.lock();
        let mut inode = self.get(ino)?;
        let have = self.store.xattr_sizes(ino).map_err(store_err)?;
        let old = have.iter().find(|(n, _)| n.as_slice() == name).map(|x| x.1);
        let exists = old.is_some();
        // An inode's names fit one listxattr (the kernel's XATTR_LIST_MAX), which also
        // bounds what listing them and deleting the inode hold at once; its values
        // XATTR_VALUES_MAX in all. Beyond either: ENOSPC, as ext4 says when they do not
        // fit its inode.
        let listed: usize = have.iter().map(|(n, _)| n.len() + 1).sum();
        let values: usize = have.iter().map(|(_, v)| v).sum();
        if (!exists && listed + name.len() + 1 > XATTR_LIST_MAX)
            || values - old.unwrap_or(0) + value.len() > XATTR_VALUES_MAX
        {
            return Err(libc::ENOSPC);
        }
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(libc::EEXIST);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(libc::ENODATA);
        }
        inode.ctime = SystemTime::now();
        let mut txn = Txn::default();
        txn.put_xattr(ino, name, value);
        txn.put_inode(ino, &inode);
        self.commit(txn, false)?;
        crate::crash::point("xattr.after_index");
        Ok(())
    }

    /// Set (or, when empty, remove) an ACL. The access ACL and the mode bits it implies
    /// change in one index batch; an ACL the mode bits say in full is not stored.
    fn set_acl(&self, ino: u64, name: &[u8], value: &[u8], caller: Caller) -> FsResult<()> {
        let parsed = acl::Acl::parse(value)?;
        if parsed.is_some() {
            self.check_space(value.len() as u64 + META_SPACE)?;
        }
        let _st = self.lock();
        let mut inode = self.get(ino)?;
        if inode.kind == Kind::Symlink || (name == acl::DEFAULT && inode.kind != Kind::Dir) {
            // The kernel refuses these before asking; a default ACL only means
            // something on a directory.
            return match parsed {
                Some(_) => Err(libc::EACCES),
                None => Ok(()),
            };
        }
        let mut txn = Txn::default();
        match parsed {
            Some(a) if name == acl::ACCESS => {
                inode.perm = (inode.perm & !0o777) | a.mode_bits();
                if inode.perm & libc::S_ISGID as u16 != 0
                    && caller.uid != 0
                    && !caller.in_group(inode.gid)
                {
                    // What FUSE_SETXATTR_ACL_KILL_SGID would say (fuser cannot
                    // negotiate the setxattr extension that carries it).
                    inode.perm &= !(libc::S_ISGID as u16);
                }
                if a.is_minimal() {
                    txn.del_xattr(ino, name);
                } else {
                    txn.put_xattr(ino, name, &a.to_bytes());
                }
            }
            Some(a) => txn.put_xattr(ino, name, &a.to_bytes()),
            None => txn.del_xattr(ino, name),
        }
        inode.ctime = SystemTime::now();
        txn.put_inode(ino, &inode);
        self.commit(txn, false)?;
        crate::crash::point("xattr.after_index");
        Ok(())
    }

    /// The names of `ino`'s xattrs, NUL-terminated; `trusted.*` only if `trusted`.
    pub fn listxattr(&self, ino: u64, trusted: bool) -> FsResult<Vec<u8>> {
        self.get(ino)?;
        let mut out = Vec::new();
        for n in self.store.xattr_names(ino).map_err(store_err)? {
            if !trusted && n.starts_with(b"trusted.") {
                continue;
            }
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        if name.starts_with(RESERVED_PREFIX) {
            return Err(libc::EPERM);
        }
        // An ACL removed leaves the mode as it is (as on ext4).
        self.check_xattr_name(name)?;
        let _st = self.lock();
        let mut inode = self.get(ino)?;
        if self
            .store
            .xattr_get(ino, name)
            .map_err(store_err)?
            .is_none()
        {
            return Err(libc::ENODATA);
        }
        inode.ctime = SystemTime::now();
        let mut txn = Txn::default();
        txn.del_xattr(ino, name);
        txn.put_inode(ino, &inode);
        self.commit(txn, false)?;
        crate::crash::point("xattr.after_index");
        Ok(())
    }

    /// `ino`'s ACL `name` (access or default) when the kernel enforces ACLs; one that does
    /// not parse counts as none (fsck reports it).
    pub(super) fn stored_acl(&self, ino: u64, name: &[u8]) -> FsResult<Option<acl::Acl>> {
        if !self.acl.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        let value = self.store.xattr_get(ino, name).map_err(store_err)?;
        Ok(value.and_then(|v| acl::Acl::parse(&v).ok().flatten()))
    }

    /// xattr namespaces kept: user, trusted, security, and the two ACLs when the kernel
    /// enforces them.
    fn check_xattr_name(&self, name: &[u8]) -> FsResult<()> {
        if (name == acl::ACCESS || name == acl::DEFAULT)
            && self.acl.load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(());
        }
        check_xattr_namespace(name)
    }

    /// Queue length, byte totals and worker throughput, as `key=value` lines.
    pub fn status(&self) -> FsResult<String> {
        let now = unix_ms(SystemTime::now());
        let (compressing, stats, paused) = {
            let st = self.lock();
            let mut stats = st.stats.clone();
            if let Some(t) = st.busy_since {
                stats.busy += t.elapsed();
            }
            (st.compressing.len(), stats, st.paused)
        };
        let chunk_jobs = self.engine.loaded().map_or(0, |p| p.queued());
        // Kept by every commit: no scan of the index per read.
        let (queued, due) = self.store.with_queue(|q| (q.queued(), q.due(now)));
        let t = self.store.totals();
        let (files, dirty, dirty_bytes, logical, stored, cache) = (
            t.files,
            t.dirty,
            t.dirty_bytes,
            t.logical,
            t.stored,
            t.cached,
        );
        let index = self.store.index_disk_bytes();
        // Blob files and dirty plaintexts from the tally; packed blobs as the pack files
        // that hold them (live or not, shared or not) occupy the disk.
        let (packs, pack_disk, pack_live) = self.store.pack_usage().map_err(store_err)?;
        let stored_disk = t.stored_disk + pack_disk;
        let disk = stored_disk + t.clean_disk + index;
        let compressed = files.saturating_sub(dirty);
        let secs = stats.busy.as_secs_f64();
        Ok(format!(
            "files={files}\ncompressed={compressed}\ndirty={dirty}\ndirty_bytes={dirty_bytes}\nqueued={}\ndue={due}\ncompressing={compressing}\n\
             logical_bytes={logical}\nstored_bytes={stored}\nstored_disk_bytes={stored_disk}\n\
             index_bytes={index}\ndisk_bytes={disk}\ncache_bytes={cache}\n\
             compressed_since_mount={}\nbytes_in={}\nbytes_out={}\nbusy_seconds={secs:.1}\n\
             failures={}\nsuperseded={}\nverify_failures={}\ndecompressions={}\ndecompress_failures={}\n\
             symbols_coded={}\nregions_decoded={}\nchunk_jobs_queued={chunk_jobs}\nindex_commits={}\n\
             compress_seconds={:.3}\ncoding_seconds={:.3}\nshared_files={}\nshared_bytes={}\ngrouped_files={}\npaused={}\nread_only={}\n\
             packs={packs}\npack_disk_bytes={pack_disk}\npack_live_bytes={pack_live}\n",
            queued,
            stats.compressed_files,
            stats.bytes_in,
            stats.bytes_out,
            stats.failures,
            stats.superseded,
            stats.verify_failures,
            stats.decompressions,
            stats.decompress_failures,
            stats.symbols_coded,
            stats.regions_decoded,
            self.store.commits(),
            stats.compress_time.as_secs_f64(),
            stats.coding_time.as_secs_f64(),
            stats.shared_files,
            stats.shared_bytes,
            stats.grouped_files,
            u8::from(paused),
            u8::from(self.opts.read_only),
        ))
    }

    /// One path of `ino` (for log lines), or `inode N` if it has none: walked up through
    /// the up entries, each checked to still name it (O(depth), never a scan).
    pub fn describe(&self, ino: u64) -> String {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO && parts.len() < 256 {
            match self.store.parent_of(cur) {
                Ok(Some((parent, name, _))) => {
                    parts.push(String::from_utf8_lossy(&name).into_owned());
                    cur = parent;
                }
                // Unnamed (unlinked while open), the recorded link removed, or an old
                // index read-only.
                _ => return format!("inode {ino}"),
            }
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    /// Before a remount read-only (`pause`) and after one read-write (`resume`): while
    /// paused nothing changes the stored data (no compression commits, evictions or
    /// deletions); pending sizes and times are committed and the index flushed first.
    pub fn set_paused(&self, paused: bool) -> FsResult<()> {
        self.lock().paused = paused;
        if paused {
            self.sync_metadata()?;
            self.store.flush().map_err(store_err)?;
            log::info!("remounted read-only: compression, eviction and deletion paused");
        } else {
            log::info!("remounted read-write: compression, eviction and deletion resumed");
            self.wake.notify_all();
            self.reap_soon();
        }
        Ok(())
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Stop: background work ends, everything pending is committed and flushed.
    /// Returns whether every stop so far committed and flushed all of it (then, with the
    /// workers joined, the stop may be recorded as clean).
    pub fn shutdown(&self) -> bool {
        self.lock().shutting_down = true;
        // Compressions in progress end within a step (their temp blobs removed), so the
        // workers stop in time for the clean stop to be recorded: otherwise the next
        // mount scans every backing file, and fsck meanwhile finds their temp files.
        self.engine.stop_background();
        self.wake.notify_all();
        self.reap_soon();
        if self.opts.read_only {
            return true;
        }
        let mut ok = true;
        if let Err(e) = self.sync_metadata() {
            log::error!("committing the sizes of files being written: errno {e}");
            ok = false;
        }
        if let Err(e) = self.store.flush() {
            log::error!("final index flush: {e}");
            ok = false;
        }
        self.reap();
        let mut st = self.lock();
        st.stop_failed |= !ok;
        !st.stop_failed
    }

    pub(crate) fn wait_for_work(&self, wait: Duration) -> bool {
        let st = self.lock();
        if st.shutting_down {
            return false;
        }
        let (st, _) = self
            .wake
            .wait_timeout(st, wait)
            .unwrap_or_else(|p| p.into_inner());
        !st.shutting_down
    }

    /// A compressor's wait for the next due entry, `wait` being how long until it is
    /// due ([`Core::next_due`], whose scan began at [`Core::due_generation`] `seen`):
    /// woken early only by an entry due sooner, a flush or a shutdown (see
    /// `Core::sleepers`); not begun at all if something became due since the scan.
    pub(crate) fn wait_for_due(&self, wait: Duration, seen: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let st = self.lock();
        if st.shutting_down {
            return false;
        }
        if self.due_generation() != seen {
            return true;
        }
        let at = unix_ms(SystemTime::now() + wait);
        self.sleepers.fetch_add(1, Relaxed);
        self.sleep_until
            .store(self.sleep_until.load(Relaxed).min(at), Relaxed);
        let (st, _) = self
            .wake
            .wait_timeout(st, wait)
            .unwrap_or_else(|p| p.into_inner());
        // The others' wake times are not kept: unknown (u64::MAX), so while some still
        // sleep, every new due entry wakes them (extra wakes, not a missed one). (It
        // was 0, which woke nobody: after the first of several sleepers woke, a file due
        // now waited for a compressor's own timeout, up to 5 s.)
        self.sleepers.fetch_sub(1, Relaxed);
        self.sleep_until.store(u64::MAX, Relaxed);
        !st.shutting_down
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.lock().shutting_down
    }
}

/// Who made a request, as the kernel says.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Caller {
    /// Whether the caller is in group `gid`: its own group or one of its supplementary
    /// groups (from /proc; a caller that has gone counts as outside).
    pub fn in_group(&self, gid: u32) -> bool {
        if self.gid == gid {
            return true;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.pid)) else {
            return false;
        };
        status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
    }
}
