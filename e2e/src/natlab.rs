//! Home routers for NAT labs (test-lab.md §3): nftables masquerade on the WAN side, and a stateful
//! firewall that drops unsolicited WAN input in both families, as home routers do, so a direct path needs
//! both sides to punch (and an endpoint-independent NAT does not race the first packet).

use anyhow::Result;

use crate::netns::{veth, Netns};

/// How a NAT router maps ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// `masquerade`: one mapping per internal socket (hole punching works).
    EndpointIndependent,
    /// `masquerade fully-random`: a new mapping per destination (hole punching fails).
    Symmetric,
}

/// The router ruleset: IPv4 NAT out of `wan0`; forwarding from `lan0` to `wan0` and replies only, plus
/// `forward_extra` (one nft statement per line, e.g. `ct status dnat accept` for port forwarding); input
/// from the LAN, loopback, replies and ICMPv6 (neighbour discovery) only. The filter table is named
/// `router`, so a port-mapping daemon's own `inet filter` table stays separate.
pub fn router_rules(nat: Nat, forward_extra: &str) -> String {
    let masq = match nat {
        Nat::EndpointIndependent => "masquerade",
        Nat::Symmetric => "masquerade fully-random",
    };
    format!(
        "table ip nat {{
  chain post {{ type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan0\" {masq}
  }}
}}
table inet router {{
  chain forward_chain {{ type filter hook forward priority filter; policy drop;
    ct state established,related accept
    {forward_extra}
    iifname \"lan0\" oifname \"wan0\" accept
  }}
  chain input_chain {{ type filter hook input priority filter; policy drop;
    ct state established,related accept
    meta l4proto ipv6-icmp accept
    iifname {{ \"lo\", \"lan0\" }} accept
  }}
}}
"
    )
}

/// A home namespace behind its own IPv4 NAT router, the router's WAN on a veth to a shared "public"
/// namespace.
pub struct NatHome {
    /// The home (interface `h0`, 192.168.n.2/24, default route via the router).
    pub home: Netns,
    /// The router (`lan0` 192.168.n.1/24, `wan0` `<wan>.n.2/24`, default route via `public`).
    pub router: Netns,
}

impl NatHome {
    /// Builds home `n` (1, 2, …) of a lab: namespaces `<prefix>h<side>` and `<prefix>n<side>`, the
    /// public side of the WAN link `p<side>` with `<wan>.n.1/24` (`wan` is the first two octets, e.g.
    /// `172.30`), forwarding on, `rules` loaded into the router.
    pub fn new(prefix: &str, side: &str, n: usize, wan: &str, public: &Netns, rules: &str) -> Result<Self> {
        let home = Netns::new(&format!("{prefix}h{side}"))?;
        let router = Netns::new(&format!("{prefix}n{side}"))?;
        veth(&home, "h0", &format!("192.168.{n}.2/24"), &router, "lan0", &format!("192.168.{n}.1/24"))?;
        veth(
            &router,
            "wan0",
            &format!("{wan}.{n}.2/24"),
            public,
            &format!("p{side}"),
            &format!("{wan}.{n}.1/24"),
        )?;
        home.ip(&["route", "add", "default", "via", &format!("192.168.{n}.1")])?;
        router.ip(&["route", "add", "default", "via", &format!("{wan}.{n}.1")])?;
        router.enable_forwarding()?;
        router.nft(rules)?;
        Ok(Self { home, router })
    }

    /// The usual two-home lab: a forwarding "public" namespace `<prefix>p` and homes `a` (behind router 1)
    /// and `b` (behind router 2) with the same router `rules`.
    pub fn pair(prefix: &str, wan: &str, rules: &str) -> Result<(Netns, [Self; 2])> {
        let public = Netns::new(&format!("{prefix}p"))?;
        public.enable_forwarding()?;
        let homes = [
            Self::new(prefix, "a", 1, wan, &public, rules)?,
            Self::new(prefix, "b", 2, wan, &public, rules)?,
        ];
        Ok((public, homes))
    }
}
