# One DERP region on AWS: N relay nodes in one AWS region, all meshed with each other (full mesh: every
# node dials every other node), spread over the given subnets / availability zones.

data "aws_vpc" "default" {
  count   = var.vpc_id == null ? 1 : 0
  default = true
}

data "aws_subnets" "default" {
  count = length(var.subnet_ids) == 0 ? 1 : 0
  filter {
    name   = "vpc-id"
    values = [local.vpc_id]
  }
  filter {
    name   = "default-for-az"
    values = ["true"]
  }
}

locals {
  vpc_id     = var.vpc_id != null ? var.vpc_id : data.aws_vpc.default[0].id
  subnet_ids = length(var.subnet_ids) > 0 ? var.subnet_ids : sort(data.aws_subnets.default[0].ids)
  nodes = {
    for i, s in var.region.node_suffixes : s => {
      name      = "${var.region.id}${s}"
      hostname  = "derp${var.region.id}${s}.${var.fleet.dns_zone}"
      subnet_id = local.subnet_ids[i % length(local.subnet_ids)]
    }
  }
  hostnames = [for s in var.region.node_suffixes : local.nodes[s].hostname]
}

module "node" {
  source   = "../relay-node"
  for_each = local.nodes

  name                = each.value.name
  region_id           = var.region.id
  hostname            = each.value.hostname
  route53_zone_id     = var.fleet.route53_zone_id
  vpc_id              = local.vpc_id
  subnet_id           = each.value.subnet_id
  instance_type       = var.instance_type
  enable_ipv6         = var.enable_ipv6
  mesh_key            = var.fleet.mesh_key
  mesh_with           = local.hostnames
  relay_binary_url    = var.fleet.relay_binary_url
  relay_binary_sha256 = var.fleet.relay_binary_sha256
  extra_args          = var.fleet.extra_args
  tags                = var.fleet.tags
}
