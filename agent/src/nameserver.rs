//! The agent's DNS server for services' `hosts` (Istio's field): a query for `mydb.com`
//! is answered with the VIPs of the service that names it, so an application that calls
//! `http://mydb.com` connects to a VIP and detour rewrites the connect.
//!
//! It is authoritative for those names only and recursive for none: any other name is
//! REFUSED. The node's resolver should send it only the names it owns (per-domain
//! routing, see the README), so that names detour does not own never wait for it.
//!
//! Invariants:
//! - [`answer`] is pure: a query's bytes and the zone in, the response's bytes out;
//! - an owned name answers A with its IPv4 VIPs and AAAA with its IPv6 ones (NOERROR
//!   and no record when it has none of that family, and for every other type), with
//!   [`ANSWER_TTL`], so that a VIP that changes reaches applications within seconds;
//! - a message that is not a query gets no answer at all; one whose header parses but
//!   whose question does not gets FORMERR;
//! - UDP only: every answer fits (a service has a handful of VIPs), and glibc's
//!   resolver asks over UDP.
//!
//! Hand-written on hickory-proto's codec (the message types of the resolver the agent
//! already uses) rather than on hickory-server: the whole server is one lookup in a map,
//! and hickory-server's catalog, authorities and TCP handling would be most of the code
//! compiled in for it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_resolver::proto::op::{Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::config::Config;

/// The TTL of every answer: short, as the VIP of a name can change with the file.
pub const ANSWER_TTL: u32 = 5;

/// Owned names (lowercase, no trailing dot) → the VIPs they answer with.
pub type Zone = BTreeMap<String, Vec<IpAddr>>;

/// The zone `config` gives: every host of every service, with the service's VIPs.
#[must_use]
pub fn zone_of(config: &Config) -> Zone {
    config
        .services
        .iter()
        .flat_map(|service| {
            service
                .hosts
                .iter()
                .map(|host| (host.clone(), service.vips.clone()))
        })
        .collect()
}

