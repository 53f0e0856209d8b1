output "derp_map" {
  description = "The DERP map as a Terraform object (Tailscale's field names)."
  value       = local.derp_map
}

output "derp_map_json" {
  description = "The DERP map JSON: the tailnet policy's \"derpMap\", headscale's derp.urls target, derpfleet-client's map."
  value       = jsonencode(local.derp_map)
}

output "headscale_derp_yaml" {
  description = <<-EOT
    The same map for headscale's derp.paths file. Headscale reads that file with a YAML decoder that matches
    lowercased Go field names and integer region keys, so the JSON spelling would be silently ignored there.
  EOT
  value = templatefile("${path.module}/headscale-derp.yaml.tftpl", {
    regions              = var.regions
    omit_default_regions = var.omit_default_regions
    region_scores        = var.region_scores
  })
}
