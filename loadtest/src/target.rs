//! Turns `--url` / `--derp-map` + `--region` into the DERP targets a scenario connects to.

use derpfleet_client::derpmap::{CertCheck, DerpMap, DerpRegion};
use derpfleet_client::{DerpTarget, DerpUrl};

use crate::cli::Common;

/// Why the targets could not be resolved (reported as a usage error).
#[derive(Debug)]
pub struct TargetError(pub String);

impl std::fmt::Display for TargetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a scenario spreads its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spread {
    /// One server: the first URL, or the (first) region.
    Single,
    /// The nodes of one region: every URL, or every node of the region (each dialed on its own).
    Nodes,
    /// The regions of a DERP map (all of them unless `--region` picks some).
    Regions,
}

/// The targets for `spread`, with a printable name each.
pub fn resolve(c: &Common, spread: Spread) -> Result<Vec<(String, DerpTarget)>, TargetError> {
    let err = |m: String| Err(TargetError(m));
    if !c.urls.is_empty() && c.derp_map.is_some() {
        return err("give either --url or --derp-map, not both".into());
    }
    if !c.urls.is_empty() {
        if spread == Spread::Regions {
            return err("fleet needs --derp-map (its regions); use mesh for a list of URLs".into());
        }
        let mut out = Vec::new();
        for u in &c.urls {
            let mut url: DerpUrl = u.parse().map_err(|e| TargetError(format!("--url: {e}")))?;
            if c.insecure {
                url.cert_check = CertCheck::Insecure;
            }
            out.push((u.clone(), DerpTarget::Url(url)));
            if spread == Spread::Single {
                break;
            }
        }
        return Ok(out);
    }
    let Some(path) = &c.derp_map else {
        return err("no target: give --url URL (e.g. http://127.0.0.1:3340/derp) or --derp-map FILE".into());
    };
    let json = std::fs::read(path).map_err(|e| TargetError(format!("--derp-map {}: {e}", path.display())))?;
    let map =
        DerpMap::from_json(&json).map_err(|e| TargetError(format!("--derp-map {}: {e}", path.display())))?;
    let pick = |id: i64| -> Result<DerpRegion, TargetError> {
        let mut r = map
            .regions
            .get(&id)
            .cloned()
            .ok_or_else(|| TargetError(format!("--region {id}: not in the DERP map")))?;
        r.nodes.retain(|n| !n.stun_only);
        if r.nodes.is_empty() {
            return Err(TargetError(format!("--region {id}: no DERP node (all STUN-only)")));
        }
        if c.insecure {
            r.nodes.iter_mut().for_each(|n| n.insecure_for_tests = true);
        }
        Ok(r)
    };
    let region_name = |r: &DerpRegion| format!("region {} ({})", r.region_id, r.region_code);
    match spread {
        Spread::Single | Spread::Nodes => {
            let id = match c.regions.as_slice() {
                [id] => *id,
                [] => return err("--derp-map needs --region ID".into()),
                _ => return err("give one --region for this scenario (fleet takes several)".into()),
            };
            let r = pick(id)?;
            if spread == Spread::Single {
                return Ok(vec![(region_name(&r), DerpTarget::Region(r))]);
            }
            Ok(r.nodes
                .iter()
                .map(|n| {
                    let mut one = r.clone();
                    one.nodes = vec![n.clone()];
                    (format!("{} node {}", region_name(&r), n.name), DerpTarget::Region(one))
                })
                .collect())
        }
        Spread::Regions => {
            let ids: Vec<i64> =
                if c.regions.is_empty() { map.regions.keys().copied().collect() } else { c.regions.clone() };
            let mut out = Vec::new();
            for id in ids {
                let r = pick(id)?;
                out.push((region_name(&r), DerpTarget::Region(r)));
            }
            if out.is_empty() {
                return err("the DERP map has no regions".into());
            }
            Ok(out)
        }
    }
}