/// The response to the message `query`, `None` when there is nothing to answer.
#[must_use]
pub fn answer(zone: &Zone, query: &[u8]) -> Option<Vec<u8>> {
    let request = match Message::from_vec(query) {
        Ok(request) => request,
        Err(_) => return formerr(query),
    };
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut metadata = Metadata::response_from_request(&request.metadata);
    let mut response = Message::response(metadata.id, metadata.op_code);
    response.add_queries(request.queries.clone());
    let question = match (&request.queries[..], request.metadata.op_code) {
        (_, op) if op != OpCode::Query => {
            metadata.response_code = ResponseCode::NotImp;
            None
        }
        ([question], _) => Some(question),
        _ => {
            metadata.response_code = ResponseCode::FormErr;
            None
        }
    };
    if let Some(question) = question {
        let name = question.name().to_ascii().to_ascii_lowercase();
        match zone.get(name.trim_end_matches('.')) {
            None => metadata.response_code = ResponseCode::Refused,
            Some(vips) => {
                metadata.authoritative = true;
                for vip in vips {
                    let rdata = match (question.query_type(), vip) {
                        (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
                        (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                        _ => continue,
                    };
                    response.add_answer(Record::from_rdata(
                        question.name().clone(),
                        ANSWER_TTL,
                        rdata,
                    ));
                }
            }
        }
    }
    response.metadata = metadata;
    response.to_vec().ok()
}

/// FORMERR for a message whose question could not be read, if at least its id and
/// query bit can be (the first three bytes); `None` for anything shorter or a response.
fn formerr(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

/// Binds the server's socket, at once (no await: the agent binds it from its loop when
/// the first service with `hosts` arrives). Needs a Tokio runtime.
///
/// # Errors
/// The address cannot be bound (in use, not local, no privilege for port 53).
pub fn bind(address: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(address)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Answers queries on `socket` from the latest zone `zone` holds, until the task is
/// dropped.
pub async fn serve(socket: UdpSocket, zone: watch::Receiver<Arc<Zone>>) {
    // The largest UDP message a resolver sends with EDNS; a longer one is cut and fails
    // to parse, which answers FORMERR.
    let mut buffer = vec![0_u8; 4096];
    loop {
        let (len, from) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(error) => {
                // ICMP errors from an earlier send surface here; the socket stays good.
                debug!(%error, "DNS server: receive failed");
                continue;
            }
        };
        let current = zone.borrow().clone();
        if let Some(reply) = answer(&current, &buffer[..len]) {
            if let Err(error) = socket.send_to(&reply, from).await {
                warn!(%error, %from, "DNS server: could not answer");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::op::Query;
    use hickory_resolver::proto::rr::Name;
    use std::str::FromStr;

    fn zone() -> Zone {
        let config = crate::config::parse(
            "
services:
  - name: mydb
    vips: [10.9.0.1, 'fd00::1']
    hosts: [mydb.com, db.example]
    ports: [{number: 80}]
    endpoints: [{address: 127.0.0.9}, {address: '::1'}]
  - name: plain
    vips: [10.9.0.2]
    ports: [{number: 80}]
",
        )
        .unwrap();
        zone_of(&config)
    }

    fn ask(name: &str, kind: RecordType) -> Message {
        let mut query = Message::query();
        query.metadata.id = 4242;
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(Name::from_str(name).unwrap(), kind));
        let bytes = answer(&zone(), &query.to_vec().unwrap()).expect("an answer");
        Message::from_vec(&bytes).unwrap()
    }

    fn addresses(message: &Message) -> Vec<String> {
        message
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn owned_names_answer_with_their_services_vips() {
        assert_eq!(
            zone().keys().collect::<Vec<_>>(),
            ["db.example", "mydb.com"]
        );
        let a = ask("MyDB.com.", RecordType::A);
        assert_eq!(a.metadata.id, 4242);
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert!(a.metadata.authoritative);
        assert_eq!(addresses(&a), ["10.9.0.1"]);
        assert_eq!(a.answers[0].ttl, ANSWER_TTL);
        assert_eq!(
            addresses(&ask("db.example.", RecordType::AAAA)),
            ["fd00::1"]
        );
        // A type the name has nothing of: NOERROR, no record (not NXDOMAIN, which
        // would make a resolver forget the A record too).
        let mx = ask("mydb.com.", RecordType::MX);
        assert_eq!(mx.metadata.response_code, ResponseCode::NoError);
        assert!(mx.answers.is_empty());
    }

    #[test]
    fn other_names_are_refused_and_garbage_is_not_answered() {
        let other = ask("example.org.", RecordType::A);
        assert_eq!(other.metadata.response_code, ResponseCode::Refused);
        assert!(other.answers.is_empty());
        let under = ask("www.mydb.com.", RecordType::A);
        assert_eq!(under.metadata.response_code, ResponseCode::Refused);
        // Too short to be a message: nothing. A header and a torn question: FORMERR.
        assert_eq!(answer(&zone(), b"\x01\x02"), None);
        let torn = answer(
            &zone(),
            b"\x10\x20\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05my",
        )
        .unwrap();
        let torn = Message::from_vec(&torn).unwrap();
        assert_eq!(torn.metadata.id, 0x1020);
        assert_eq!(torn.metadata.response_code, ResponseCode::FormErr);
        // A response is never answered (no loops between two servers).
        let mut response = Message::response(1, OpCode::Query);
        response.add_query(Query::query(
            Name::from_str("mydb.com.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(answer(&zone(), &response.to_vec().unwrap()), None);
    }

    #[tokio::test]
    async fn serves_over_udp_and_follows_the_zone() {
        let socket = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = socket.local_addr().unwrap();
        let (tx, rx) = watch::channel(Arc::new(zone()));
        let server = tokio::spawn(serve(socket, rx));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ask = |name: &'static str| {
            let mut query = Message::query();
            query.metadata.id = 7;
            query.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
            query.to_vec().unwrap()
        };
        let mut buffer = [0_u8; 512];
        for (zone, want) in [(zone(), vec!["10.9.0.1"]), (Zone::new(), vec![])] {
            tx.send(Arc::new(zone)).unwrap();
            client.send_to(&ask("mydb.com."), address).await.unwrap();
            let (len, _) = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                client.recv_from(&mut buffer),
            )
            .await
            .unwrap()
            .unwrap();
            assert_eq!(addresses(&Message::from_vec(&buffer[..len]).unwrap()), want);
        }
        server.abort();
    }
}
