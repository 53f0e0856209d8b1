# One regional relay node on AWS: instance + Elastic IP + security group + DNS records + cloud-init that
# installs the relay binary, the systemd unit and the mesh key.

data "aws_ami" "debian12" {
  count       = var.ami_id == null ? 1 : 0
  most_recent = true
  owners      = ["136693071363"] # Debian's official AWS account
  filter {
    name   = "name"
    values = ["debian-12-amd64-*"]
  }
  filter {
    name   = "architecture"
    values = ["x86_64"]
  }
}

locals {
  ami_id    = var.ami_id != null ? var.ami_id : data.aws_ami.debian12[0].id
  mesh_with = [for h in var.mesh_with : h if h != var.hostname]
  relay_args = concat(
    ["-hostname", var.hostname, "-certmode", "letsencrypt"],
    length(local.mesh_with) > 0 ? ["-mesh-with", join(",", local.mesh_with)] : [],
    var.extra_args,
  )
  user_data = templatefile("${path.module}/cloud-init.yaml.tftpl", {
    mesh_key      = "${var.mesh_key}\n"
    env_file      = "DERPFLEET_ARGS=\"${join(" ", local.relay_args)}\"\n"
    unit          = file("${path.module}/../../../deploy/derpfleet-relay.service")
    binary_url    = var.relay_binary_url
    binary_sha256 = var.relay_binary_sha256
  })
  tags = merge(var.tags, { Name = "derp-${var.name}", "derpfleet:region" = tostring(var.region_id) })
}

# --- firewall: DERP (443/tcp), HTTP (80/tcp: ACME HTTP-01, captive-portal checks), STUN (3478/udp) ---
resource "aws_security_group" "relay" {
  name_prefix = "derp-${var.name}-"
  description = "derpfleet relay ${var.name}: DERP 443/tcp, HTTP 80/tcp, STUN 3478/udp"
  vpc_id      = var.vpc_id
  tags        = local.tags
  lifecycle {
    create_before_destroy = true
  }
}

locals {
  public_ingress = {
    derp_v4 = { proto = "tcp", port = 443, cidr4 = "0.0.0.0/0", cidr6 = null, what = "DERP over HTTPS (IPv4)" }
    derp_v6 = { proto = "tcp", port = 443, cidr4 = null, cidr6 = "::/0", what = "DERP over HTTPS (IPv6)" }
    stun_v4 = { proto = "udp", port = 3478, cidr4 = "0.0.0.0/0", cidr6 = null, what = "STUN (IPv4)" }
    stun_v6 = { proto = "udp", port = 3478, cidr4 = null, cidr6 = "::/0", what = "STUN (IPv6)" }
  }
}

resource "aws_vpc_security_group_ingress_rule" "public" {
  for_each          = local.public_ingress
  security_group_id = aws_security_group.relay.id
  description       = each.value.what
  ip_protocol       = each.value.proto
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr4
  cidr_ipv6         = each.value.cidr6
  tags              = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "http" {
  #checkov:skip=CKV_AWS_260:Port 80 must be open to the world: ACME HTTP-01 validation and tailscaled's captive-portal check (CanPort80, /generate_204) come from anywhere; DERP itself is never spoken there.
  for_each          = { v4 = { cidr4 = "0.0.0.0/0", cidr6 = null }, v6 = { cidr4 = null, cidr6 = "::/0" } }
  security_group_id = aws_security_group.relay.id
  description       = "ACME HTTP-01, /generate_204 and redirects to HTTPS (${each.key})"
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80
  cidr_ipv4         = each.value.cidr4
  cidr_ipv6         = each.value.cidr6
  tags              = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "icmp_echo" {
  security_group_id = aws_security_group.relay.id
  description       = "ICMP echo: netcheck pings DERP nodes when UDP is blocked"
  ip_protocol       = "icmp"
  from_port         = 8
  to_port           = 0
  cidr_ipv4         = "0.0.0.0/0"
  tags              = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "metrics" {
  for_each          = toset(var.metrics_cidrs)
  security_group_id = aws_security_group.relay.id
  description       = "Prometheus scrape of relay metrics"
  ip_protocol       = "tcp"
  from_port         = 9090
  to_port           = 9090
  cidr_ipv4         = each.value
  tags              = local.tags
}

# Egress only where the relay needs it: HTTPS (mesh peers, ACME, -verify-client-url, the binary download)
# and HTTP (Debian packages). DNS and NTP go to the VPC's link-local services, which no group filters.
resource "aws_vpc_security_group_egress_rule" "out" {
  for_each = {
    https_v4 = { port = 443, cidr4 = "0.0.0.0/0", cidr6 = null }
    https_v6 = { port = 443, cidr4 = null, cidr6 = "::/0" }
    http_v4  = { port = 80, cidr4 = "0.0.0.0/0", cidr6 = null }
    http_v6  = { port = 80, cidr4 = null, cidr6 = "::/0" }
  }
  security_group_id = aws_security_group.relay.id
  description       = "outbound ${each.key}"
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr4
  cidr_ipv6         = each.value.cidr6
  tags              = local.tags
}

# --- instance role: SSM Session Manager for shell access, so no SSH port is opened ---
data "aws_iam_policy_document" "assume_ec2" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "relay" {
  name_prefix        = "derp-${var.name}-"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
  tags               = local.tags
}

resource "aws_iam_role_policy_attachment" "ssm" {
  role       = aws_iam_role.relay.name
  policy_arn = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "relay" {
  name_prefix = "derp-${var.name}-"
  role        = aws_iam_role.relay.name
  tags        = local.tags
}

# --- the instance and its stable public address ---
resource "aws_instance" "relay" {
  ami                    = local.ami_id
  instance_type          = var.instance_type
  subnet_id              = var.subnet_id
  vpc_security_group_ids = [aws_security_group.relay.id]
  iam_instance_profile   = aws_iam_instance_profile.relay.name
  ipv6_address_count     = var.enable_ipv6 ? 1 : 0
  monitoring             = true
  ebs_optimized          = true
  user_data              = local.user_data
  # A changed binary, unit or mesh key replaces the node; roll nodes one at a time (docs/operators.md).
  user_data_replace_on_change = true

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_type = "gp3"
    volume_size = 8
    encrypted   = true
  }

  tags        = local.tags
  volume_tags = local.tags
}

resource "aws_eip" "relay" {
  domain = "vpc"
  tags   = local.tags
}

resource "aws_eip_association" "relay" {
  allocation_id = aws_eip.relay.id
  instance_id   = aws_instance.relay.id
}

# --- DNS: the name clients dial and Let's Encrypt validates ---
resource "aws_route53_record" "a" {
  zone_id = var.route53_zone_id
  name    = var.hostname
  type    = "A"
  ttl     = 300
  records = [aws_eip.relay.public_ip]
}

resource "aws_route53_record" "aaaa" {
  count   = var.enable_ipv6 ? 1 : 0
  zone_id = var.route53_zone_id
  name    = var.hostname
  type    = "AAAA"
  ttl     = 300
  records = aws_instance.relay.ipv6_addresses
}
