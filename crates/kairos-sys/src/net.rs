//! Network interfaces for the mesh VPN: a TUN device and its IPv4 address, MTU and state.
//!
//! Everything goes through ioctls on `/dev/net/tun` and an `AF_INET` socket, so the VPN
//! needs no `ip` binary (the tiny busybox images have none worth trusting). Setting an
//! address with its netmask on an interface that is up makes the kernel add the prefix
//! route, which is the only route the mesh needs.
//!
//! The ioctls and getifaddrs are FFI, so this module allows `unsafe`; each block says why it
//! holds.
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "interface name {0:?} is not usable: 1 to 15 characters of [A-Za-z0-9_.-] (p2p.vpn.interface)"
    )]
    BadName(String),
    #[error("opening /dev/net/tun: {0} (is the tun module loaded? `modprobe tun`)")]
    Open(io::Error),
    #[error(
        "creating TUN device {name}: {why} (it needs root or CAP_NET_ADMIN; if another program holds a device of that name, set p2p.vpn.interface)"
    )]
    Create { name: String, why: io::Error },
    #[error("configuring {name} ({what}): {why} (it needs root or CAP_NET_ADMIN)")]
    Configure {
        name: String,
        what: &'static str,
        why: io::Error,
    },
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// An interface name the kernel accepts (IFNAMSIZ - 1 bytes, no `/`, not `.`/`..`).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn ifreq(name: &str) -> Result<libc::ifreq, NetError> {
    if !valid_ifname(name) {
        return Err(NetError::BadName(name.to_string()));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

/// Creates (or attaches to) the TUN device `name`, without packet information headers: each
/// read returns one IP packet, each write sends one. The descriptor is non-blocking.
pub fn open_tun(name: &str) -> Result<OwnedFd, NetError> {
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(NetError::Open)?;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the call.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            TUNSETIFF as _,
            &mut req as *mut libc::ifreq,
        )
    };
    if r < 0 {
        return Err(NetError::Create {
            name: name.to_string(),
            why: io::Error::last_os_error(),
        });
    }
    Ok(OwnedFd::from(file))
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it by family.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(
    sock: &OwnedFd,
    name: &str,
    what: &'static str,
    op: libc::c_ulong,
    req: &mut libc::ifreq,
) -> Result<(), NetError> {
    // SAFETY: every SIOC*IF* request used here reads or writes one ifreq.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), op as _, req as *mut libc::ifreq) };
    if r < 0 {
        return Err(NetError::Configure {
            name: name.to_string(),
            what,
            why: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The IPv4 netmask of a prefix length (`24` → `255.255.255.0`), as a number.
pub fn netmask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

/// The network address of `ip/prefix`.
pub fn network(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip) & netmask(prefix))
}

/// Whether `ip` is in the network `net/prefix`.
pub fn in_network(ip: Ipv4Addr, (net, prefix): (Ipv4Addr, u8)) -> bool {
    network(ip, prefix) == network(net, prefix)
}

/// Gives `name` the address `ip/prefix` and the MTU, and brings it up (the kernel adds the
/// prefix route).
pub fn configure(name: &str, ip: Ipv4Addr, prefix: u8, mtu: u32) -> Result<(), NetError> {
    let sock = inet_socket().map_err(|why| NetError::Configure {
        name: name.to_string(),
        what: "socket",
        why,
    })?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    ioctl(&sock, name, "MTU", libc::SIOCSIFMTU, &mut req)?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(ip);
    ioctl(&sock, name, "address", libc::SIOCSIFADDR, &mut req)?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(netmask(prefix)));
    ioctl(&sock, name, "netmask", libc::SIOCSIFNETMASK, &mut req)?;
    let mut req = ifreq(name)?;
    ioctl(&sock, name, "flags", libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl(&sock, name, "up", libc::SIOCSIFFLAGS, &mut req)
}

/// Reads one packet from a non-blocking TUN descriptor (`WouldBlock` when none waits).
pub fn read_packet(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Writes one packet to a TUN descriptor.
pub fn write_packet(fd: &OwnedFd, packet: &[u8]) -> io::Result<usize> {
    // SAFETY: packet is valid for reads of packet.len() bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// An IPv4 address of a local interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddr {
    pub name: String,
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub up: bool,
    pub loopback: bool,
    pub multicast: bool,
}

/// The IPv4 addresses of the local interfaces (getifaddrs).
pub fn ipv4_interfaces() -> io::Result<Vec<InterfaceAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills head with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and starts with the family field.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        let prefix = if ifa.ifa_netmask.is_null() {
            32
        } else {
            // SAFETY: the netmask of an AF_INET address is a sockaddr_in.
            let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
            u32::from_be(m.sin_addr.s_addr).count_ones() as u8
        };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let flags = ifa.ifa_flags as libc::c_int;
        out.push(InterfaceAddr {
            name,
            addr,
            prefix,
            up: flags & libc::IFF_UP != 0,
            loopback: flags & libc::IFF_LOOPBACK != 0,
            multicast: flags & libc::IFF_MULTICAST != 0,
        });
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert!(valid_ifname("edgevpn0"));
        assert!(valid_ifname("mesh.1-a_b"));
        for bad in ["", ".", "..", "a/b", "a b", "sixteen-chars-xx", "ünï"] {
            assert!(!valid_ifname(bad), "{bad:?}");
        }
        assert!(matches!(open_tun("a/b"), Err(NetError::BadName(_))));
    }

    #[test]
    fn networks() {
        assert_eq!(netmask(0), 0);
        assert_eq!(Ipv4Addr::from(netmask(24)), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(32), u32::MAX);
        let ip = Ipv4Addr::new(10, 1, 0, 7);
        assert_eq!(network(ip, 24), Ipv4Addr::new(10, 1, 0, 0));
        assert!(in_network(ip, (Ipv4Addr::new(10, 1, 0, 200), 24)));
        assert!(!in_network(ip, (Ipv4Addr::new(10, 1, 1, 0), 24)));
        assert!(in_network(ip, (Ipv4Addr::UNSPECIFIED, 0)));
    }

    #[test]
    fn loopback_is_listed() {
        let all = ipv4_interfaces().unwrap();
        assert!(
            all.iter()
                .any(|i| i.loopback && i.addr == Ipv4Addr::LOCALHOST && i.prefix == 8),
            "{all:?}"
        );
    }
}
