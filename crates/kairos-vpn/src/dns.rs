//! Mesh DNS, as EdgeVPN's embedded server and a little more.
//!
//! A question is answered, in this order:
//! 1. `<hostname>.<domain>` (A): the VPN address of the live machine with that hostname in
//!    the `machines` bucket (kairos-rs; EdgeVPN has no names for machines);
//! 2. a `dns` bucket entry whose key — a Go regexp, unanchored — matches the name with its
//!    trailing dot, with a record for the asked type (the value maps the type's number as a
//!    decimal string to the record, `{"1":"10.1.0.5"}`), as EdgeVPN answers;
//! 3. forwarded to the upstream servers (2 s each), or NXDOMAIN for names under the mesh
//!    domain and SERVFAIL otherwise.
//!
//! Regexps come from the ledger — peers' input — so each is bounded (1 KiB, size-limited
//! compile) and a bad one is skipped.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use simple_dns::rdata::{A, AAAA, CNAME, RData, TXT};
use simple_dns::{CLASS, Name, Packet, PacketFlag, QTYPE, RCODE, ResourceRecord, TYPE};

/// The records the mesh knows now.
#[derive(Debug, Default, Clone)]
pub struct Zone {
    pub domain: String,
    /// hostname (lowercase) → address.
    pub hosts: BTreeMap<String, Ipv4Addr>,
    /// `dns` bucket entries, their regexps compiled once (see [`Zone::set_records`]).
    records: Vec<Record>,
}

/// A `dns` bucket entry: regexp → (type number → value).
pub type Entry = (String, BTreeMap<String, String>);

#[derive(Debug, Clone)]
struct Record {
    entry: Entry,
    /// None: the pattern is not a regexp this server accepts (skipped).
    regex: Option<regex::Regex>,
}

impl Zone {
    /// An empty zone for `domain`.
    pub fn new(domain: &str) -> Zone {
        Zone {
            domain: domain.to_string(),
            ..Zone::default()
        }
    }

    /// Takes the `dns` bucket as it is now; patterns are compiled only when the entries
    /// changed (the daemon calls this every second, queries read it).
    pub fn set_records(&mut self, entries: Vec<Entry>) {
        if self.records.len() == entries.len()
            && self
                .records
                .iter()
                .zip(&entries)
                .all(|(r, e)| &r.entry == e)
        {
            return;
        }
        self.records = entries
            .into_iter()
            .map(|entry| Record {
                regex: compile(&entry.0),
                entry,
            })
            .collect();
    }
}

/// Forwarded queries in flight at most.
pub const MAX_FORWARDS: usize = 64;

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Reply(Vec<u8>),
    Forward,
}

fn type_number(t: TYPE) -> u16 {
    u16::from(t)
}

/// A pattern from the ledger, bounded: 1 KiB of text, 1 MiB compiled.
fn compile(pattern: &str) -> Option<regex::Regex> {
    if pattern.len() > 1024 {
        return None;
    }
    regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .ok()
}

/// Answers `query` from `zone`, or says to forward it.
pub fn answer(zone: &Zone, query: &[u8]) -> Option<Answer> {
    let q = Packet::parse(query).ok()?;
    let question = q.questions.first()?.clone();
    let name = question
        .qname
        .to_string()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let QTYPE::TYPE(qtype) = question.qtype else {
        return Some(Answer::Forward);
    };
    let mut reply = Packet::new_reply(q.id());
    reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
    if q.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED | PacketFlag::RECURSION_AVAILABLE);
    }
    reply.questions.push(question.clone());
    let qname = question.qname.clone();
    let suffix = format!(".{}", zone.domain);
    if let Some(ip) = name.strip_suffix(&suffix).and_then(|h| zone.hosts.get(h)) {
        if qtype == TYPE::A {
            reply.answers.push(ResourceRecord::new(
                qname,
                CLASS::IN,
                30,
                RData::A(A::from(*ip)),
            ));
        }
        return reply.build_bytes_vec().ok().map(Answer::Reply);
    }
    let fqdn = format!("{name}.");
    for r in &zone.records {
        let recs = &r.entry.1;
        if !r.regex.as_ref().is_some_and(|re| re.is_match(&fqdn)) {
            continue;
        }
        let Some(value) = recs.get(&type_number(qtype).to_string()) else {
            continue;
        };
        let rdata = match qtype {
            TYPE::A => value
                .parse::<Ipv4Addr>()
                .ok()
                .map(|ip| RData::A(A::from(ip))),
            TYPE::AAAA => value
                .parse::<Ipv6Addr>()
                .ok()
                .map(|ip| RData::AAAA(AAAA::from(ip))),
            TYPE::CNAME => Name::new(value).ok().map(|n| RData::CNAME(CNAME(n))),
            TYPE::TXT => TXT::new().with_string(value).ok().map(RData::TXT),
            _ => None,
        };
        if let Some(rdata) = rdata {
            reply
                .answers
                .push(ResourceRecord::new(qname, CLASS::IN, 30, rdata));
            return reply.build_bytes_vec().ok().map(Answer::Reply);
        }
    }
    if name == zone.domain || name.ends_with(&suffix) {
        *reply.rcode_mut() = RCODE::NameError;
        return reply.build_bytes_vec().ok().map(Answer::Reply);
    }
    Some(Answer::Forward)
}

