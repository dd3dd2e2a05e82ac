//! The TUN device as an async reader and writer of packets (the device itself is made and
//! configured by `kairos_sys::net`).

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;

#[derive(Clone)]
pub struct Tun {
    fd: Arc<AsyncFd<OwnedFd>>,
    pub name: String,
}

impl Tun {
    /// Creates the device `name` (not yet addressed or up).
    pub fn open(name: &str) -> Result<Tun, kairos_sys::net::NetError> {
        let fd = kairos_sys::net::open_tun(name)?;
        // The descriptor is an OwnedFd this value owns for its whole life, which is what the
        // deprecation of `new` (in favour of an unsafe `register`) is about.
        #[allow(deprecated)]
        let fd = AsyncFd::new(fd).map_err(|why| kairos_sys::net::NetError::Create {
            name: name.to_string(),
            why,
        })?;
        Ok(Tun {
            fd: Arc::new(fd),
            name: name.to_string(),
        })
    }

    /// Waits for one packet.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| kairos_sys::net::read_packet(fd.get_ref(), buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Hands one packet to the kernel; a full queue drops it, as a NIC would.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        match kairos_sys::net::write_packet(self.fd.get_ref(), packet) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }
}
