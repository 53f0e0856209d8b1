variable "regions" {
  description = <<-EOT
    The fleet's regions, each with its nodes in priority order (TLS clients use the first node that answers).
    Field names follow Tailscale's tailcfg.DERPRegion / DERPNode in snake_case. Optional node fields left null
    are omitted from the JSON, which means Tailscale's defaults: ipv4/ipv6 "" = resolve host_name ("none"
    disables the family), stun_port 0 = 3478 (-1 disables STUN), derp_port 0 = 443, cert_name "" = host_name.
  EOT
  type = list(object({
    region_id          = number
    region_code        = string
    region_name        = string
    latitude           = optional(number)
    longitude          = optional(number)
    no_measure_no_home = optional(bool, false)
    nodes = list(object({
      name       = string
      host_name  = string
      ipv4       = optional(string)
      ipv6       = optional(string)
      cert_name  = optional(string)
      stun_port  = optional(number)
      derp_port  = optional(number)
      stun_only  = optional(bool, false)
      can_port80 = optional(bool, false)
    }))
  }))

  validation {
    condition     = alltrue([for r in var.regions : r.region_id >= 900 && r.region_id <= 999 && floor(r.region_id) == r.region_id])
    error_message = "Every region_id must be an integer in 900-999, the range Tailscale reserves for self-hosted regions."
  }
  validation {
    condition     = length(distinct([for r in var.regions : r.region_id])) == length(var.regions)
    error_message = "region_id values must be unique."
  }
  validation {
    condition     = alltrue([for r in var.regions : length(r.nodes) > 0 && trimspace(r.region_code) != ""])
    error_message = "Every region needs a region_code and at least one node."
  }
  validation {
    condition = length(distinct(flatten([for r in var.regions : [for n in r.nodes : n.name]]))) == length(flatten([
      for r in var.regions : [for n in r.nodes : n.name]
    ]))
    error_message = "Node names must be unique across all regions (Tailscale keys nodes by name)."
  }
  validation {
    condition     = alltrue(flatten([for r in var.regions : [for n in r.nodes : trimspace(n.name) != "" && trimspace(n.host_name) != ""]]))
    error_message = "Every node needs a name and a host_name."
  }
  validation {
    condition = alltrue(flatten([for r in var.regions : [for n in r.nodes : (
      (n.stun_port == null ? true : n.stun_port >= -1 && n.stun_port <= 65535) &&
      (n.derp_port == null ? true : n.derp_port >= 0 && n.derp_port <= 65535)
    )]]))
    error_message = "stun_port must be -1 (disabled), 0 (3478) or a port; derp_port must be 0 (443) or a port."
  }
}

variable "omit_default_regions" {
  description = "Drop Tailscale's own DERP regions, so clients use only this fleet."
  type        = bool
  default     = true
}

variable "region_scores" {
  description = "HomeParams.RegionScore: region ID => latency multiplier; (0,1) favours a region as home, >1 penalizes it."
  type        = map(number)
  default     = {}
}
