variable "name" {
  description = "Node name, unique in the fleet and used as the DERP map node Name (e.g. \"900a\")."
  type        = string
}

variable "region_id" {
  description = "DERP region ID (900-999) this node belongs to."
  type        = number
}

variable "hostname" {
  description = "The node's DNS name (created in route53_zone_id); also its TLS name and -hostname."
  type        = string
}

variable "route53_zone_id" {
  description = "Route 53 hosted zone that holds the node's A/AAAA records."
  type        = string
}

variable "vpc_id" {
  description = "VPC for the node's security group."
  type        = string
}

variable "subnet_id" {
  description = "Public subnet for the instance (needs a route to an internet gateway)."
  type        = string
}

variable "instance_type" {
  description = "Instance type. A relay is network-bound: pick for network bandwidth, 2 vCPUs go a long way."
  type        = string
  default     = "c6in.large"
}

variable "ami_id" {
  description = "AMI to boot; null = the newest official Debian 12 amd64 image."
  type        = string
  default     = null
}

variable "enable_ipv6" {
  description = "Give the node an IPv6 address and an AAAA record (the subnet must have an IPv6 CIDR)."
  type        = bool
  default     = false
}

variable "relay_binary_url" {
  description = "HTTPS URL of the derpfleet-relay binary (linux amd64, glibc) that cloud-init installs."
  type        = string
}

variable "relay_binary_sha256" {
  description = "SHA-256 of that binary; cloud-init refuses to install anything else."
  type        = string
  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.relay_binary_sha256))
    error_message = "relay_binary_sha256 must be 64 lowercase hex characters."
  }
}

variable "mesh_key" {
  description = "The fleet's mesh key: 64 lowercase hex characters, the same on every node of the fleet."
  type        = string
  sensitive   = true
  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.mesh_key))
    error_message = "mesh_key must be 64 lowercase hex characters."
  }
}

variable "mesh_with" {
  description = "Host names of the other nodes of this region to mesh with (the node's own name is dropped)."
  type        = list(string)
  default     = []
}

variable "extra_args" {
  description = "Further relay flags, e.g. [\"-verify-client-url\", \"https://hs.example.net/verify\"]."
  type        = list(string)
  default     = []
}

variable "metrics_cidrs" {
  description = "CIDRs allowed to scrape metrics on 9090/tcp (the relay must then get -metrics-addr :9090)."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
