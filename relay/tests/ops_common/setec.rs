//! A stand-in for a setec server (Tailscale's secrets service, which cannot run here), written
//! from setec's public client protocol (`client/setec/client.go`, `types/api`): `POST /api/get`
//! with `{"Name":…,"Version":0}` answers 200 `{"Value":"<base64>","Version":1}` for a known
//! name, 404 for an unknown one, and 403 when the request lacks `Sec-X-Tailscale-No-Browsers:
//! setec` (setec's server refuses browser-originated requests that way).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub struct SetecServer {
    pub addr: SocketAddr,
    /// Names asked for, in order.
    pub asked: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SetecServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SetecServer {
    pub async fn start(secrets: &[(&str, &str)]) -> SetecServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let secrets: Arc<HashMap<String, String>> =
            Arc::new(secrets.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        let asked = Arc::new(Mutex::new(Vec::new()));
        let sink = asked.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (secrets, sink) = (secrets.clone(), sink.clone());
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                            let (secrets, sink) = (secrets.clone(), sink.clone());
                            async move { Ok::<_, Infallible>(answer(req, &secrets, &sink).await) }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        SetecServer { addr, asked, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn reply(status: u16, body: String) -> http::Response<Full<Bytes>> {
    http::Response::builder().status(status).body(Full::new(Bytes::from(body))).unwrap()
}

async fn answer(
    req: http::Request<hyper::body::Incoming>,
    secrets: &HashMap<String, String>,
    asked: &Mutex<Vec<String>>,
) -> http::Response<Full<Bytes>> {
    if req.method() != http::Method::POST || req.uri().path() != "/api/get" {
        return reply(404, "not found\n".into());
    }
    if req.headers().get("sec-x-tailscale-no-browsers").and_then(|v| v.to_str().ok()) != Some("setec") {
        return reply(403, "access denied\n".into());
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return reply(400, "bad request\n".into());
    };
    let name = v["Name"].as_str().unwrap_or("").to_owned();
    asked.lock().unwrap().push(name.clone());
    match secrets.get(&name) {
        Some(value) => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(value.as_bytes());
            reply(200, serde_json::json!({ "Value": b64, "Version": 1 }).to_string())
        }
        None => reply(404, "secret not found\n".into()),
    }
}