/// A SERVFAIL for a query that could not be forwarded.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let q = Packet::parse(query).ok()?;
    let mut reply = Packet::new_reply(q.id());
    reply.questions = q.questions.clone();
    *reply.rcode_mut() = RCODE::ServerFailure;
    reply.build_bytes_vec().ok()
}

/// The nameservers of a resolv.conf, without `skip` (ourselves).
pub fn nameservers(resolv_conf: &str, skip: &SocketAddr) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .filter(|a| a != skip && !(a.ip().is_loopback() && skip.ip().is_loopback()))
        .collect()
}

/// Serves DNS on `listen` until the process ends; `zone` is read at each query.
pub async fn serve(
    listen: SocketAddr,
    zone: std::sync::Arc<std::sync::RwLock<Zone>>,
    forward: Vec<SocketAddr>,
) -> std::io::Result<()> {
    let sock = std::sync::Arc::new(tokio::net::UdpSocket::bind(listen).await?);
    // Forwarded queries in flight at once; beyond that a query gets SERVFAIL at once (a
    // flood must not grow tasks and sockets without bound).
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS));
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        let query = buf[..n].to_vec();
        let a = zone.read().ok().and_then(|z| answer(&z, &query));
        match a {
            None => {}
            Some(Answer::Reply(r)) => {
                let _ = sock.send_to(&r, from).await;
            }
            Some(Answer::Forward) => {
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    if let Some(r) = servfail(&query) {
                        let _ = sock.send_to(&r, from).await;
                    }
                    continue;
                };
                let (sock, forward) = (sock.clone(), forward.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let r = match relay(&query, &forward).await {
                        Some(r) => Some(r),
                        None => servfail(&query),
                    };
                    if let Some(r) = r {
                        let _ = sock.send_to(&r, from).await;
                    }
                });
            }
        }
    }
}

async fn relay(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in upstreams {
        let bind: SocketAddr = if up.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let Ok(s) = tokio::net::UdpSocket::bind(bind).await else {
            continue;
        };
        if s.send_to(query, up).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_secs(2), s.recv_from(&mut buf)).await
            && from == *up
            && n >= 2
            && buf[..2] == query[..2]
        {
            buf.truncate(n);
            return Some(buf);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::{QCLASS, Question};

    fn query(name: &str, t: TYPE) -> Vec<u8> {
        let mut p = Packet::new_query(7);
        p.set_flags(PacketFlag::RECURSION_DESIRED);
        p.questions.push(Question::new(
            Name::new(name).unwrap(),
            QTYPE::TYPE(t),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.build_bytes_vec().unwrap()
    }

    fn zone() -> Zone {
        let mut z = Zone::new("mesh");
        z.hosts.insert("node1".into(), Ipv4Addr::new(10, 1, 0, 1));
        let mut r = BTreeMap::new();
        r.insert("1".into(), "10.1.0.77".into());
        z.set_records(vec![
            ("^api\\.example\\.com\\.$".into(), r),
            ("(((bad".into(), BTreeMap::new()),
        ]);
        z
    }

    fn a_of(reply: &Answer) -> Vec<Ipv4Addr> {
        let Answer::Reply(r) = reply else {
            panic!("forwarded")
        };
        Packet::parse(r)
            .unwrap()
            .answers
            .iter()
            .filter_map(|a| match &a.rdata {
                RData::A(a) => Some(Ipv4Addr::from(a.address)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn machine_names_and_ledger_records() {
        let z = zone();
        let r = answer(&z, &query("NODE1.mesh", TYPE::A)).unwrap();
        assert_eq!(a_of(&r), vec![Ipv4Addr::new(10, 1, 0, 1)]);
        let r = answer(&z, &query("api.example.com", TYPE::A)).unwrap();
        assert_eq!(a_of(&r), vec![Ipv4Addr::new(10, 1, 0, 77)]);
        // Unknown in the mesh domain: NXDOMAIN, never forwarded.
        let Answer::Reply(r) = answer(&z, &query("nobody.mesh", TYPE::A)).unwrap() else {
            panic!()
        };
        assert_eq!(Packet::parse(&r).unwrap().rcode(), RCODE::NameError);
        // Elsewhere: forwarded.
        assert_eq!(
            answer(&z, &query("debian.org", TYPE::A)),
            Some(Answer::Forward)
        );
        // A known host asked for another type: an empty answer, not a lie.
        let r = answer(&z, &query("node1.mesh", TYPE::AAAA)).unwrap();
        assert!(a_of(&r).is_empty());
        assert_eq!(answer(&z, b"garbage"), None);
    }

    #[test]
    fn resolv_conf_nameservers_without_ourselves() {
        let me: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let rc =
            "# x\nnameserver 127.0.0.1\nnameserver 192.0.2.53\nnameserver fe80::1\nsearch lan\n";
        let ns = nameservers(rc, &me);
        assert_eq!(
            ns,
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
