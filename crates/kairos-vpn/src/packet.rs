//! IP packets as the VPN sees them: where one goes, and where one ends in a byte stream.
//!
//! EdgeVPN's `/edgevpn/0.1` carries one raw packet per stream with no framing (G4), and our
//! own `/kairos/vpn/1.0.0` stream carries packets back to back; in both, the IP header's own
//! length field says where a packet ends, so one splitter serves both.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The largest packet accepted from a peer (the IPv4 total-length limit).
pub const MAX_PACKET: usize = 65535;

/// The total length an IP header declares (IPv4 total length; IPv6 40 + payload length), if
/// the bytes start a plausible header.
pub fn declared_len(b: &[u8]) -> Option<usize> {
    match b.first()? >> 4 {
        4 if b.len() >= 4 => {
            let n = u16::from_be_bytes([b[2], b[3]]) as usize;
            let ihl = usize::from(b[0] & 0x0f) * 4;
            (ihl >= 20 && n >= ihl).then_some(n)
        }
        6 if b.len() >= 6 => Some(40 + u16::from_be_bytes([b[4], b[5]]) as usize),
        _ => None,
    }
}

/// The destination address of a whole packet.
pub fn destination(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => Some(IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19]))),
        6 if p.len() >= 40 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&p[24..40]);
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        _ => None,
    }
}

/// Why a stream of packets is not one.
#[derive(Debug, PartialEq, Eq)]
pub struct Garbled;

/// Splits the whole packets off the front of `buf`; returns them and how many bytes they
/// took. A partial packet at the end stays for the next read; bytes that cannot start a
/// packet are an error (the stream is reset).
pub fn split(buf: &[u8]) -> Result<(Vec<&[u8]>, usize), Garbled> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let rest = &buf[at..];
        let need = if rest.len() < 6 {
            // Too short to read a length: a version nibble that is neither 4 nor 6 is
            // already garbage.
            if !matches!(rest[0] >> 4, 4 | 6) {
                return Err(Garbled);
            }
            break;
        } else {
            declared_len(rest).ok_or(Garbled)?
        };
        if need > MAX_PACKET {
            return Err(Garbled);
        }
        if rest.len() < need {
            break;
        }
        out.push(&rest[..need]);
        at += need;
    }
    Ok((out, at))
}

#[cfg(test)]
pub(crate) fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let len = 20 + payload.len();
    let mut p = vec![
        0x45,
        0,
        (len >> 8) as u8,
        len as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_ipv4_and_ipv6() {
        let p = ipv4([10, 1, 0, 1], [10, 1, 0, 2], b"hello");
        assert_eq!(declared_len(&p), Some(25));
        assert_eq!(destination(&p), Some("10.1.0.2".parse().unwrap()));
        let mut v6 = vec![0x60, 0, 0, 0, 0, 3, 17, 64];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(b"abc");
        assert_eq!(declared_len(&v6), Some(43));
        assert_eq!(destination(&v6), Some("fd00::2".parse().unwrap()));
        assert_eq!(destination(&[0x45, 0]), None);
        assert_eq!(destination(&[]), None);
    }

    #[test]
    fn a_stream_splits_into_its_packets() {
        let a = ipv4([10, 1, 0, 1], [10, 1, 0, 2], b"one");
        let b = ipv4([10, 1, 0, 1], [10, 1, 0, 2], &[7u8; 1000]);
        let mut s = a.clone();
        s.extend_from_slice(&b);
        let (ps, used) = split(&s).unwrap();
        assert_eq!(ps, vec![&a[..], &b[..]]);
        assert_eq!(used, s.len());
        // Cut anywhere: the whole packets before the cut come out, the rest waits.
        for cut in 0..s.len() {
            let (ps, used) = split(&s[..cut]).unwrap();
            let want = usize::from(cut >= a.len()) + usize::from(cut == s.len());
            assert_eq!(ps.len(), want, "cut {cut}");
            assert_eq!(used, ps.iter().map(|p| p.len()).sum::<usize>());
        }
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(split(b"\x00garbage"), Err(Garbled));
        assert_eq!(split(b"\x10"), Err(Garbled));
        // IPv4 with a header length under 20 bytes.
        assert_eq!(split(&[0x41, 0, 0, 40, 0, 0]), Err(Garbled));
        // IPv4 declaring fewer bytes than its header.
        assert_eq!(split(&[0x45, 0, 0, 10, 0, 0]), Err(Garbled));
    }
}
