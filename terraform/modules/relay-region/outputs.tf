output "derp_region" {
  description = "This region as an entry of the derpmap module's regions list (nodes in suffix order)."
  value = {
    region_id   = var.region.id
    region_code = var.region.code
    region_name = var.region.name
    nodes       = [for s in var.region.node_suffixes : module.node[s].derp_node]
  }
}

output "instance_ids" {
  description = "Node name => EC2 instance ID."
  value       = { for s, n in module.node : local.nodes[s].name => n.instance_id }
}
