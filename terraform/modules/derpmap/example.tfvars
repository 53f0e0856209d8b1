# Example fleet: two regions, the first with three meshed nodes. Used by the deploy_terraform_checks test.
regions = [
  {
    region_id   = 900
    region_code = "fra"
    region_name = "Frankfurt"
    latitude    = 50.11
    longitude   = 8.68
    nodes = [
      { name = "900a", host_name = "derp900a.example.net", ipv4 = "203.0.113.10", ipv6 = "2001:db8:900::a", can_port80 = true },
      { name = "900b", host_name = "derp900b.example.net", ipv4 = "203.0.113.11", ipv6 = "2001:db8:900::b", can_port80 = true },
      { name = "900c", host_name = "derp900c.example.net", ipv4 = "203.0.113.12", ipv6 = "none" },
    ]
  },
  {
    region_id   = 901
    region_code = "iad"
    region_name = "Ashburn"
    nodes = [
      { name = "901a", host_name = "derp901a.example.net", stun_port = 3478, derp_port = 443 },
      { name = "901s", host_name = "198.51.100.7", stun_only = true, cert_name = "sha256-raw:0000000000000000000000000000000000000000000000000000000000000000" },
    ]
  },
]
region_scores = { "901" = 1.5 }
