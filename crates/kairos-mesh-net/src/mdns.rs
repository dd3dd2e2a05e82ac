//! LAN discovery by multicast DNS, in EdgeVPN's form (G2).
//!
//! libp2p-mdns hard-codes the `_p2p._udp.local` service; EdgeVPN (go-libp2p's mdns with the
//! token's `mdns` string as service type) browses `<mdns>.local` instead. So this is a small
//! querier and responder of its own:
//! - a query is a PTR question for `<mdns>.local.`;
//! - the answer is a PTR to `<instance>.<mdns>.local.` (instance: 32–63 random `[a-z0-9]`),
//!   with SRV (port 4001, target `<instance>.local.`), a TXT string
//!   `dnsaddr=<multiaddr>/p2p/<peer id>` per listen address, and A records;
//! - from any answer for our service, every `dnsaddr=` string is a peer address to dial.
//!
//! A peer without the token does not know the service name, so it neither finds nor is found;
//! even if it guessed, it could only connect, not read (the ledger is sealed).
//!
//! Queries go out at start and then on a backoff (1 s doubling to [`MAX_QUERY_INTERVAL`], five
//! minutes as in libp2p's mDNS), so a LAN join takes about a second — the new node asks, and
//! everyone answers at once — while an idle LAN of ten nodes carries about twenty answers a
//! minute, not a hundred.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use simple_dns::rdata::{A, PTR, RData, SRV, TXT};
use simple_dns::{CLASS, Name, Packet, QCLASS, QTYPE, Question, ResourceRecord, TYPE};

pub const GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
pub const PORT: u16 = 5353;
/// Queries back off to this.
pub const MAX_QUERY_INTERVAL: Duration = Duration::from_secs(300);
/// Answers and packets larger than this are ignored (a full mDNS packet is 9000 bytes).
const MAX_PACKET: usize = 9000;
/// What one answer may make us dial: peers, and addresses per peer (the rest is ignored).
pub const MAX_PEERS_PER_ANSWER: usize = 8;
pub const MAX_ADDRS_PER_PEER: usize = 8;
const TTL: u32 = 120;

fn service_name(mdns: &str) -> String {
    format!("{mdns}.local")
}

/// The PTR question for the token's service.
pub fn query(mdns: &str) -> Vec<u8> {
    let name = service_name(mdns);
    let mut p = Packet::new_query(0);
    if let Ok(n) = Name::new(&name) {
        p.questions.push(Question::new(
            n,
            QTYPE::TYPE(TYPE::PTR),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
    }
    p.build_bytes_vec().unwrap_or_default()
}

fn same_name(n: &Name, want: &str) -> bool {
    n.to_string()
        .trim_end_matches('.')
        .eq_ignore_ascii_case(want)
}

/// Whether a packet asks for the token's service.
pub fn asks_for(data: &[u8], mdns: &str) -> bool {
    let want = service_name(mdns);
    match Packet::parse(data) {
        Ok(p) => p.questions.iter().any(|q| {
            same_name(&q.qname, &want) && matches!(q.qtype, QTYPE::TYPE(TYPE::PTR) | QTYPE::ANY)
        }),
        Err(_) => false,
    }
}

/// The answer for the token's service: PTR, SRV, one TXT string per address, A records.
pub fn response(mdns: &str, instance: &str, addrs: &[String], ips: &[Ipv4Addr]) -> Vec<u8> {
    let service = service_name(mdns);
    let full = format!("{instance}.{service}");
    let host = format!("{instance}.local");
    let txts: Vec<String> = addrs
        .iter()
        .map(|a| format!("dnsaddr={a}"))
        .filter(|t| t.len() <= 255)
        .collect();
    let (Ok(sn), Ok(fnm), Ok(hn)) = (Name::new(&service), Name::new(&full), Name::new(&host))
    else {
        return Vec::new();
    };
    let mut p = Packet::new_reply(0);
    p.set_flags(simple_dns::PacketFlag::AUTHORITATIVE_ANSWER);
    p.answers.push(ResourceRecord::new(
        sn,
        CLASS::IN,
        TTL,
        RData::PTR(PTR(fnm.clone())),
    ));
    p.additional_records.push(ResourceRecord::new(
        fnm.clone(),
        CLASS::IN,
        TTL,
        RData::SRV(SRV {
            priority: 0,
            weight: 0,
            port: 4001,
            target: hn.clone(),
        }),
    ));
    let mut txt = TXT::new();
    for t in &txts {
        if txt.add_string(t).is_err() {
            return Vec::new();
        }
    }
    p.additional_records
        .push(ResourceRecord::new(fnm, CLASS::IN, TTL, RData::TXT(txt)));
    for ip in ips {
        p.additional_records.push(ResourceRecord::new(
            hn.clone(),
            CLASS::IN,
            TTL,
            RData::A(A::from(*ip)),
        ));
    }
    p.build_bytes_vec().unwrap_or_default()
}

/// The peers an answer for the token's service names, with their addresses.
pub fn peers_in(data: &[u8], mdns: &str) -> BTreeMap<PeerId, Vec<Multiaddr>> {
    let mut out: BTreeMap<PeerId, Vec<Multiaddr>> = BTreeMap::new();
    if data.len() > MAX_PACKET {
        return out;
    }
    let Ok(p) = Packet::parse(data) else {
        return out;
    };
    let suffix = format!(".{}", service_name(mdns)).to_ascii_lowercase();
    for rr in p.answers.iter().chain(&p.additional_records) {
        let RData::TXT(txt) = &rr.rdata else { continue };
        let owner = rr.name.to_string();
        let owner = owner.trim_end_matches('.').to_ascii_lowercase();
        if !owner.ends_with(&suffix) {
            continue;
        }
        for (k, v) in txt.iter_raw() {
            if k != b"dnsaddr" {
                continue;
            }
            let Some(addr) = v
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|s| s.parse::<Multiaddr>().ok())
            else {
                continue;
            };
            let Some(peer) = addr.iter().find_map(|p| match p {
                libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                _ => None,
            }) else {
                continue;
            };
            if !out.contains_key(&peer) && out.len() >= MAX_PEERS_PER_ANSWER {
                continue;
            }
            let addrs = out.entry(peer).or_default();
            if addrs.len() < MAX_ADDRS_PER_PEER {
                addrs.push(addr);
            }
        }
    }
    out
}

/// A random instance name as go-libp2p makes them: 32–63 characters of `[a-z0-9]`.
pub fn instance_name() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let len = rng.random_range(32..64);
    (0..len)
        .map(|_| {
            let c = rng.random_range(0..36u8);
            if c < 10 {
                (b'0' + c) as char
            } else {
                (b'a' + c - 10) as char
            }
        })
        .collect()
}

