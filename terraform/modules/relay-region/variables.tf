variable "region" {
  description = "The DERP region: id (900-999), code (short, e.g. \"fra\"), name (for the DERP map) and one node suffix per node (node N is named \"<id><suffix>\" and \"derp<id><suffix>.<dns_zone>\")."
  type = object({
    id            = number
    code          = string
    name          = string
    node_suffixes = optional(list(string), ["a", "b", "c"])
  })
}

# One object for what every region of a fleet shares, so a fleet passes it once per region instead of
# repeating each setting; relay-node validates the values and keeps the mesh key sensitive.
variable "fleet" {
  description = "Fleet-wide settings: dns_zone (the zone the node records go in, no trailing dot) and its route53_zone_id, the fleet's mesh_key (64 lowercase hex), the relay binary's HTTPS URL and SHA-256, extra_args (further relay flags for every node) and tags (for every resource)."
  type = object({
    dns_zone            = string
    route53_zone_id     = string
    mesh_key            = string
    relay_binary_url    = string
    relay_binary_sha256 = string
    extra_args          = optional(list(string), [])
    tags                = optional(map(string), {})
  })
}

variable "vpc_id" {
  description = "VPC to place the nodes in; null = the region's default VPC."
  type        = string
  default     = null
}

variable "subnet_ids" {
  description = "Public subnets to spread the nodes over; empty = the VPC's default-for-AZ subnets."
  type        = list(string)
  default     = []
}

variable "enable_ipv6" {
  description = "IPv6 address and AAAA record per node (the subnets need IPv6 CIDRs)."
  type        = bool
  default     = false
}

variable "instance_type" {
  description = "Instance type for every node of the region."
  type        = string
  default     = "c6in.large"
}
