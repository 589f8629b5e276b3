//! The filesystem: [`core::Core`] is the engine (POSIX semantics over the store, the
//! write-back cache, the compression lifecycle), [`fuse`] is the thin adapter that
//! turns kernel requests into core calls, and [`background`] runs the compressor and
//! the decompressor threads. See SEMANTICS.md for what a user can rely on.

pub mod acl;
pub mod background;
pub mod core;
pub mod fuse;
pub mod mount;
pub mod options;

pub use self::core::Core;
pub use options::FsOptions;
