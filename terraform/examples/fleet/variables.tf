variable "dns_zone" {
  description = "Existing Route 53 public zone for the relay names, e.g. \"derp.example.net\"."
  type        = string
}

variable "relay_binary_url" {
  description = "HTTPS URL of the derpfleet-relay release binary (linux amd64)."
  type        = string
}

variable "relay_binary_sha256" {
  description = "SHA-256 of that binary."
  type        = string
}

variable "verify_client_url" {
  description = "Optional admission URL (headscale's /verify endpoint); \"\" = admit every client."
  type        = string
  default     = ""
}

variable "mesh_key_generation" {
  description = "Bump to generate a new mesh key; then roll the nodes as docs/operators.md describes."
  type        = number
  default     = 1
}
