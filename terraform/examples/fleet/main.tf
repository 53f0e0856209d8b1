# Example fleet: three DERP regions (Frankfurt, Ashburn, Singapore), each a full mesh of relay nodes in one
# AWS region, one fleet-wide mesh key, DNS in one Route 53 zone, and the DERP map for clients as output.
#
#   terraform init && terraform apply -var dns_zone=derp.example.net \
#     -var relay_binary_url=https://... -var relay_binary_sha256=...
#   terraform output -raw derp_map_json > derpmap.json

provider "aws" {
  alias  = "fra"
  region = "eu-central-1"
}

provider "aws" {
  alias  = "iad"
  region = "us-east-1"
}

provider "aws" {
  alias  = "sin"
  region = "ap-southeast-1"
}

# The fleet's mesh key: 32 random bytes as 64 lowercase hex (derper's -mesh-psk-file format).
# Rotation: docs/operators.md ("Rotate the mesh key").
resource "random_id" "mesh_key" {
  byte_length = 32
  keepers = {
    generation = var.mesh_key_generation
  }
}

data "aws_route53_zone" "fleet" {
  provider     = aws.iad
  name         = var.dns_zone
  private_zone = false
}

locals {
  # What every region shares (the relay-region module's `fleet` input).
  fleet = {
    dns_zone            = var.dns_zone
    route53_zone_id     = data.aws_route53_zone.fleet.zone_id
    mesh_key            = random_id.mesh_key.hex
    relay_binary_url    = var.relay_binary_url
    relay_binary_sha256 = var.relay_binary_sha256
    extra_args          = var.verify_client_url == "" ? [] : ["-verify-client-url", var.verify_client_url]
    tags                = { "derpfleet:fleet" = "example" }
  }
  regions = {
    fra = { id = 900, code = "fra", name = "Frankfurt", node_suffixes = ["a", "b", "c"] }
    iad = { id = 901, code = "iad", name = "Ashburn", node_suffixes = ["a", "b", "c"] }
    sin = { id = 902, code = "sin", name = "Singapore", node_suffixes = ["a", "b"] }
  }
}

# One module block per region: each runs under its own AWS provider (region), and Terraform cannot pick
# a module's provider per for_each instance, so the three blocks stay; all they differ in is that.
module "fra" {
  source    = "../../modules/relay-region"
  providers = { aws = aws.fra }
  region    = local.regions.fra
  fleet     = local.fleet
}

module "iad" {
  source    = "../../modules/relay-region"
  providers = { aws = aws.iad }
  region    = local.regions.iad
  fleet     = local.fleet
}

module "sin" {
  source    = "../../modules/relay-region"
  providers = { aws = aws.sin }
  region    = local.regions.sin
  fleet     = local.fleet
}

# The clients' view of the fleet (provider-free module: the same code the test suite plans offline).
module "derpmap" {
  source  = "../../modules/derpmap"
  regions = [module.fra.derp_region, module.iad.derp_region, module.sin.derp_region]
}
