//! Mesh links over TLS, as derper makes them: `https://host/derp` verified for `host` (here by a
//! private CA given as an extra root, as `-mesh-ca-file` or the system store would), dialed at
//! the `/dialhost` address. Without the CA the link is refused.

use crate::mesh_common;

use derpfleet_relay::testing::{temp_dir, TempDir};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use derpfleet_client::{ConnectOptions, DerpTarget, DerpUrl};
use derpfleet_proto::{MeshKey, NodePrivate};
use derpfleet_relay::core::derp_server::DerpServerConfig;
use derpfleet_relay::http::HomePage;
use derpfleet_relay::mesh::{Mesh, MeshConfig, MeshPeer};
use derpfleet_relay::server::{Server, ServerConfig, TcpConfig};
use mesh_common::{eventually, gauge, knows};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::CertificateDer;

/// A test CA: its DER, and an issuer for leaves.
fn test_ca() -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "mesh_tls test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    (cert.der().clone(), Issuer::new(params, key))
}

/// A TLS relay for `name`, its certificate issued by `ca`, on an ephemeral loopback port.
async fn tls_relay(dir: &TempDir, name: &str, ca: &Issuer<'static, KeyPair>, mesh: MeshKey) -> Server {
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&key, ca).unwrap();
    std::fs::write(dir.path().join(format!("{name}.crt")), leaf.pem()).unwrap();
    std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
    let private = NodePrivate::generate();
    let setup =
        derpfleet_relay::http::tls::manual(dir.path(), name, &private.public()).expect("certificate loads");
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: Some(setup.config),
        http_port: None,
        home: HomePage::Default,
        derp_enabled: true,
        derp: DerpServerConfig { mesh_key: Some(mesh), ..DerpServerConfig::new(private) },
        tcp: TcpConfig::default(),
    };
    Server::spawn(config).await.unwrap()
}

/// derper's entry form `host:port/dialhost`.
fn entry(name: &str, s: &Server) -> MeshPeer {
    MeshPeer::parse(&format!("{name}:{}/127.0.0.1", s.local_addr().port())).unwrap()
}

async fn tls_client(
    name: &str,
    addr: SocketAddr,
    root: &CertificateDer<'static>,
) -> Result<mesh_common::Client> {
    let mut url: DerpUrl = format!("https://{name}:{}/derp", addr.port()).parse()?;
    url.dial_addr = Some(addr);
    let opts =
        ConnectOptions { extra_roots: vec![root.clone()], ..ConnectOptions::new(NodePrivate::generate()) };
    mesh_common::Client::connect_target(&DerpTarget::Url(url), opts).await
}

#[tokio::test]
async fn tls_links_verify_the_host_name_and_dial_the_dial_host() -> Result<()> {
    let dir = temp_dir("mesh-tls");
    let (ca_der, ca) = test_ca();
    let key = MeshKey::generate();
    let s1 = tls_relay(&dir, "derp1.mesh.test", &ca, key).await;
    let s2 = tls_relay(&dir, "derp2.mesh.test", &ca, key).await;
    let peers = vec![entry("derp1.mesh.test", &s1), entry("derp2.mesh.test", &s2)];

    // Without the private CA the certificate is not trusted: no link.
    let untrusted = Mesh::start(
        s1.derp().clone(),
        MeshConfig { extra_roots: Vec::new(), ..MeshConfig::new(key, peers.clone()) },
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gauge(&s1, "derp_mesh_peers_connected"), 0.0);
    untrusted.shutdown().await;

    let trusted = |s: &Server| {
        let mut config = MeshConfig::new(key, peers.clone());
        config.extra_roots.push(ca_der.clone());
        Mesh::start(s.derp().clone(), config)
    };
    let _m1 = trusted(&s1);
    let _m2 = trusted(&s2);
    eventually("s1 linked", || gauge(&s1, "derp_mesh_peers_connected") == 1.0).await?;
    eventually("s2 linked", || gauge(&s2, "derp_mesh_peers_connected") == 1.0).await?;
    let mut a = tls_client("derp1.mesh.test", s1.local_addr(), &ca_der).await?;
    let mut b = tls_client("derp2.mesh.test", s2.local_addr(), &ca_der).await?;
    eventually("s1 knows b", || knows(&s1, &b.public())).await?;
    eventually("s2 knows a", || knows(&s2, &a.public())).await?;
    a.deliver_to(&mut b, "over TLS mesh").await?;
    b.deliver_to(&mut a, "and back").await?;
    Ok(())
}
