output "derp_map_json" {
  description = "DERP map JSON for the tailnet policy (\"derpMap\"), headscale derp.urls, or derpfleet-client."
  value       = module.derpmap.derp_map_json
}

output "headscale_derp_yaml" {
  description = "The same map in the form headscale's derp.paths file needs."
  value       = module.derpmap.headscale_derp_yaml
}

output "mesh_key" {
  description = "The fleet's mesh key (also needed by any derper/derpfleet node meshed by hand)."
  value       = random_id.mesh_key.hex
  sensitive   = true
}

output "instance_ids" {
  description = "Node name => EC2 instance ID, per region."
  value       = { fra = module.fra.instance_ids, iad = module.iad.instance_ids, sin = module.sin.instance_ids }
}