/// What the running discovery needs from the host.
pub(crate) struct Context {
    pub mdns: String,
    pub local: PeerId,
    /// The host's listen addresses (kept current by the host).
    pub listen: std::sync::Arc<std::sync::Mutex<Vec<Multiaddr>>>,
    /// Interfaces never used for discovery (the VPN's own).
    pub skip_interfaces: Vec<String>,
}

fn multicast_interfaces(skip: &[String]) -> Vec<Ipv4Addr> {
    kairos_sys::net::ipv4_interfaces()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i.up && i.multicast && !i.loopback && !skip.contains(&i.name))
        .map(|i| i.addr)
        .collect()
}

fn socket() -> std::io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_multicast_loop_v4(true)?;
    s.set_multicast_ttl_v4(255)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT)).into())?;
    tokio::net::UdpSocket::from_std(s.into())
}

/// Runs discovery until the receiver of `found` is gone. Errors opening the socket end it
/// (reported once); a LAN without multicast simply finds nobody.
pub(crate) async fn run(
    ctx: Context,
    found: tokio::sync::mpsc::Sender<(PeerId, Vec<Multiaddr>)>,
) -> std::io::Result<()> {
    let sock = socket()?;
    let instance = instance_name();
    let mut joined: Vec<Ipv4Addr> = Vec::new();
    let mut wait = Duration::from_secs(1);
    let mut next_query = tokio::time::Instant::now();
    let mut buf = vec![0u8; MAX_PACKET];
    let group = SocketAddr::V4(SocketAddrV4::new(GROUP, PORT));
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_query) => {
                let ifaces = multicast_interfaces(&ctx.skip_interfaces);
                for ip in &ifaces {
                    if !joined.contains(ip) && sock.join_multicast_v4(GROUP, *ip).is_ok() {
                        joined.push(*ip);
                        // New interface: announce ourselves there at once.
                        send_on(&sock, *ip, &answer(&ctx, &instance, &ifaces), group).await;
                    }
                }
                joined.retain(|ip| ifaces.contains(ip));
                let q = query(&ctx.mdns);
                for ip in &ifaces {
                    send_on(&sock, *ip, &q, group).await;
                }
                next_query = tokio::time::Instant::now() + wait;
                wait = (wait * 2).min(MAX_QUERY_INTERVAL);
            }
            r = sock.recv_from(&mut buf) => {
                let Ok((n, _from)) = r else { continue };
                let data = &buf[..n];
                if asks_for(data, &ctx.mdns) {
                    let ifaces = multicast_interfaces(&ctx.skip_interfaces);
                    let a = answer(&ctx, &instance, &ifaces);
                    for ip in &ifaces {
                        send_on(&sock, *ip, &a, group).await;
                    }
                    continue;
                }
                for (peer, addrs) in peers_in(data, &ctx.mdns) {
                    if peer != ctx.local && found.send((peer, addrs)).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        if found.is_closed() {
            return Ok(());
        }
    }
}

