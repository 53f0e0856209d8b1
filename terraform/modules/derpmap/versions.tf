# Provider-free on purpose: the DERP map is pure data, so this module plans and applies anywhere
# (CI included) without cloud credentials or provider downloads.
terraform {
  required_version = ">= 1.3"
}
