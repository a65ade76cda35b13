//! An authoritative DNS server on a loopback UDP port whose records the test changes:
//! the "DNS" of tests of endpoints given by name, with no network beyond the machine.
//!
//! It answers A and AAAA queries from its records (authoritative, the record's TTL),
//! an existing name with no record of the type asked for with an empty NOERROR, an
//! unknown name with NXDOMAIN, and, while [`DnsServer::set_answering`] is off, nothing
//! at all (a resolver that stopped answering). Messages are read and written with
//! hickory-proto, the codec of the resolver the agent uses.
//!
//! Bounded like every fixture: its thread wakes every 50 ms to see whether it should
//! stop, and `Drop` stops and joins it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use hickory_proto::op::{Message, MessageType, Metadata, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};

#[derive(Default)]
struct Zone {
    /// Lowercase name without the trailing dot → its addresses and their TTL.
    records: HashMap<String, (Vec<IpAddr>, u32)>,
}

pub struct DnsServer {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    answering: Arc<AtomicBool>,
    queries: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    /// Starts a server on `127.0.0.1`, any free port.
    pub fn start() -> Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").context("binding the test DNS server")?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = socket.local_addr()?;
        let zone = Arc::new(Mutex::new(Zone::default()));
        let answering = Arc::new(AtomicBool::new(true));
        let queries = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (zone, answering, queries, stop) = (
                zone.clone(),
                answering.clone(),
                queries.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut buffer = [0_u8; 4096];
                while !stop.load(Ordering::SeqCst) {
                    let Ok((len, from)) = socket.recv_from(&mut buffer) else {
                        continue;
                    };
                    queries.fetch_add(1, Ordering::SeqCst);
                    if !answering.load(Ordering::SeqCst) {
                        continue;
                    }
                    let zone = zone.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(reply) = answer(&zone, &buffer[..len]) {
                        let _ = socket.send_to(&reply, from);
                    }
                }
            })
        };
        Ok(Self {
            addr,
            zone,
            answering,
            queries,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens, for `--dns-server`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes `name` resolve to `addresses` with `ttl` seconds (replacing what it had).
    pub fn set(&self, name: &str, addresses: &[IpAddr], ttl: u32) {
        let mut zone = self.zone.lock().unwrap_or_else(PoisonError::into_inner);
        zone.records.insert(normal(name), (addresses.to_vec(), ttl));
    }

    /// Makes `name` unknown (NXDOMAIN).
    pub fn remove(&self, name: &str) {
        let mut zone = self.zone.lock().unwrap_or_else(PoisonError::into_inner);
        zone.records.remove(&normal(name));
    }

    /// Whether queries are answered at all.
    pub fn set_answering(&self, on: bool) {
        self.answering.store(on, Ordering::SeqCst);
    }

    /// Queries received so far, answered or not.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn normal(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The response to one query message; `None` for what is not a query at all.
fn answer(zone: &Zone, query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = true;
    let mut response = Message::response(metadata.id, metadata.op_code);
    response.metadata = metadata;
    response.add_queries(request.queries.clone());
    let Some(question) = request.queries.first() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return response.to_vec().ok();
    };
    match zone.records.get(&normal(&question.name().to_string())) {
        None => response.metadata.response_code = ResponseCode::NXDomain,
        Some((addresses, ttl)) => {
            for address in addresses {
                let rdata = match (question.query_type(), address) {
                    (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
                    (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                response.add_answer(Record::from_rdata(question.name().clone(), *ttl, rdata));
            }
        }
    }
    response.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn ask(server: &DnsServer, name: &str, kind: RecordType) -> Option<Message> {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut query = Message::query();
        query.metadata.id = 7;
        query.add_query(Query::query(Name::from_str(name).unwrap(), kind));
        socket
            .send_to(&query.to_vec().unwrap(), server.addr())
            .unwrap();
        let mut buffer = [0_u8; 4096];
        let (len, _) = socket.recv_from(&mut buffer).ok()?;
        Some(Message::from_vec(&buffer[..len]).unwrap())
    }

    #[test]
    fn answers_from_its_records_and_can_fall_silent() {
        let server = DnsServer::start().unwrap();
        server.set(
            "Db.Example.",
            &["127.0.0.7".parse().unwrap(), "::7".parse().unwrap()],
            9,
        );
        let a = ask(&server, "db.example.", RecordType::A).unwrap();
        assert_eq!(a.metadata.id, 7);
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(a.answers[0].ttl, 9);
        assert_eq!(a.answers[0].data, RData::A(A("127.0.0.7".parse().unwrap())));
        let aaaa = ask(&server, "db.example.", RecordType::AAAA).unwrap();
        assert_eq!(
            aaaa.answers[0].data,
            RData::AAAA(AAAA("::7".parse().unwrap()))
        );
        let unknown = ask(&server, "other.example.", RecordType::A).unwrap();
        assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);
        server.remove("db.example");
        let gone = ask(&server, "db.example.", RecordType::A).unwrap();
        assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);
        server.set_answering(false);
        assert!(ask(&server, "db.example.", RecordType::A).is_none());
        assert_eq!(server.queries(), 5);
    }
}
