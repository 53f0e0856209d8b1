//! A responder bound to a wildcard address answers from the address each request was sent to,
//! not from the one routing would pick: on a host with several addresses (IPv6 hosts usually have
//! several) an answer from another address is dropped by the client's firewall or NAT.
//!
//! On loopback, routing answers a client on 127.0.0.1 from 127.0.0.1 whatever address it asked,
//! so a request to 127.0.0.3 shows the difference. For IPv6 the test makes its own network
//! namespace (deleted at the end) with a second address on its loopback.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{recv_within, TestServer};
use derpfleet_stun::message::{build_request, parse_response, TxId};
use derpfleet_stun::StunConfig;
use tokio::net::UdpSocket;

/// Sends one Binding request to `to` and returns where the answer came from.
async fn answer_source(client: &UdpSocket, to: SocketAddr) -> SocketAddr {
    let txid = TxId::random();
    client.send_to(&build_request(txid), to).await.unwrap();
    let (raw, from) = recv_within(client, Duration::from_secs(5)).await.expect("an answer");
    assert_eq!(parse_response(&raw).expect("a Binding success").0, txid);
    from
}

#[tokio::test]
async fn ipv4_wildcard_socket_answers_from_the_address_asked() {
    let server = TestServer::start("0.0.0.0:0", 1, StunConfig::default());
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for ip in ["127.0.0.3", "127.0.0.1", "127.0.0.7"] {
        let to = SocketAddr::new(ip.parse().unwrap(), server.addr.port());
        assert_eq!(answer_source(&client, to).await, to, "answer to a request sent to {to}");
    }
    server.stop().await;
}

#[tokio::test]
async fn dual_stack_wildcard_socket_answers_ipv4_from_the_address_asked() {
    let server = TestServer::start("[::]:0", 2, StunConfig::default());
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for ip in ["127.0.0.3", "127.0.0.5"] {
        let to = SocketAddr::new(ip.parse().unwrap(), server.addr.port());
        assert_eq!(answer_source(&client, to).await, to);
    }
    server.stop().await;
}

/// A network namespace for this process, deleted on drop.
struct Netns(String);
impl Netns {
    fn new() -> Netns {
        let name = format!("dfstunsrc-{}", std::process::id() % 100_000);
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name]).expect("ip netns add");
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]).unwrap();
        ip(&["-n", &ns.0, "-6", "addr", "add", "fd00:5:7::2/128", "dev", "lo", "nodad"]).unwrap();
        ns
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}
fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip").args(args).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
    }
}

#[test]
fn ipv6_wildcard_socket_answers_from_the_address_asked() {
    let ns = Netns::new();
    let path = format!("/var/run/netns/{}", ns.0);
    // Sockets belong to the namespace of the thread that creates them: run the whole exchange on
    // a thread that has entered the lab namespace.
    let sources = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let server = TestServer::start("[::]:0", 1, StunConfig::default());
            let client = UdpSocket::bind("[::1]:0").await.unwrap();
            let port = server.addr.port();
            let mut got = Vec::new();
            for ip in ["fd00:5:7::2", "::1"] {
                let to = SocketAddr::new(ip.parse().unwrap(), port);
                got.push((to, answer_source(&client, to).await));
            }
            server.stop().await;
            got
        })
    })
    .join()
    .expect("lab thread");
    for (to, from) in sources {
        assert_eq!(from, to, "answer to a request sent to {to}");
    }
    drop(ns);
}
