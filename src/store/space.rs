//! Free space and inodes in the target folder, shared between transfers in flight: each reserves
//! what it may consume before it is answered (whole blocks and an inode for each file, a block
//! and an inode for each record and new folder), and what all of them hold counts as used, so
//! nothing is promised twice.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Room on a file system: bytes (whole blocks) and inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Room {
    pub bytes: u64,
    pub inodes: u64,
}

impl Room {
    /// What a file of `size` bytes takes: its blocks and an inode, plus a block and an inode for
    /// its record when it keeps one. `block` is the file system's fragment size (`f_frsize`).
    pub fn file(size: u64, record: bool, block: u64) -> Room {
        let file = Room { bytes: round_up(size, block), inodes: 1 };
        if record { file + Room::entry(block) } else { file }
    }

    /// What a small thing with a name of its own takes (a record, a new folder): a block and an
    /// inode.
    pub fn entry(block: u64) -> Room {
        Room { bytes: block, inodes: 1 }
    }

    fn fits(self, available: Room) -> bool {
        self.bytes <= available.bytes && self.inodes <= available.inodes
    }

    fn less(self, other: Room) -> Room {
        Room {
            bytes: self.bytes.saturating_sub(other.bytes),
            inodes: self.inodes.saturating_sub(other.inodes),
        }
    }
}

impl std::ops::Add for Room {
    type Output = Room;
    fn add(self, o: Room) -> Room {
        Room { bytes: self.bytes.saturating_add(o.bytes), inodes: self.inodes.saturating_add(o.inodes) }
    }
}

impl std::ops::AddAssign for Room {
    fn add_assign(&mut self, o: Room) {
        *self = *self + o;
    }
}

impl std::ops::Mul<u64> for Room {
    type Output = Room;
    fn mul(self, n: u64) -> Room {
        Room { bytes: self.bytes.saturating_mul(n), inodes: self.inodes.saturating_mul(n) }
    }
}

/// `n` rounded up to a whole number of `block`s.
pub fn round_up(n: u64, block: u64) -> u64 {
    n.div_ceil(block.max(1)).saturating_mul(block.max(1))
}

/// The room promised to transfers in flight, against the target folder's free room.
pub struct SpacePool {
    dir: PathBuf,
    reserved: Mutex<Room>,
}

/// Room a transfer may still consume, counted in the pool. Shrinks as it is consumed (the file
/// system's own free room shrinks by as much) and returns the rest when dropped.
pub struct Reservation<'a> {
    pool: &'a SpacePool,
    left: Room,
    block: u64,
}

impl SpacePool {
    pub fn new(dir: &Path) -> SpacePool {
        SpacePool { dir: dir.to_path_buf(), reserved: Mutex::new(Room::default()) }
    }

    /// The file system's block (fragment) size: files take whole blocks of it.
    pub fn block_size(&self) -> io::Result<u64> {
        Ok(rustix::fs::statvfs(&self.dir)?.f_frsize.max(1))
    }

    /// Reserves `need`, counting what transfers in flight have reserved as used; or says how much
    /// room is available.
    pub fn reserve(&self, need: Room) -> io::Result<Result<Reservation<'_>, Room>> {
        let block = self.block_size()?;
        Ok(self.take(need)?.map(|()| Reservation { pool: self, left: need, block }))
    }

    fn take(&self, need: Room) -> io::Result<Result<(), Room>> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let available = free_room(&self.dir)?.less(*reserved);
        if !need.fits(available) {
            return Ok(Err(available));
        }
        *reserved += need;
        Ok(Ok(()))
    }

    fn give_back(&self, room: Room) {
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        *reserved = reserved.less(room);
    }
}

impl Reservation<'_> {
    /// The file system's block size when the reservation was taken.
    pub fn block(&self) -> u64 {
        self.block
    }

    /// What is still reserved.
    pub fn left(&self) -> Room {
        self.left
    }

    /// Reserves `need` more for the same transfer (a file the acceptance did not count), or says
    /// how much room is available.
    pub fn grow(&mut self, need: Room) -> io::Result<Result<(), Room>> {
        let taken = self.pool.take(need)?;
        if taken.is_ok() {
            self.left += need;
        }
        Ok(taken)
    }

    /// `n` bytes were written: they now show in the file system's own free space.
    pub fn consume(&mut self, n: u64) {
        self.release(Room { bytes: n, inodes: 0 });
    }

    /// `room` is no longer needed, or now shows as used in the file system itself. Never more
    /// than what is left.
    pub fn release(&mut self, room: Room) {
        let room = Room { bytes: room.bytes.min(self.left.bytes), inodes: room.inodes.min(self.left.inodes) };
        self.pool.give_back(room);
        self.left = self.left.less(room);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.pool.give_back(self.left);
    }
}

/// Bytes available to an unprivileged writer in `dir`'s file system.
pub fn free_space(dir: &Path) -> io::Result<u64> {
    Ok(free_room(dir)?.bytes)
}

/// Bytes and inodes available to an unprivileged writer in `dir`'s file system. A file system
/// that reports no inode count at all (btrfs) has no fixed inode limit.
pub fn free_room(dir: &Path) -> io::Result<Room> {
    let st = rustix::fs::statvfs(dir)?;
    let inodes = if st.f_files == 0 { u64::MAX } else { st.f_favail };
    Ok(Room { bytes: st.f_bavail.saturating_mul(st.f_frsize), inodes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_take_whole_blocks_and_an_inode_records_and_folders_one_of_each() {
        assert_eq!(Room::file(0, false, 4096), Room { bytes: 0, inodes: 1 });
        assert_eq!(Room::file(1, false, 4096), Room { bytes: 4096, inodes: 1 });
        assert_eq!(Room::file(4097, true, 4096), Room { bytes: 3 * 4096, inodes: 2 });
        assert_eq!(Room::entry(512) * 3, Room { bytes: 1536, inodes: 3 });
    }

    #[test]
    fn what_one_reservation_holds_is_not_promised_to_another() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = SpacePool::new(tmp.path());
        let free = free_room(tmp.path()).unwrap();
        // Three quarters each: other writers on the same disk may change its free space a little.
        let most = Room { bytes: free.bytes / 4 * 3, inodes: 1 };
        let mut first = pool.reserve(most).unwrap().unwrap();
        assert!(pool.reserve(most).unwrap().is_err());
        assert!(first.grow(most).unwrap().is_err());
        first.release(Room { bytes: u64::MAX, inodes: u64::MAX });
        assert_eq!(first.left(), Room::default());
        assert!(pool.reserve(most).unwrap().is_ok());
    }
}
