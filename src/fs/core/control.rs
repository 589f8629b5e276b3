//! xattrs, the control channel on the root (`flush`, `evict`, `status`), log paths and
//! shutdown.

use super::*;

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
        check_xattr_namespace(name)?;
        self.store
            .xattr_get(ino, name)
            .map_err(store_err)?
            .ok_or(libc::ENODATA)
    }

    /// `uid`: the caller's (the control commands are only for root and the user who
    /// mounted).
    pub fn setxattr(
        &self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: i32,
        uid: u32,
    ) -> FsResult<()> {
        if ino == ROOT_INO && name == XATTR_CONTROL {
            // The kernel checked write permission on the root only: with a 1777 root
            // that is everyone.
            // SAFETY: getuid cannot fail.
            let mounter = unsafe { libc::getuid() };
            if uid != 0 && uid != mounter {
                return Err(libc::EPERM);
            }
            return match value {
                b"flush" => self.request_flush(),
                b"evict" => self.evict_all().map(|_| ()),
                b"pause" => self.set_paused(true),
                b"resume" => self.set_paused(false),
                _ => Err(libc::EINVAL),
            };
        }
        if name.starts_with(RESERVED_PREFIX) {
            return Err(libc::EPERM);
        }
        check_xattr_namespace(name)?;
        if name.len() > 255 {
            return Err(libc::ERANGE);
        }
        if value.len() > 65536 {
            return Err(libc::E2BIG);
        }
        let _st = self.lock();
        let mut inode = self.get(ino)?;
        let exists = self
            .store
            .xattr_get(ino, name)
            .map_err(store_err)?
            .is_some();
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
        self.commit(txn, false)
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        self.get(ino)?;
        let mut out = Vec::new();
        for n in self.store.xattr_names(ino).map_err(store_err)? {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        if name.starts_with(RESERVED_PREFIX) {
            return Err(libc::EPERM);
        }
        check_xattr_namespace(name)?;
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
        self.commit(txn, false)
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
        let compressed = files.saturating_sub(dirty);
        let secs = stats.busy.as_secs_f64();
        Ok(format!(
            "files={files}\ncompressed={compressed}\ndirty={dirty}\ndirty_bytes={dirty_bytes}\nqueued={}\ndue={due}\ncompressing={compressing}\n\
             logical_bytes={logical}\nstored_bytes={stored}\ncache_bytes={cache}\n\
             compressed_since_mount={}\nbytes_in={}\nbytes_out={}\nbusy_seconds={secs:.1}\n\
             failures={}\nsuperseded={}\nverify_failures={}\ndecompressions={}\ndecompress_failures={}\n\
             symbols_coded={}\nregions_decoded={}\nchunk_jobs_queued={chunk_jobs}\nindex_commits={}\n\
             compress_seconds={:.3}\ncoding_seconds={:.3}\npaused={}\n",
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
            u8::from(paused),
        ))
    }

    /// One path of `ino` (for log lines), or `inode N` if it has none: walked up through
    /// the parent entries, each checked against the directory (O(depth), never a scan).
    pub fn describe(&self, ino: u64) -> String {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO && parts.len() < 256 {
            match self.store.parent_of(cur) {
                Ok(Some((parent, name))) if matches!(self.store.lookup(parent, &name), Ok(Some((i, _))) if i == cur) =>
                {
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

    pub fn shutdown(&self) {
        self.lock().shutting_down = true;
        self.wake.notify_all();
        self.reap_soon();
        if self.opts.read_only {
            return;
        }
        if let Err(e) = self.sync_metadata() {
            log::error!("committing the sizes of files being written: errno {e}");
        }
        if let Err(e) = self.store.flush() {
            log::error!("final index flush: {e}");
        }
        self.reap();
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

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.lock().shutting_down
    }
}
