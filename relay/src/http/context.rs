//! What the HTTP layer shares between connections: [`HttpContext`], and what `/` serves
//! ([`HomePage`], derper's `-home`).

use std::sync::Arc;

use derpfleet_proto::NodePublic;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::derp_server::DerpServer;
use crate::http::forwarded;

/// What `/` serves (`-home`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HomePage {
    /// The built-in HTML page.
    Default,
    /// An empty 200.
    Blank,
    /// A 302 to this URL.
    Redirect(String),
}

impl HomePage {
    /// Parses derper's `-home` value: `""`, `blank`, or an `http://`/`https://` URL.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" => Ok(Self::Default),
            "blank" => Ok(Self::Blank),
            u if u.starts_with("http://") || u.starts_with("https://") => Ok(Self::Redirect(u.to_owned())),
            other => Err(format!("unknown -home value {other:?}: use \"\", \"blank\" or an http(s) URL")),
        }
    }
}

/// Everything the HTTP layer needs to answer requests; shared by all connections.
pub struct HttpContext {
    /// The DERP core that takes upgraded connections.
    pub derp: Arc<DerpServer>,
    /// The server's public key (the `Derp-Public-Key` header).
    pub server_public: NodePublic,
    /// What `/` serves.
    pub home: HomePage,
    /// `-derp=false` serves `/derp` as 404.
    pub derp_enabled: bool,
    /// Owns the tasks that serve connections upgraded through hyper (they outlive the request).
    pub tasks: TaskTracker,
    /// Stops those tasks at shutdown.
    pub cancel: CancellationToken,
    /// `/healthz` and the metrics text of `/debug/varz`.
    pub status: Arc<crate::ops::metrics_http::Status>,
    /// `/bootstrap-dns` (on every port, whether or not DERP is served).
    pub bootstrap_dns: Arc<crate::ops::bootstrap_dns::BootstrapDns>,
    /// L7 proxies whose forwarding header is believed (`-forwarded-trusted`, `-forwarded-header`).
    pub forwarded: forwarded::ForwardedTrust,
    /// ACME: HTTP-01 challenge answers on the plain-HTTP port.
    pub acme: Option<Arc<crate::ops::acme::AcmeTask>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_values() {
        assert_eq!(HomePage::parse(""), Ok(HomePage::Default));
        assert_eq!(HomePage::parse("blank"), Ok(HomePage::Blank));
        assert_eq!(HomePage::parse("https://x.y/"), Ok(HomePage::Redirect("https://x.y/".into())));
        assert!(HomePage::parse("ftp://x").is_err());
    }
}
