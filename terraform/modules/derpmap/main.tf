# Builds Tailscale's DERP map (tailcfg.DERPMap) from the fleet description. Null optional fields are
# dropped rather than encoded as null, so every consumer sees exactly the fields that were set.
locals {
  regions = {
    for r in var.regions : tostring(r.region_id) => {
      for k, v in {
        RegionID        = r.region_id
        RegionCode      = r.region_code
        RegionName      = r.region_name
        Latitude        = r.latitude
        Longitude       = r.longitude
        NoMeasureNoHome = r.no_measure_no_home ? true : null
        Nodes = [
          for n in r.nodes : {
            for k, v in {
              Name      = n.name
              RegionID  = r.region_id
              HostName  = n.host_name
              CertName  = n.cert_name
              IPv4      = n.ipv4
              IPv6      = n.ipv6
              STUNPort  = n.stun_port
              STUNOnly  = n.stun_only ? true : null
              DERPPort  = n.derp_port
              CanPort80 = n.can_port80 ? true : null
            } : k => v if v != null
          }
        ]
      } : k => v if v != null
    }
  }

  derp_map = merge(
    { Regions = local.regions },
    var.omit_default_regions ? { OmitDefaultRegions = true } : {},
    length(var.region_scores) > 0 ? { HomeParams = { RegionScore = var.region_scores } } : {},
  )
}
