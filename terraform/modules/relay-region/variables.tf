variable "region_id" {
  description = "DERP region ID (900-999)."
  type        = number
}

variable "region_code" {
  description = "Short DERP region code, e.g. \"fra\"; also part of node names and host names."
  type        = string
}

variable "region_name" {
  description = "Human-readable region name for the DERP map."
  type        = string
}

variable "node_suffixes" {
  description = "One entry per node; node N is named \"<region_id><suffix>\" and \"derp<region_id><suffix>.<dns_zone>\"."
  type        = list(string)
  default     = ["a", "b", "c"]
}

variable "dns_zone" {
  description = "DNS zone name the node records go in (without a trailing dot)."
  type        = string
}

variable "route53_zone_id" {
  description = "Route 53 hosted zone ID of dns_zone."
  type        = string
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

variable "mesh_key" {
  description = "The fleet's mesh key (64 lowercase hex)."
  type        = string
  sensitive   = true
}

variable "relay_binary_url" {
  description = "HTTPS URL of the derpfleet-relay binary."
  type        = string
}

variable "relay_binary_sha256" {
  description = "SHA-256 of the binary."
  type        = string
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

variable "extra_args" {
  description = "Further relay flags for every node of the region."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
