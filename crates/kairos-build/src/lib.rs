//! Building Kairos artifacts from an image tree: the initrd ([`initrd`]), layer images and
//! installed disks ([`disk`]), trusted-boot keys and signed UKIs ([`uki`]).

pub mod cpio;
pub mod disk;
pub mod image;
pub mod initrd;
pub mod iso;
pub mod kairosify;
pub mod lint;
pub mod netboot;
pub mod os;
pub mod uki;
pub mod workdir;

pub use workdir::WorkDir;
