//! Free space in the target folder, shared fairly between transfers in flight: each reserves what
//! it will write before it is accepted, so concurrent transfers cannot overbook the disk.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The bytes promised to transfers in flight, against the target folder's free space.
pub struct SpacePool {
    dir: PathBuf,
    reserved: Mutex<u64>,
}

/// Bytes a transfer still has to write, counted in the pool. Shrinks as data lands (the file
/// system's free space shrinks by the same amount) and returns the rest when dropped.
pub struct Reservation<'a> {
    pool: &'a Mutex<u64>,
    left: u64,
}

impl SpacePool {
    pub fn new(dir: &Path) -> SpacePool {
        SpacePool { dir: dir.to_path_buf(), reserved: Mutex::new(0) }
    }

    /// Reserves `need` bytes, counting what transfers in flight have reserved as used; or says
    /// how many bytes are available.
    pub fn reserve(&self, need: u64) -> io::Result<Result<Reservation<'_>, u64>> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let available = free_space(&self.dir)?.saturating_sub(*reserved);
        if need > available {
            return Ok(Err(available));
        }
        *reserved += need;
        Ok(Ok(Reservation { pool: &self.reserved, left: need }))
    }
}

impl Reservation<'_> {
    /// `n` bytes were written: they now show in the file system's own free space.
    pub fn consume(&mut self, n: u64) {
        let n = n.min(self.left);
        *self.pool.lock().unwrap_or_else(|e| e.into_inner()) -= n;
        self.left -= n;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        *self.pool.lock().unwrap_or_else(|e| e.into_inner()) -= self.left;
    }
}

/// Bytes available to an unprivileged writer in `dir`'s file system.
pub fn free_space(dir: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}
