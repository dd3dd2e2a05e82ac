//! Building Kairos artifacts from an image tree: the initrd ([`initrd`]), layer images and
//! installed disks ([`disk`]).

pub mod cpio;
pub mod disk;
pub mod image;
pub mod initrd;
pub mod iso;
pub mod kairosify;
pub mod lint;
pub mod netboot;
pub mod os;
pub mod workdir;

pub use workdir::WorkDir;