fn answer(ctx: &Context, instance: &str, ifaces: &[Ipv4Addr]) -> Vec<u8> {
    let addrs: Vec<String> = ctx
        .listen
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|a| {
            a.iter().any(|p| match p {
                libp2p::multiaddr::Protocol::Ip4(ip) => ifaces.contains(&ip),
                _ => false,
            })
        })
        .map(|a| format!("{a}/p2p/{}", ctx.local))
        .collect();
    response(&ctx.mdns, instance, &addrs, ifaces)
}

async fn send_on(sock: &tokio::net::UdpSocket, iface: Ipv4Addr, data: &[u8], to: SocketAddr) {
    if data.is_empty() {
        return;
    }
    let s = socket2::SockRef::from(sock);
    if s.set_multicast_if_v4(&iface).is_ok() {
        let _ = sock.send_to(data, to).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "RhNbu6rN0lW6F7L2uVxqG9Cz0k3sLm1pQ8tYxWvZaBc";

    #[test]
    fn a_query_is_recognised_only_for_its_service() {
        let q = query(SVC);
        assert!(asks_for(&q, SVC));
        assert!(
            asks_for(&q, &SVC.to_ascii_uppercase()),
            "names are case-blind"
        );
        assert!(!asks_for(&q, "other"));
        assert!(!asks_for(b"\x00\x01garbage", SVC));
    }

    #[test]
    fn an_answer_carries_the_addresses_of_its_peer() {
        let peer = PeerId::random();
        let addrs = vec![
            format!("/ip4/10.9.0.2/tcp/4567/p2p/{peer}"),
            format!("/ip4/192.168.1.2/tcp/4567/p2p/{peer}"),
        ];
        let inst = instance_name();
        assert!((32..64).contains(&inst.len()));
        assert!(
            inst.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        let r = response(SVC, &inst, &addrs, &[Ipv4Addr::new(10, 9, 0, 2)]);
        assert!(!asks_for(&r, SVC), "an answer is not a question");
        let found = peers_in(&r, SVC);
        assert_eq!(found.len(), 1);
        let got: Vec<String> = found[&peer].iter().map(|a| a.to_string()).collect();
        assert_eq!(got, addrs);
        // Another network's answer is not ours.
        assert!(peers_in(&r, "othernetwork").is_empty());
        // A truncated or hostile packet yields nothing, never a panic.
        for cut in 0..r.len() {
            let _ = peers_in(&r[..cut], SVC);
        }
    }

    #[test]
    fn one_answer_dials_a_bounded_number_of_peers_and_addresses() {
        let addrs: Vec<String> = (0..12)
            .flat_map(|_| {
                let p = PeerId::random();
                (0..12).map(move |i| format!("/ip4/10.0.0.{i}/tcp/1/p2p/{p}"))
            })
            .take(20)
            .collect();
        // 20 addresses: 12 of one peer, 8 of a second.
        let r = response(SVC, "abc", &addrs, &[]);
        let found = peers_in(&r, SVC);
        assert_eq!(found.len(), 2);
        assert!(found.values().all(|a| a.len() == MAX_ADDRS_PER_PEER));
        let many: Vec<String> = (0..12)
            .map(|_| format!("/ip4/10.0.0.1/tcp/1/p2p/{}", PeerId::random()))
            .collect();
        let found = peers_in(&response(SVC, "abc", &many, &[]), SVC);
        assert_eq!(found.len(), MAX_PEERS_PER_ANSWER);
    }

    #[test]
    fn addresses_without_a_peer_id_are_ignored() {
        let r = response(SVC, "abc", &["/ip4/10.0.0.1/tcp/1".into()], &[]);
        assert!(peers_in(&r, SVC).is_empty());
    }
}
