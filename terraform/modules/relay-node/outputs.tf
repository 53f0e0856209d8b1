output "derp_node" {
  description = "This node as an entry of the derpmap module's regions[*].nodes."
  value = {
    name       = var.name
    host_name  = var.hostname
    ipv4       = aws_eip.relay.public_ip
    ipv6       = var.enable_ipv6 ? aws_instance.relay.ipv6_addresses[0] : null
    can_port80 = true
  }
}

output "instance_id" {
  description = "EC2 instance ID (for SSM sessions: aws ssm start-session --target ID)."
  value       = aws_instance.relay.id
}

output "public_ipv4" {
  description = "The node's Elastic IP."
  value       = aws_eip.relay.public_ip
}
