//! The receiver's side of the disk: everything written lands in the target folder through here.
//!
//! - [`safedir`]: the target folder and its subfolders as held descriptors; every open, rename and
//!   removal is relative to one, never through a symlink (confinement).
//! - [`partial`]: hidden partial files and their records while a body arrives, resume, and the
//!   commit to a final name (durability: fsync, or a group's syncfs by the caller).
//! - [`existing`]: files already there, recognised by content ("already have it").
//! - [`space`]: free space and inodes reserved by transfers in flight.
//! - [`fs_rules`]: the name rules the target folder's file system adds (Windows-like, casefold).

pub mod existing;
pub mod fs_rules;
pub mod partial;
pub mod safedir;
pub mod space;

pub use existing::{MAX_KEEP_BOTH, find_existing, same_size_exists};
pub use partial::{Durability, FileId, Left, Opened, Partial, remove_if_empty, remove_left, stem_for};
pub use safedir::{Kind, SafeDir};
pub use space::{Reservation, Room, SpacePool, free_room, free_space};
