//! System access for Kairos: every syscall and external command the other crates need.
//!
//! Code elsewhere takes a [`Root`] and goes through this crate, so that the same logic runs
//! against the live system (`/`) or a target tree (an install target, a test's temp dir).

pub mod beneath;
pub mod blockdev;
pub mod console;
pub mod dm;
pub mod efi;
pub mod exec;
pub mod fs;
pub mod gpt;
pub mod grow;
pub mod host;
pub mod iso9660;
pub mod kmod;
pub mod loopdev;
pub mod luks;
pub mod mount;
pub mod net;
pub mod root;
pub mod sysinfo;
pub mod time;
pub mod tools;
pub mod tpm;

pub use exec::{CommandOutput, ExecError, Shell};
pub use root::{InitSystem, Root};
