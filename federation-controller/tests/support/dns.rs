//! A DNS server of the tests' own on 127.0.0.1, knowing a few names: enough of
//! RFC 1035 for hickory's resolver (and any stub resolver) to ask it.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

/// What the server answers for one name.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A records with a TTL in seconds.
    A(Vec<Ipv4Addr>, u32),
    ServFail,
}

/// The names it knows, and how many A queries each has had.
type Zone = BTreeMap<String, (Reply, u32)>;

/// A DNS server on 127.0.0.1 over UDP: A queries for a name it knows get its
/// reply, other types of it no records, other names NXDOMAIN.
pub struct Dns {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
}

impl Dns {
    pub async fn start(names: &[(&str, Reply)]) -> Dns {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let zone: Zone = names
            .iter()
            .map(|(n, r)| (n.to_ascii_lowercase(), (r.clone(), 0)))
            .collect();
        let zone = Arc::new(Mutex::new(zone));
        let z = zone.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let out = answer(&buf[..n], &mut z.lock().unwrap());
                if let Some(out) = out {
                    let _ = socket.send_to(&out, from).await;
                }
            }
        });
        Dns { addr, zone }
    }

    /// From now on, `name` is answered with `reply`.
    pub fn set(&self, name: &str, reply: Reply) {
        let mut zone = self.zone.lock().unwrap();
        zone.entry(name.to_ascii_lowercase()).or_insert((Reply::ServFail, 0)).0 = reply;
    }

    /// The A queries `name` has had.
    pub fn asked(&self, name: &str) -> u32 {
        self.zone.lock().unwrap().get(name).map_or(0, |(_, n)| *n)
    }
}

/// The response to one DNS query (RFC 1035 §4.1), or None for what is no query.
fn answer(query: &[u8], zone: &mut Zone) -> Option<Vec<u8>> {
    let header = query.get(..12)?;
    if header[2] & 0x80 != 0 || u16::from_be_bytes([header[4], header[5]]) != 1 {
        return None; // a response, or not exactly one question
    }
    // The question: length-prefixed labels up to the empty one, then type and class.
    let mut labels = Vec::new();
    let mut i = 12;
    loop {
        let len = *query.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question = query.get(12..i + 4)?;
    let known = zone.get_mut(&labels.join("."));
    let (rcode, records): (u8, Vec<(Ipv4Addr, u32)>) = match known {
        None => (3, vec![]),
        Some((reply, asked)) => {
            if qtype == 1 {
                *asked += 1;
            }
            match reply {
                Reply::ServFail => (2, vec![]),
                Reply::A(ips, ttl) if qtype == 1 => (0, ips.iter().map(|ip| (*ip, *ttl)).collect()),
                Reply::A(..) => (0, vec![]),
            }
        }
    };
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&header[..2]); // the query's ID
    out.push(0x84 | (header[2] & 0x01)); // a response, authoritative, RD echoed
    out.push(0x80 | rcode); // recursion available
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(records.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // no authority, no additional records
    out.extend_from_slice(question);
    for (ip, ttl) in records {
        out.extend_from_slice(&[0xc0, 0x0c]); // the name: a pointer to the question's
        out.extend_from_slice(&1u16.to_be_bytes()); // A
        out.extend_from_slice(&1u16.to_be_bytes()); // IN
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}
